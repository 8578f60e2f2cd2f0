"""Gated cross-attention against a naive reference (materialised mask, plain softmax)."""

import math

import pytest
import torch

from lmm.adapters import GatedCrossAttentionBlock, media_mask


def naive_xattn(block, x, media, img_positions, only_previous):
    """Reference written from the paper: per token, find the visible images, softmax over their tokens."""
    B, T, D = x.shape
    _, M, L, Dv = media.shape
    a = block.attn
    h, dh = a.heads, a.head_dim
    xn = block.norm(x)
    q = a.to_q(xn).view(B, T, h, dh)
    k, v = a.to_kv(media.reshape(B, M * L, Dv)).chunk(2, -1)
    k, v = k.view(B, M * L, h, dh), v.view(B, M * L, h, dh)
    out = torch.zeros(B, T, h * dh)
    for b in range(B):
        for t in range(T):
            seen = [m for m, p in enumerate(img_positions[b]) if p <= t]
            if not seen:
                continue  # text before the first image gets no visual signal
            vis = [seen[-1]] if only_previous else seen
            cols = [m * L + l for m in vis for l in range(L)]
            for hh in range(h):
                s = (k[b, cols, hh] @ q[b, t, hh]) / math.sqrt(dh)
                out[b, t, hh * dh : (hh + 1) * dh] = s.softmax(0) @ v[b, cols, hh]
    attn = a.to_out(out)
    has = torch.tensor([[any(p <= t for p in img_positions[b]) for t in range(T)] for b in range(B)])
    y = x + torch.tanh(block.attn_gate) * attn * has[..., None]
    return y + torch.tanh(block.ff_gate) * block.ff(y)


@pytest.mark.parametrize("only_previous", [True, False])
def test_masked_xattn_matches_naive_reference(only_previous):
    torch.manual_seed(0)
    B, T, D, M, L, Dv = 2, 12, 16, 3, 4, 8
    block = GatedCrossAttentionBlock(D, Dv, heads=2, head_dim=8)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.3)
    x, media = torch.randn(B, T, D), torch.randn(B, M, L, Dv)
    img_positions = [[2, 5, 9], [4, 7]]  # row 1 has text before its first image and only 2 images
    is_img = torch.zeros(B, T, dtype=torch.long)
    for b, ps in enumerate(img_positions):
        is_img[b, ps] = 1
    visible = media_mask(is_img.cumsum(1), M, only_previous)
    got = block(x, media, visible)
    want = naive_xattn(block, x, media, img_positions, only_previous)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1, :4], x[1, :4] + torch.tanh(block.ff_gate) * block.ff(x[1, :4]))


def test_zero_gates_are_identity_and_segments_isolate_media():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(16, 8, heads=2, head_dim=8)
    x, media = torch.randn(1, 6, 16), torch.randn(1, 2, 3, 8)
    idx = torch.tensor([[1, 1, 1, 2, 2, 2]])
    assert torch.equal(block(x, media, media_mask(idx, 2)), x)
    # packed: tokens 3.. are a second sample whose first token is not an image -> it must not see image 1
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    vis = media_mask(torch.tensor([[1, 1, 1, 1, 2, 2]]), 2, True, seg, torch.tensor([[0, 1]]))
    assert vis[0, 3].tolist() == [False, False] and vis[0, 4].tolist() == [False, True]
