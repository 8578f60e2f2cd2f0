"""Options added for imported models (issue 17), each on its own: media reach the fused layers of a decoder whose
forward drops keyword arguments (MPT), also in a checkpointed backward; `vision.resize_mode`; `language.
suppress_tokens`; `cross_attn.dense_without_media`. (Their parity with OpenFlamingo / IDEFICS: tests/convert.)"""

from __future__ import annotations

import torch
from PIL import Image

from lmm.config import LanguageConfig
from lmm.model import LMM
from lmm.testing import tiny_lmm_config, tiny_tokenizer

MPT = dict(model_type="mpt", d_model=32, n_heads=4, n_layers=4, expansion_ratio=2, max_seq_len=256, vocab_size=512)


def mpt_lmm(seed=0, **kw):
    cfg = tiny_lmm_config("llama", **kw)
    cfg.language = LanguageConfig(hf_config=dict(MPT))
    torch.manual_seed(seed)
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    with torch.no_grad():
        for b in model.xattn_blocks():
            b.attn_gate.fill_(1.0)
            b.ff_gate.fill_(1.0)
    return model


def batch(model):
    ids = torch.randint(5, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 2] = model.image_token_id
    return ids, torch.randn(2, 1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_mpt_blocks_see_the_media_also_when_checkpointed():
    torch.set_num_threads(1)
    model = mpt_lmm()
    ids, pix = batch(model)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    with torch.no_grad():
        a = model(ids, pixel_values=pix).logits
        b = model(ids, pixel_values=pix.flip(-1)).logits
    assert (a - b)[:, 3:].abs().max() > 1e-3  # MptModel passes no **kwargs to its blocks: the scope carries them
    model.train()
    model(ids, pixel_values=pix, labels=labels).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert model.gradient_checkpointing_enable() == 4
    model(ids, pixel_values=pix, labels=labels).loss.backward()
    ckpt = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == ckpt.keys() and any("attn.to_kv" in n for n in plain)
    for n in plain:
        assert torch.allclose(plain[n], ckpt[n], atol=1e-6), n


def test_resize_mode_squash_keeps_the_whole_image():
    from lmm.backbones.vision import build_vision_tower
    from lmm.testing import tiny_vision_config

    cfg = tiny_vision_config("clip")
    wide = Image.new("RGB", (64, 32), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 8, 32))  # a white band at the left edge
    crop = build_vision_tower(cfg).preprocess(wide)
    cfg.resize_mode = "squash"
    squash = build_vision_tower(cfg).preprocess(wide)
    assert crop.shape == squash.shape == (3, 32, 32)
    assert squash[:, :, 0].mean() > crop[:, :, 0].mean() + 1.0  # centre crop cut the band off; squash kept it


def test_suppressed_tokens_are_never_predicted():
    cfg = tiny_lmm_config("llama")
    cfg.language.suppress_tokens = ["<|endofchunk|>"]
    torch.manual_seed(0)
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    with torch.no_grad():
        model.head.extra[1] = 1e3 * model.lm.get_output_embeddings().weight.std()  # would win every argmax
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert torch.isinf(logits[..., model.eoc_token_id]).all() and torch.isfinite(logits[..., :400]).all()


def test_dense_without_media_runs_the_gated_ffn_on_text():
    torch.set_num_threads(1)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = {}
    for dense in (False, True):
        torch.manual_seed(0)
        cfg = tiny_lmm_config("llama")
        cfg.bridge.cross_attn.dense_without_media = dense
        model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
        with torch.no_grad():
            for b in model.xattn_blocks():
                b.ff_gate.fill_(1.0)
            out[dense] = model(ids).logits
            for b in model.xattn_blocks():
                b.ff_gate.fill_(0.0)
            out["closed", dense] = model(ids).logits
    assert (out[True] - out[False]).abs().max() > 1e-3  # the FFN ran on text-only input
    assert torch.allclose(out["closed", True], out[False], atol=1e-6)  # with ff gates shut: the bare LM again
