"""Unified-IO 2's stabilisers as options of the perceiver and the cross-attention: what each one guarantees
(QK-norm and scaled cosine attention keep the logits bounded when the inputs blow up; 2-D RoPE makes patch
scores depend on relative offsets only), and that the options are off by default."""

import math

import pytest
import torch

from lmm.adapters import GatedCrossAttentionBlock, PerceiverResampler
from lmm.adapters.attention import Attention
from lmm.adapters.rope import apply_rope_2d, patch_grid, rope_2d


def attention_pair(**kw):
    torch.manual_seed(0)
    attn = Attention(16, heads=2, head_dim=8, **kw)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    return attn, x, ctx


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"cosine": True}])
def test_logits_are_what_the_forward_attends_with(kw):
    attn, x, ctx = attention_pair(**kw)
    _, v = attn.keys_values(ctx)
    probs = attn.logits(x, ctx).softmax(-1)
    want = attn.to_out((probs @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, ctx), want, atol=1e-5, rtol=1e-5)


def test_plain_attention_saturates_when_inputs_grow_100x_but_qk_norm_does_not():
    plain, x, ctx = attention_pair()
    assert plain.logits(x, ctx).softmax(-1).amax(-1).mean() < 0.9
    assert plain.logits(100 * x, 100 * ctx).softmax(-1).amax(-1).min() > 0.99  # one-hot rows: saturated

    normed, x, ctx = attention_pair(qk_norm=True)
    small, big = normed.logits(x, ctx), normed.logits(100 * x, 100 * ctx)
    torch.testing.assert_close(big, small, atol=1e-3, rtol=1e-3)  # LayerNorm forgets the input's scale
    # LayerNorm'd q, k have norm sqrt(head_dim), so |q.k| / sqrt(head_dim) <= sqrt(head_dim)
    assert big.abs().max() <= math.sqrt(8) + 1e-4
    assert big.softmax(-1).amax(-1).max() < 0.99


def test_cosine_attention_logits_are_bounded_by_its_learned_scale_clamped_at_100():
    attn, x, ctx = attention_pair(cosine=True)
    small, big = attn.logits(x, ctx), attn.logits(100 * x, 100 * ctx)
    torch.testing.assert_close(big, small, atol=1e-4, rtol=1e-4)
    assert big.abs().max() <= 10.0 + 1e-4  # initial scale: 10, so no row goes one-hot as plain attention's do
    with torch.no_grad():
        attn.log_scale.fill_(20.0)  # a runaway scale is clamped at 100 (Swin-v2)
    clamped = attn.logits(x, ctx)
    torch.testing.assert_close(clamped, small * 10, atol=1e-4, rtol=1e-4)
    # same ranking: the clamp only sharpens; a per-head scale: heads can differ
    with torch.no_grad():
        attn.log_scale[1].fill_(math.log(2.0))
        attn.log_scale[0].fill_(math.log(10.0))
    two = attn.logits(x, ctx)
    torch.testing.assert_close(two[:, 0], small[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two[:, 1], small[:, 1] / 5, atol=1e-5, rtol=1e-5)


def rotated_scores(q, k, n_tokens):
    cos, sin = rope_2d(n_tokens, q.shape[-1])
    return apply_rope_2d(q.expand(n_tokens, -1), cos, sin) @ apply_rope_2d(k.expand(n_tokens, -1), cos, sin).t()


def test_rope_2d_scores_depend_only_on_the_relative_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 16), torch.randn(1, 16)
    side = 5
    s = rotated_scores(q, k, side * side)  # s[i, j]: query at patch i, key at patch j

    def at(y, x):
        return y * side + x

    # shift both patches by the same (dy, dx): the same score
    for (y1, x1), (y2, x2), (dy, dx) in [
        ((0, 0), (1, 2), (3, 1)),
        ((2, 3), (0, 2), (1, -2)),
        ((4, 4), (4, 4), (-4, -3)),
    ]:
        a = s[at(y1, x1), at(y2, x2)]
        b = s[at(y1 + dy, x1 + dx), at(y2 + dy, x2 + dx)]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # every offset class has one score; different offsets have different scores
    by_offset: dict = {}
    for i in range(side * side):
        for j in range(side * side):
            off = (j // side - i // side, j % side - i % side)
            by_offset.setdefault(off, []).append(float(s[i, j]))
    assert all(max(v) - min(v) < 1e-4 for v in by_offset.values())
    means = sorted(sum(v) / len(v) for v in by_offset.values())
    assert len(means) == (2 * side - 1) ** 2
    assert min(b - a for a, b in zip(means, means[1:])) > 1e-6  # rows and columns are told apart
    # (dy, dx) and (dx, dy) differ: rows and columns rotate different channels
    assert abs(s[at(0, 0), at(1, 2)] - s[at(0, 0), at(2, 1)]) > 1e-3


def test_rope_2d_grid_from_token_count_and_the_cls_token_is_not_rotated():
    assert patch_grid(16) == (4, 0) and patch_grid(17) == (4, 1) and patch_grid(50) == (7, 1)
    with pytest.raises(ValueError, match="square grid"):
        patch_grid(12)
    cos, sin = rope_2d(17, 8)
    assert torch.equal(cos[0], torch.ones(8)) and torch.equal(sin[0], torch.zeros(8))
    torch.manual_seed(1)
    t = torch.randn(17, 8)
    rotated = apply_rope_2d(t, cos, sin)
    assert torch.equal(rotated[0], t[0])  # CLS: unchanged
    assert torch.equal(rotated[1], t[1])  # patch (0, 0): angle 0
    assert not torch.allclose(rotated[2:], t[2:])
    torch.testing.assert_close(rotated.norm(dim=-1), t.norm(dim=-1))  # a rotation: norms kept


def test_perceiver_without_rope_ignores_patch_order_and_with_rope_reads_it():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 1, 17, 16)  # CLS + 4x4 patches
    perm = torch.cat([torch.tensor([0]), 1 + torch.randperm(16)])
    shuffled = x[:, :, :, perm]
    torch.manual_seed(0)
    plain = PerceiverResampler(16, num_latents=3, depth=2, heads=2, head_dim=8)
    torch.testing.assert_close(plain(shuffled), plain(x), atol=1e-5, rtol=1e-5)  # a set function of its tokens

    torch.manual_seed(0)
    rope = PerceiverResampler(16, num_latents=3, depth=2, heads=2, head_dim=8, rope=True)
    assert (rope(shuffled) - rope(x)).abs().max() > 1e-3
    # the same weights without rotation give the plain result: rope adds no parameters
    assert {n for n, _ in rope.named_parameters()} == {n for n, _ in plain.named_parameters()}
    rope.rope = False
    torch.testing.assert_close(rope(x), plain(x))


