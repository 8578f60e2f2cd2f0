"""`lmm export openflamingo`: a flamingo model with OpenFlamingo's shapes, trained further in lmm, becomes files
that open_flamingo's own `create_model_and_transforms` + `load_state_dict` accept, and OpenFlamingo then gives
lmm's logits (1e-4, fp32) and greedy tokens; models OpenFlamingo cannot hold are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from lmm.config import ConfigError
from lmm.convert.export_openflamingo import export_openflamingo
from lmm.convert.openflamingo import convert_openflamingo
from lmm.generation import GenerationConfig, generate_ids, prepare_inputs
from lmm.model import LMM
from lmm.testing import sibling_module

OF = sibling_module(__file__, "openflamingo_oracle")
pytestmark = OF.NEEDS_OPENFLAMINGO
PROMPTS = ["<image>a photo of a red circle<|endofchunk|><image>a photo of", "what shape<image>the answer is"]


def images(n, seed):
    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def trained_lmm(tmp_path):
    """An lmm model with OpenFlamingo's shapes whose bridge and marker rows then trained in lmm (perturbed here)."""
    _, _, paths = OF.build(tmp_path, "llama", every=2, seed=4)
    model = LMM.from_pretrained(
        convert_openflamingo(paths["checkpoint"], paths["vision"], paths["lm"], tmp_path / "conv"), device="cpu"
    )
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.trainable_parameters():
            if p is not model.resampler.media_time_embs and p is not model.resampler.frame_embs:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(tmp_path / "trained")
    return model


def test_exported_checkpoint_loads_in_openflamingo_and_matches(tmp_path):
    torch.set_num_threads(1)
    from open_flamingo import create_model_and_transforms

    model = trained_lmm(tmp_path)
    out = export_openflamingo(tmp_path / "trained", tmp_path / "of")
    args = json.loads((out / "openflamingo.json").read_text())
    for k in ("clip_vision_encoder_pretrained", "lang_encoder_path", "tokenizer_path"):
        args[k] = str(out / args[k])
    of_model, _, tok = create_model_and_transforms(**args)
    res = of_model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True), strict=False)
    assert not res.unexpected_keys
    trained = {n for n, p in of_model.named_parameters() if p.requires_grad}
    assert not trained & set(res.missing_keys)  # every tensor OpenFlamingo trains comes from the checkpoint
    of_model.eval()
    assert (tok.encode("<image>")[-1], tok.encode("<|endofchunk|>")[-1]) == (model.image_token_id, model.eoc_token_id)

    imgs = [images(2, 1), images(1, 2)]
    batch = prepare_inputs(model, PROMPTS, imgs)
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    ref = OF.of_logits(of_model, ids, mask, pix)
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pix).logits
    assert (ours - ref)[mask.bool()].abs().max().item() <= 1e-4
    stop = {model.tokenizer.eos_token_id, model.eoc_token_id}
    want = OF.of_greedy(of_model, ids, mask, pix, 10, stop, never=[model.image_token_id])
    assert generate_ids(model, batch, GenerationConfig(max_new_tokens=10)) == want


def test_models_openflamingo_cannot_hold_are_refused(tmp_path):
    torch.set_num_threads(1)
    model = trained_lmm(tmp_path)
    with torch.no_grad():
        model.resampler.media_time_embs[1].fill_(0.1)  # learned in lmm; OpenFlamingo's perceiver has none
    model.save_pretrained(tmp_path / "timed")
    from typer.testing import CliRunner

    from lmm.cli import app

    res = CliRunner().invoke(app, ["export", "openflamingo", str(tmp_path / "timed"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "media-time" in res.output and "--drop-time-embeddings" in res.output
    assert not (tmp_path / "x").exists()
    assert (
        export_openflamingo(tmp_path / "timed", tmp_path / "x", drop_time_embeddings=True) / "checkpoint.pt"
    ).is_file()

    from lmm.testing import tiny_lmm

    tiny_lmm(bridge="projector").save_pretrained(tmp_path / "proj")
    with pytest.raises(ConfigError, match="flamingo bridge"):
        export_openflamingo(tmp_path / "proj", tmp_path / "y")
    tiny_lmm(bridge="flamingo").save_pretrained(tmp_path / "small")  # lmm's tiny shapes, not OpenFlamingo's
    with pytest.raises(ConfigError, match="final_norm|perceiver"):
        export_openflamingo(tmp_path / "small", tmp_path / "y")
    assert not (tmp_path / "y").exists()
