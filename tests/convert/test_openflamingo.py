"""`lmm convert openflamingo` against OpenFlamingo's own classes (open-flamingo 2.0.1, installed --no-deps):
logits within 1e-4 (fp32) on a batch with several images per row, <|endofchunk|> and left padding, and greedy
tokens equal, for each decoder family OpenFlamingo's releases use (Llama, GPT-NeoX, MPT)."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.config import ConfigError
from lmm.convert.openflamingo import convert_openflamingo
from lmm.generation import GenerationConfig, generate_ids, prepare_inputs
from lmm.model import LMM
from lmm.testing import sibling_module

PROMPTS = [
    "<image>a photo of a red circle<|endofchunk|><image>a photo of",
    "what shape<image>the answer is<|endofchunk|><image>two people<|endofchunk|><image>a dog",
]


def images(n: int, seed: int) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


OF = sibling_module(__file__, "openflamingo_oracle")
pytestmark = OF.NEEDS_OPENFLAMINGO


@pytest.mark.parametrize("family,every,pad_token", [("llama", 2, False), ("gpt_neox", 1, False), ("mpt", 2, True)])
def test_parity_with_openflamingo(tmp_path, family, every, pad_token):
    torch.set_num_threads(1)
    of_model, of_tok, paths = OF.build(tmp_path, family, every=every, pad_token=pad_token)
    out = convert_openflamingo(paths["checkpoint"], paths["vision"], paths["lm"], tmp_path / "converted")
    model = LMM.from_pretrained(out, device="cpu")
    assert (model.image_token_id, model.eoc_token_id) == (of_model.media_token_id, of_model.eoc_token_id)
    assert len(model.tokenizer) == len(of_tok) and model.tokenizer.pad_token == of_tok.pad_token
    assert model.config.bridge.cross_attn.every == every

    imgs = [images(2, 1), images(3, 2)]
    batch = prepare_inputs(model, PROMPTS, imgs)
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    assert bool((mask[:, 0] == 0).any()), "the batch must be left-padded"
    ref = OF.of_logits(of_model, ids, mask, pix)
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pix).logits
    assert ours.shape == ref.shape
    real = mask.bool()
    diff = (ours - ref)[real].abs().max().item()
    assert diff <= 1e-4, f"{family}: logits differ by {diff}"
    # the images matter (open gates): the same text with other pictures changes the logits
    other = OF.of_logits(of_model, ids, mask, pix.flip(-1))
    assert (other - ref)[real].abs().max().item() > 1e-3

    # text only: OpenFlamingo still runs every block's gated dense FFN (its vision_x is then a dummy image)
    text = prepare_inputs(model, ["two people riding bikes", "a dog"], [[], []])
    dummy = torch.zeros(2, 1, 1, 3, 32, 32)
    ref = OF.of_logits(of_model, text["input_ids"], text["attention_mask"], dummy)
    with torch.no_grad():
        ours = model(text["input_ids"], text["attention_mask"]).logits
    assert (ours - ref)[text["attention_mask"].bool()].abs().max().item() <= 1e-4

    cfg = GenerationConfig(max_new_tokens=12)
    stop = {model.tokenizer.eos_token_id, model.eoc_token_id}
    want = OF.of_greedy(of_model, ids, mask, pix, 12, stop, never=[model.image_token_id])
    got = generate_ids(model, batch, cfg)
    assert got == want
    assert any(len(r) for r in want)
    texts = model.generate(PROMPTS, imgs, max_new_tokens=12)
    assert texts == [model.tokenizer.decode(r, skip_special_tokens=True) for r in want]


def test_bad_inputs_leave_nothing(tmp_path):
    torch.set_num_threads(1)
    of_model, _, paths = OF.build(tmp_path, "llama", every=2)
    state = torch.load(paths["checkpoint"], weights_only=True)
    out = tmp_path / "out"

    def fails(ckpt, match, **kw):
        with pytest.raises(ConfigError, match=match):
            convert_openflamingo(
                ckpt, kw.get("vision", paths["vision"]), kw.get("lm", paths["lm"]), out, kw.get("every")
            )
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    # a pickle that needs code execution
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"perceiver.latents": Evil()}, f)
    fails(tmp_path / "evil.pt", "full unpickling")
    # the wrong kind of checkpoint: an LM's weights
    lm_only = {k[len("lang_encoder.") :]: v for k, v in state.items() if k.startswith("lang_encoder.model.embed")}
    torch.save(lm_only, tmp_path / "lm_only.pt")
    fails(tmp_path / "lm_only.pt", "not an OpenFlamingo checkpoint.*language model")
    # missing tensors
    missing = {k: v for k, v in state.items() if "perceiver.layers.0.0.to_kv" not in k}
    torch.save(missing, tmp_path / "missing.pt")
    fails(tmp_path / "missing.pt", "missing tensors.*to_kv")
    # an extra tensor
    torch.save({**state, "lang_encoder.model.surprise": torch.zeros(2)}, tmp_path / "extra.pt")
    fails(tmp_path / "extra.pt", "surprise")
    # a shape mismatch in a cross-attention block
    bad = dict(state)
    names = [k for k in bad if re.search(r"(layers\.1\.gated_cross_attn_layer|_layers\.1)\.attn\.to_q\.weight$", k)]
    assert len(names) == 2  # a full state dict names each block twice
    wrong = torch.zeros(bad[names[0]].shape[0], bad[names[0]].shape[1] + 1)
    for k in names:
        bad[k] = wrong
    torch.save(bad, tmp_path / "shape.pt")
    fails(tmp_path / "shape.pt", "shape")
    # --cross-attn-every that disagrees with the checkpoint
    fails(paths["checkpoint"], "disagrees", every=4)
    # a checkpoint trained on another LM (frozen LM weights in a full state dict differ from --lm's)
    other = dict(state)
    moved = next(v for k, v in other.items() if k.endswith("decoder_layer.mlp.up_proj.weight")) + 1.0
    for k in [k for k in other if re.search(r"(layers\.1\.decoder_layer|old_decoder_blocks\.1)\.mlp\.up_proj", k)]:
        other[k] = moved
    torch.save(other, tmp_path / "other_lm.pt")
    fails(tmp_path / "other_lm.pt", "differs from --lm")
    # OpenFlamingo-3B's remote-code MPT-1B (QK LayerNorm): no transformers class computes it
    mosaic = tmp_path / "mpt-1b"
    mosaic.mkdir()
    (mosaic / "config.json").write_text('{"model_type": "mosaic_gpt", "attn_qk_ln": true, "d_model": 64}')
    fails(paths["checkpoint"], "QK LayerNorm", lm=mosaic)
    # an existing output folder is never overwritten
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        convert_openflamingo(paths["checkpoint"], paths["vision"], paths["lm"], out)
    assert (out / "keep").read_text() == "x"


def test_trainable_only_checkpoint(tmp_path):
    """OpenFlamingo's training script saves only the trainable tensors (perceiver, cross-attention under the
    decoder layers, embeddings), DDP-prefixed: that converts to the same logits (the head's new rows aside,
    which OpenFlamingo re-initialises at random on each load)."""
    torch.set_num_threads(1)
    of_model, _, paths = OF.build(tmp_path, "llama", every=2)
    state = torch.load(paths["checkpoint"], weights_only=True)
    keep = {
        "module." + k: v
        for k, v in state.items()
        if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or "embed_tokens" in k
    }
    torch.save({"model_state_dict": keep, "epoch": 3}, tmp_path / "trainable.pt")
    model = LMM.from_pretrained(
        convert_openflamingo(tmp_path / "trainable.pt", paths["vision"], paths["lm"], tmp_path / "c"), device="cpu"
    )
    batch = prepare_inputs(model, PROMPTS, [images(2, 1), images(3, 2)])
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    ref = OF.of_logits(of_model, ids, mask, pix)
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pix).logits
    n_old = of_model.lang_encoder.config.vocab_size - 3  # <|endofchunk|>, <image>, <PAD>
    real = mask.bool()
    assert (ours - ref)[real][:, :n_old].abs().max().item() <= 1e-4


def test_openflamingo_4b_layout_gpt_neox_embed_out(tmp_path):
    """OpenFlamingo-4B's checkpoint as its training script saves it under transformers 4.x: trainable tensors plus
    every name containing "embed", where GPT-NeoX's head is `embed_out`: it maps onto transformers 5's lm_head, so
    every logit (the new tokens' columns too) is the original's."""
    torch.set_num_threads(1)
    of_model, _, paths = OF.build(tmp_path, "gpt_neox", every=2)
    state = torch.load(paths["checkpoint"], weights_only=True)
    keep = {
        ("lang_encoder.embed_out.weight" if k == "lang_encoder.lm_head.weight" else k): v
        for k, v in state.items()
        if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k or "embed" in k or k.endswith("lm_head.weight")
    }
    assert "lang_encoder.embed_out.weight" in keep and "lang_encoder.gpt_neox.embed_in.weight" in keep
    torch.save(keep, tmp_path / "of4b.pt")
    model = LMM.from_pretrained(
        convert_openflamingo(tmp_path / "of4b.pt", paths["vision"], paths["lm"], tmp_path / "c"), device="cpu"
    )
    batch = prepare_inputs(model, PROMPTS, [images(2, 1), images(3, 2)])
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    ref = OF.of_logits(of_model, ids, mask, pix)
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pix).logits
    assert (ours - ref)[mask.bool()].abs().max().item() <= 1e-4
