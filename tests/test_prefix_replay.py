"""Frozen-prefix caching: replaying the top layers from cached hidden states equals the full forward."""

import pytest
import torch

from lmm.testing import LM_FAMILIES, tiny_lmm


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_replay_from_lowest_bridge_layer_equals_full_forward(family, images):
    model = tiny_lmm(family=family, gates=0.6, seed=7, cross_attn_layers=[2, 3])
    assert model.lowest_bridge_layer() == 2
    tok = model.tokenizer
    enc = tok(
        ["<image>a red circle<|endofchunk|>", "<image>what shape is in the image?"],
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    pix = torch.stack([model.image_processor(im) for im in images[:2]])[:, None, None]
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    with torch.no_grad():
        full = model(enc.input_ids, enc.attention_mask, pixel_values=pix, labels=labels)
        h = model.prefix_hidden_states(enc.input_ids, enc.attention_mask)
        fast = model(
            enc.input_ids,
            enc.attention_mask,
            pixel_values=pix,
            labels=labels,
            prefix_hidden=h,
            prefix_layer=model.lowest_bridge_layer(),
        )
    real = enc.attention_mask.bool()
    torch.testing.assert_close(fast.logits[real], full.logits[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.loss, full.loss, atol=1e-5, rtol=1e-5)


def test_prefix_above_bridge_is_refused():
    model = tiny_lmm()
    with pytest.raises(ValueError, match="depend on the images"):
        model.prefix_hidden_states(torch.tensor([[1, 2]]), layer=model.lowest_bridge_layer() + 1)
