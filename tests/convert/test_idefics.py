"""`lmm convert idefics` against transformers' own IdeficsForVisionText2Text (tiny random, built from its config,
saved with save_pretrained): logits within 1e-4 in fp32 on a left-padded batch with several images per row (and
text only), greedy tokens equal, for alpha_type float / vector, qk_layer_norms on / off, cross_layer_interval 1 / 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lmm.config import ConfigError
from lmm.convert.idefics import convert_idefics
from lmm.generation import GenerationConfig, generate_ids, prepare_inputs
from lmm.model import LMM
from lmm.testing import reference_greedy, tiny_tokenizer

IMG = "<fake_token_around_image><image><fake_token_around_image>"
PROMPTS = [f"{IMG}a photo of a red circle{IMG}what shape", f"what color{IMG}the answer is"]


def tiny_idefics(tmp_path, alpha_type="vector", qk=True, interval=2, seed=0):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    tok = tiny_tokenizer()
    vocab = len(tok)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<fake_token_around_image>", "<image>"]}, replace_extra_special_tokens=False
    )
    cfg = IdeficsConfig(
        vocab_size=vocab,
        additional_vocab_size=2,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        cross_layer_interval=interval,
        qk_layer_norms=qk,
        alpha_type=alpha_type,
        use_resampler=True,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        vision_config={
            "embed_dim": 32,
            "image_size": 32,
            "patch_size": 8,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        perceiver_config={
            "use_resampler": True,
            "resampler_n_latents": 4,
            "resampler_depth": 2,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "qk_layer_norms_perceiver": qk,
        },
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # open gates, norms off 1/0: a wrong mapping cannot hide behind an init
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.uniform_(-1.0, 1.0, generator=g)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(tmp_path / "idefics")
    tok.save_pretrained(tmp_path / "idefics")
    return model


def images(n, seed):
    rs = np.random.RandomState(seed)
    return [Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


def image_mask(ids, image_id, m):
    """IDEFICS's processor mask: each token sees the image at or before it (none before the first)."""
    idx = (ids == image_id).long().cumsum(1)
    return torch.nn.functional.one_hot(idx, m + 1)[..., 1:]


@torch.no_grad()
def ref_logits(model, ids, mask, pix, image_id):
    return model(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=pix,
        image_attention_mask=image_mask(ids, image_id, pix.shape[1]),
    ).logits


@torch.no_grad()
def ref_greedy(model, ids, mask, pix, image_id, n, stop, never):
    imask = image_mask(ids, image_id, pix.shape[1])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, image_attention_mask=imask, use_cache=True)
    step = (
        lambda nxt, m, out: model(  # noqa: E731
            input_ids=nxt,
            attention_mask=m,
            pixel_values=pix,
            image_attention_mask=imask[:, -1:],
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    )
    return reference_greedy(out, mask, step, n, stop, never)


@pytest.mark.parametrize("alpha_type,qk,interval", [("vector", True, 2), ("float", False, 1)])
def test_idefics_converts_with_identical_outputs(tmp_path, alpha_type, qk, interval):
    torch.set_num_threads(1)
    src = tiny_idefics(tmp_path, alpha_type, qk, interval)
    from lmm.cli import app

    res = CliRunner().invoke(
        app, ["convert", "idefics", "--model", str(tmp_path / "idefics"), "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 0, res.output
    model = LMM.from_pretrained(tmp_path / "m", device="cpu")
    image_id = model.image_token_id
    assert image_id == src.config.vocab_size + 1  # IDEFICS's own id (an additional-vocabulary token)
    n_vocab = src.config.vocab_size + src.config.additional_vocab_size

    imgs = [images(2, 1), images(1, 2)]
    batch = prepare_inputs(model, PROMPTS, imgs)
    ids, mask, pix = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    assert bool((mask[:, 0] == 0).any())
    ref = ref_logits(src, ids, mask, pix[:, :, 0], image_id)
    with torch.no_grad():
        ours = model(ids, mask, pixel_values=pix).logits
    real = mask.bool()
    assert (ours[..., :n_vocab] - ref)[real].abs().max().item() <= 1e-4
    assert torch.isinf(ours[..., model.eoc_token_id]).all()  # lmm's <|endofchunk|> is not IDEFICS's: never predicted
    assert (ref_logits(src, ids, mask, pix[:, :, 0].flip(-1), image_id) - ref)[real].abs().max() > 1e-3

    # text only: IDEFICS still runs every block's gated MLP (its images then are a dummy nobody sees)
    text = prepare_inputs(model, ["two people riding bikes", "a dog"], [[], []])
    dummy = torch.zeros(2, 1, 3, 32, 32)
    ref_t = ref_logits(src, text["input_ids"], text["attention_mask"], dummy, image_id)
    with torch.no_grad():
        ours_t = model(text["input_ids"], text["attention_mask"]).logits
    assert (ours_t[..., :n_vocab] - ref_t)[text["attention_mask"].bool()].abs().max().item() <= 1e-4

    stop = {model.tokenizer.eos_token_id}
    want = ref_greedy(src, ids, mask, pix[:, :, 0], image_id, 10, stop, [image_id])
    assert generate_ids(model, batch, GenerationConfig(max_new_tokens=10)) == want
    assert any(want)


def test_bad_idefics_inputs(tmp_path):
    from transformers import AutoModelForCausalLM

    from lmm.testing import tiny_lm_config

    AutoModelForCausalLM.from_config(tiny_lm_config("llama")).save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="not 'idefics'"):
        convert_idefics(tmp_path / "plain", tmp_path / "out")
    assert not (tmp_path / "out").exists()
