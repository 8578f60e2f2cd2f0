"""Trainable parameters, save/load, packing and short training runs of every bridge."""

import pytest
import torch

from lmm import LMM
from lmm.testing import tiny_lmm


def batch_for(model, images, texts, n_frames=1):
    enc = model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    M = max(t.count("<image>") for t in texts)
    pix = torch.zeros(len(texts), M, n_frames, 3, 32, 32)
    k = 0
    for b, t in enumerate(texts):
        for m in range(t.count("<image>")):
            for f in range(n_frames):
                pix[b, m, f] = model.image_processor(images[(k + f) % len(images)])
            k += 1
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    labels = labels.masked_fill(enc.input_ids == model.image_token_id, -100)
    return dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pix, labels=labels)


def test_only_bridge_and_new_token_rows_get_gradients(images):
    model = tiny_lmm(gates=0.5)
    model.train()
    out = model(**batch_for(model, images, ["<image>a red circle<|endofchunk|>", "<image>a blue square<|endofchunk|>"]))
    out.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("resamplers.", "embed.extra", "head.extra")) or ".block." in n for n in trainable
    )
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    frozen_emb = model.embed.base.weight
    assert not frozen_emb.requires_grad and model.embed.extra.shape[0] == 2
    opt = torch.optim.AdamW(model.trainable_parameters())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())


@pytest.mark.parametrize("bridge", ["flamingo", "qformer"])
def test_save_load_reproduces_logits_without_pickles(tmp_path, images, bridge):
    model = tiny_lmm(bridge=bridge, gates=0.5, seed=4)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.01)
    b = batch_for(model, images, ["<image>a red circle<|endofchunk|>"])
    with torch.no_grad():
        want = model(**b).logits
    model.save_pretrained(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files), files
    again = LMM.from_pretrained(tmp_path / "ckpt", device="cpu")
    with torch.no_grad():
        got = again(**b).logits
    assert torch.equal(got, want)


def _train(model, batch, steps=30, lr=1e-2):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("bridge,frames", [("qformer", 1), ("projector", 1), ("flamingo", 3), ("qformer", 2)])
def test_each_bridge_and_video_trains(images, bridge, frames):
    model = tiny_lmm(bridge=bridge, seed=5)
    texts = ["<image>a red circle<|endofchunk|>", "<image>a blue square<|endofchunk|><image>a dog<|endofchunk|>"]
    batch = batch_for(model, images, texts, n_frames=frames)
    assert batch["pixel_values"].shape[2] == frames
    losses = _train(model, batch)
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("bridge", ["flamingo", "projector"])
def test_packed_rows_equal_separate_samples(images, bridge):
    model = tiny_lmm(bridge=bridge, gates=0.7, seed=6)
    tok = model.tokenizer
    a = tok("<image>a red circle<|endofchunk|>").input_ids
    b = tok("the dog <image>is blue<|endofchunk|>").input_ids  # text before its image: sees no media from a
    pix_a = model.image_processor(images[0])
    pix_b = model.image_processor(images[1])
    packed_ids = torch.tensor([a + b])
    seg = torch.tensor([[0] * len(a) + [1] * len(b)])
    packed_pix = torch.stack([pix_a, pix_b])[None, :, None]
    with torch.no_grad():
        packed = model(packed_ids, segment_ids=seg, pixel_values=packed_pix).logits
        la = model(torch.tensor([a]), pixel_values=pix_a[None, None, None]).logits
        lb = model(torch.tensor([b]), pixel_values=pix_b[None, None, None]).logits
    if bridge == "flamingo":
        torch.testing.assert_close(packed, torch.cat([la, lb], 1), atol=1e-5, rtol=1e-4)
    else:  # each <image> became K positions: compare the text positions
        K = model.encode_media(pixel_values=pix_a[None, None, None]).shape[2]
        torch.testing.assert_close(packed[:, : la.shape[1]], la, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(packed[:, la.shape[1] :], lb, atol=1e-5, rtol=1e-4)
        assert la.shape[1] == len(a) + K - 1


def test_config_yaml_round_trip_and_misspelled_key(tmp_path):
    from lmm.config import ConfigError, LMMConfig
    from lmm.testing import tiny_lmm_config

    cfg = tiny_lmm_config()
    cfg.to_yaml(tmp_path / "m.yaml")
    again = LMMConfig.from_yaml(tmp_path / "m.yaml", ["bridge.cross_attn.every=1", "bridge.perceiver.qk_norm=true"])
    assert again.bridge.cross_attn.every == 1 and again.bridge.perceiver.qk_norm
    assert again.language == cfg.language
    with pytest.raises(ConfigError, match="did you mean 'bridge.cross_attn'"):
        LMMConfig.from_yaml(tmp_path / "m.yaml", ["bridge.crossattn.every=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        LMMConfig.from_yaml(tmp_path / "m.yaml", ["bridge.cross_attn.every=often"])