def test_perceiver_rope_frames_share_the_grid_and_bad_grids_are_named():
    torch.manual_seed(0)
    p = PerceiverResampler(16, num_latents=3, depth=1, heads=2, head_dim=8, rope=True, max_frames=2)
    cos, sin = p.key_rotations(2, 17, torch.device("cpu"))
    assert cos.shape == (2 * 17 + 3, 8)
    torch.testing.assert_close(cos[:17], cos[17:34])  # each frame: the same patch positions
    assert torch.equal(cos[34:], torch.ones(3, 8)) and torch.equal(sin[34:], torch.zeros(3, 8))  # latents
    with pytest.raises(ValueError, match="rope_2d"):
        p(torch.randn(1, 1, 1, 12, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        PerceiverResampler(16, heads=2, head_dim=6, rope=True)


def test_options_reach_the_model_and_are_off_by_default():
    from lmm.config import BridgeConfig
    from lmm.testing import tiny_lmm

    assert not BridgeConfig().perceiver.cosine_attn and not BridgeConfig().perceiver.rope_2d
    assert not BridgeConfig().cross_attn.cosine_attn
    base = tiny_lmm(seed=0)
    assert not any("log_scale" in n for n, _ in base.named_parameters())
    from lmm.model import LMM
    from lmm.testing import tiny_lmm_config, tiny_tokenizer

    cfg = tiny_lmm_config()
    cfg.bridge.perceiver.cosine_attn = cfg.bridge.perceiver.rope_2d = cfg.bridge.cross_attn.cosine_attn = True
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    scales = [n for n, p in model.trainable_state_dict().items() if n.endswith("log_scale")]
    assert any(n.startswith("resamplers.image.") for n in scales) and any(".block.attn." in n for n in scales)
    assert model.resampler.rope
    pix = torch.randn(2, 1, 1, 3, 32, 32)
    media = model.encode_media(pix)
    assert torch.isfinite(media).all()
    assert isinstance(model.xattn_blocks()[0], GatedCrossAttentionBlock)
    assert model.xattn_blocks()[0].attn.log_scale is not None
