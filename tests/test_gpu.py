"""On a CUDA machine (skipped elsewhere): every bridge builds and runs on the GPU, bf16 frozen weights with fp32
trainables, cached decoding equals uncached, and the flamingo decode step raises no host sync under
`torch.cuda.set_sync_debug_mode("error")`. `bench/gpu_smoke.py` runs these with the GPU benchmarks."""

import pytest
import torch

from lmm.generation import GenerationConfig, decode_steps
from lmm.model import LMM
from lmm.testing import tiny_lmm_config, tiny_tokenizer

pytestmark = pytest.mark.gpu


def _model(bridge: str) -> LMM:
    torch.manual_seed(0)
    cfg = tiny_lmm_config("llama", bridge)
    cfg.dtype = "auto"  # bf16 frozen weights on CUDA
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cuda")
    with torch.no_grad():
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(0.5)
            blk.ff_gate.fill_(0.5)
    return model


def _inputs(model, B=2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (B, 16), generator=g)
    ids[:, 2] = model.image_token_id
    return ids, torch.ones_like(ids), torch.randint(0, 256, (B, 1, 1, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("bridge", ["flamingo", "qformer", "projector"])
def test_every_bridge_runs_on_cuda_with_fp32_trainables(bridge):
    model = _model(bridge)
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    assert devices == {"cuda"}
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    assert {p.dtype for p in model.lm.parameters() if not p.requires_grad} == {torch.bfloat16}
    ids, mask, pix = _inputs(model)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids.cuda(), mask.cuda(), pixel_values=pix.cuda(), labels=ids.cuda())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.resampler.parameters())
    model.eval()
    cfg = GenerationConfig(max_new_tokens=8, stop_at_end_of_chunk=False)
    cached = torch.stack(list(decode_steps(model, ids, mask, pix, cfg=cfg)), 1)
    cfg.use_cache = False
    assert torch.equal(cached, torch.stack(list(decode_steps(model, ids, mask, pix, cfg=cfg)), 1))


def test_flamingo_decode_step_never_syncs_with_the_host():
    model = _model("flamingo").eval()
    ids, mask, pix = _inputs(model)
    ids, pix = ids.cuda(), pix.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        media = model.encode_media(pix)
        out = model(ids, media=media, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1)
        pos = torch.full((2, 1), ids.shape[1], device="cuda")
        n_img = (ids == model.image_token_id).sum(1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(
                nxt[:, None],
                media=media,
                position_ids=pos,
                past_key_values=out.past_key_values,
                use_cache=True,
                media_offset=n_img,
                logits_to_keep=1,
                validate=False,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
