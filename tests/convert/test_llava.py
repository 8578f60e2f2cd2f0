"""`lmm convert llava` and `lmm export llava` against transformers' own LlavaForConditionalGeneration (tiny random,
built from configs, saved with save_pretrained): logits within 1e-4 in fp32 on a left-padded batch with several
images per row, greedy tokens equal; the exported folder loads back in transformers and matches lmm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lmm.config import ConfigError
from lmm.convert.llava import convert_llava
from lmm.generation import GenerationConfig, generate_ids, prepare_inputs
from lmm.model import LMM
from lmm.testing import reference_greedy, tiny_lm_config, tiny_tokenizer

PROMPTS = ["<image>a photo of a red circle<image>what shape", "what color<image>the answer is"]
PATCHES = 16  # 32 px / 8 px patches


def tiny_llava(tmp_path, strategy: str = "default", layer: int = -2, seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = tiny_lm_config("llama", vocab_size=512, hidden=64, layers=3, heads=4)  # spare rows, as LLaVA-1.5's 32064
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_id,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        image_seq_length=PATCHES + (strategy == "full"),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # off the init everywhere (LayerNorms, biases), so a wrong mapping shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(tmp_path / "llava")
    tok.save_pretrained(tmp_path / "llava")
    return model, tok


def images(n, seed):
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def expand(ids, mask, image_id, k):
    """LLaVA's processor layout: each <image> repeated k times, rows left-padded again."""
    rows = []
    for r, m in zip(ids.tolist(), mask.tolist()):
        toks = [t for t, keep in zip(r, m) if keep]
        rows.append([t for x in toks for t in ([x] * k if x == image_id else [x])])
    n = max(map(len, rows))
    out = torch.zeros(len(rows), n, dtype=torch.long)
    att = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, n - len(r) :] = torch.tensor(r)
        att[i, n - len(r) :] = 1
    return out, att


@torch.no_grad()
def hf_logits(model, ids, mask, pixels):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, position_ids=pos).logits


@torch.no_grad()
def hf_greedy(model, ids, mask, pixels, n, stop, never):
    """HF generation's greedy loop (cache, positions from the mask), media markers excluded from the argmax."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pixels,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
    )
    step = lambda nxt, m, out: model(  # noqa: E731
        input_ids=nxt,
        attention_mask=m,
        position_ids=m.sum(-1, keepdim=True) - 1,
        past_key_values=out.past_key_values,
        use_cache=True,
    )
    return reference_greedy(out, mask, step, n, stop, never)


def check_parity(hf, model, k):
    imgs = [images(2, 1), images(1, 2)]
    batch = prepare_inputs(model, PROMPTS, imgs)
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    hf_ids, hf_mask = expand(ids, mask, model.image_token_id, k)
    flat = torch.cat([pix[b, : len(imgs[b]), 0] for b in range(len(imgs))])  # LLaVA: images in text order
    ref = hf_logits(hf, hf_ids, hf_mask, flat)
    with torch.no_grad():
        out = model(ids, mask, pixel_values=pix)
    assert torch.equal(out.attention_mask, hf_mask)
    real = hf_mask.bool()
    n = ref.shape[-1]
    assert out.logits.shape[-1] == n  # <|endofchunk|> took a spare row: no new column
    diff = (out.logits - ref)[real].abs().max().item()
    assert diff <= 1e-4, diff
    assert (hf_logits(hf, hf_ids, hf_mask, flat.flip(-1)) - ref)[real].abs().max() > 1e-3  # images matter
    stop = {model.tokenizer.eos_token_id, model.eoc_token_id}
    want = hf_greedy(hf, hf_ids, hf_mask, flat, 10, stop, [model.image_token_id])
    assert generate_ids(model, batch, GenerationConfig(max_new_tokens=10)) == want
    return batch


@pytest.mark.parametrize("strategy,layer", [("default", -2), ("full", -1)])
def test_llava_converts_with_identical_outputs(tmp_path, strategy, layer):
    torch.set_num_threads(1)
    hf, _ = tiny_llava(tmp_path, strategy, layer)
    from lmm.cli import app

    res = CliRunner().invoke(
        app, ["convert", "llava", "--model", str(tmp_path / "llava"), "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 0, res.output
    model = LMM.from_pretrained(tmp_path / "m", device="cpu")
    assert model.config.vision.layer == layer and model.config.vision.include_cls == (strategy == "full")
    check_parity(hf, model, PATCHES + (strategy == "full"))


def test_export_llava_round_trip(tmp_path):
    """lmm -> LlavaForConditionalGeneration folder: transformers loads it (model and processor) and its logits
    are lmm's; a trained projector's frame embedding is folded into linear_1's bias."""
    torch.set_num_threads(1)
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tiny_llava(tmp_path, "default", -2)
    convert_llava(tmp_path / "llava", tmp_path / "m")
    model = LMM.from_pretrained(tmp_path / "m", device="cpu")
    with torch.no_grad():  # as after lmm training: the frame embedding and the marker rows moved
        model.resampler.frame_embs.normal_(0, 0.1)
        model.head.extra.add_(0.01)
    model.save_pretrained(tmp_path / "trained")
    from lmm.cli import app

    res = CliRunner().invoke(app, ["export", "llava", str(tmp_path / "trained"), "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    check_parity(hf, LMM.from_pretrained(tmp_path / "trained", device="cpu"), PATCHES)
    proc = AutoProcessor.from_pretrained(tmp_path / "hf")
    enc = proc(text="<image>what shape", images=images(1, 0), return_tensors="pt")
    assert int((enc["input_ids"] == hf.config.image_token_id).sum()) == PATCHES
    assert tuple(enc["pixel_values"].shape) == (1, 3, 32, 32)


def test_bad_llava_inputs(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(tiny_lm_config("llama")).save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="not 'llava'"):
        convert_llava(tmp_path / "plain", tmp_path / "out")
    with pytest.raises(ConfigError, match="no config.json"):
        convert_llava(tmp_path / "nothing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    from lmm.convert.export_llava import export_llava
    from lmm.testing import tiny_lmm

    tiny_lmm(bridge="flamingo").save_pretrained(tmp_path / "flamingo")
    with pytest.raises(ConfigError, match="projector"):
        export_llava(tmp_path / "flamingo", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
