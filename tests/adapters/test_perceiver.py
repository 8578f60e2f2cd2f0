import torch

from lmm.adapters import PerceiverResampler, Projector, QFormer


def test_perceiver_shapes_and_padded_frames_are_ignored():
    torch.manual_seed(0)
    p = PerceiverResampler(16, num_latents=5, depth=2, heads=2, head_dim=8, max_frames=4, qk_norm=True)
    x = torch.randn(2, 3, 2, 7, 16)  # (B, M, F, N, D): 2 frames per media item
    out = p(x)
    assert out.shape == (2, 3, 5, 16)
    # a third frame of garbage, masked out, must not change the result
    padded = torch.cat([x, torch.randn(2, 3, 1, 7, 16) * 100], dim=2)
    fm = torch.tensor([True, True, False]).expand(2, 3, 3)
    torch.testing.assert_close(p(padded, fm), out, atol=1e-5, rtol=1e-5)


def test_media_time_embedding_distinguishes_media_slots():
    torch.manual_seed(0)
    p = PerceiverResampler(8, num_latents=2, depth=1, heads=2, head_dim=4)
    with torch.no_grad():
        p.media_time_embs.normal_()
    x = torch.randn(1, 1, 1, 3, 8).expand(1, 2, 1, 3, 8)  # the same image in slots 0 and 1
    out = p(x)
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_qformer_and_projector_output_lm_width():
    x = torch.randn(2, 2, 3, 5, 12)
    assert QFormer(12, 20, num_queries=4, depth=2, hidden=16, heads=2)(x).shape == (2, 2, 4, 20)
    assert Projector(12, 20)(x).shape == (2, 2, 15, 20)
