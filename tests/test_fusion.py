"""With every gate at 0 the fused model is exactly the bare LM, for every LM and vision family."""

import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmm.fusion import FusedLayer, find_layer_list
from lmm.testing import LM_FAMILIES, tiny_lm_config, tiny_lmm


def bare_copy(model, family):
    """The same LM without any lmm wrapping: fused layers' original weights copied back by name."""
    bare = AutoModelForCausalLM.from_config(tiny_lm_config(family)).eval()
    state = {re.sub(r"\.layer\.", ".", k): v for k, v in model.lm.state_dict().items() if ".block." not in k}
    missing, unexpected = bare.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "embed_out" in k for k in missing)  # tied heads only
    return bare


def old_vocab(model, V):
    keep = torch.ones(V, dtype=torch.bool)
    keep[[model.image_token_id, model.eoc_token_id]] = False
    return keep


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_gate_zero_equals_bare_lm(family, images):
    model = tiny_lmm(family=family, seed=1)
    bare = bare_copy(model, family)
    assert sum(isinstance(l, FusedLayer) for l in find_layer_list(model.lm)) == 2
    enc = model.tokenizer(["<image>a photo of a red circle<|endofchunk|><image>a blue"], return_tensors="pt")
    pix = torch.stack([model.image_processor(im) for im in images[:2]])[None, :, None]
    with torch.no_grad():
        got = model(enc.input_ids, enc.attention_mask, pixel_values=pix).logits
        want = bare(inputs_embeds=model.embed(enc.input_ids), attention_mask=enc.attention_mask).logits
        # plain text (ids the bare LM knows) through the fused model with media present
        text = model.tokenizer("a photo of a red circle", return_tensors="pt").input_ids
        got_text = model(text, pixel_values=pix).logits
        want_text = bare(text).logits
    old = old_vocab(model, want.shape[-1])  # the new tokens' output rows are lmm's own (trainable)
    torch.testing.assert_close(got[..., old], want[..., old], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_text[..., old], want_text[..., old], atol=1e-5, rtol=0)


@pytest.mark.parametrize("vision", ["open_clip", "clip", "siglip"])
def test_gate_zero_with_each_vision_family_and_media_reaches_layers(vision, images):
    model = tiny_lmm(family="qwen2", vision=vision, seed=2)
    bare = bare_copy(model, "qwen2")
    ids = model.tokenizer("<image>a dog", return_tensors="pt").input_ids
    pix = torch.stack([model.image_processor(images[0])])[:, None, None]
    pix2 = torch.stack([model.image_processor(images[2])])[:, None, None]
    with torch.no_grad():
        zero = model(ids, pixel_values=pix).logits
        want = bare(inputs_embeds=model.embed(ids)).logits
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(1.0)
        opened = model(ids, pixel_values=pix).logits
        other = model(ids, pixel_values=pix2).logits
    old = old_vocab(model, want.shape[-1])
    torch.testing.assert_close(zero[..., old], want[..., old], atol=1e-5, rtol=0)
    assert not torch.allclose(opened, zero, atol=1e-4)  # media flow into the layers once gates open
    assert not torch.allclose(opened, other, atol=1e-4)  # and the picture matters


@pytest.mark.parametrize("new_ids,vocab_out", [([10, 11], 12), ([11, 10], 12), ([3, 7], 10), ([4, 13], 14)])
def test_head_gives_frozen_logits_and_new_rows_by_id_with_their_gradients(new_ids, vocab_out):
    """The head's logits are the frozen head's for old ids and the trainable rows' for new ids, wherever the new
    ids sit (appended in order: concatenated without an index copy; else placed by index; beyond the frozen
    vocabulary and never set: -inf), and gradients reach the hidden states and the new rows alike."""
    from torch import nn

    from lmm.fusion import ExtendedHead

    torch.manual_seed(0)
    base = nn.Linear(8, 10, bias=False).requires_grad_(False)
    head = ExtendedHead(base, new_ids, vocab_out)
    assert head.appended(10) == (new_ids == [10, 11])
    h = torch.randn(3, 5, 8, requires_grad=True)
    want_h = h.detach().clone().requires_grad_(True)
    got = head(h)
    want = torch.full((3, 5, vocab_out), float("-inf"))
    want[..., :10] = base(want_h)
    want[..., new_ids] = want_h @ head.extra.t()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want)
    weights = torch.randn(vocab_out).masked_fill(torch.isinf(want[0, 0]), 0)  # a loss over the finite logits
    (got.nan_to_num(neginf=0) * weights).sum().backward()
    g_extra = head.extra.grad.clone()
    head.extra.grad = None
    (want.nan_to_num(neginf=0) * weights).sum().backward()
    torch.testing.assert_close(h.grad, want_h.grad)
    torch.testing.assert_close(g_extra, head.extra.grad)
