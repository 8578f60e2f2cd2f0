"""LoRA over a bf16 (or 4-bit) LM keeps fp32 master weights and optimizer state, and its dropout trains.

A bf16 master cannot take an update smaller than 1/256 of the weight; fp32 masters under a bf16 LM must
step like a full-fp32 model (the frozen weights' rounding aside)."""

from __future__ import annotations

import torch
from torch import nn

from lmm.model import LMM
from lmm.testing import tiny_lmm_config, tiny_tokenizer
from lmm.training.config import OptimConfig
from lmm.training.optim import build_optimizer


def _lora_model(dtype: str, family: str = "llama", dropout: float = 0.0, seed: int = 0) -> LMM:
    cfg = tiny_lmm_config(family, "flamingo")
    cfg.dtype = dtype
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, dropout
    cfg.lora.target_modules = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
    torch.manual_seed(seed)
    return LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")


def _batch(model: LMM) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 12), generator=g)
    ids[:, 0] = model.image_token_id
    return {
        "input_ids": ids,
        "labels": ids.masked_fill(ids == model.image_token_id, -100),
        "pixel_values": torch.rand(2, 1, 1, 3, 32, 32, generator=g),
    }


def test_lora_weights_and_optimizer_state_are_fp32_over_a_bf16_lm():
    model = _lora_model("bf16")
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    frozen = [p for n, p in model.lm.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), torch.device("cpu"))
    model.train()
    model(**_batch(model)).loss.backward()
    opt.step()
    states = [opt.state[p] for p in lora.values()]
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in states)


def test_one_step_over_a_bf16_lm_equals_the_fp32_reference():
    ref, low = _lora_model("fp32"), _lora_model("bf16")
    with torch.no_grad():  # the same starting point: fp32 trainables copied, frozen weights rounded to bf16
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)  # B starts at 0, which would leave A without a gradient
        low.load_state_dict(ref.state_dict(), strict=False)
    tiny = 1e-6  # an update far below bf16's resolution of these weights (~1e-4 at |w| ~ 0.03)
    deltas = []
    for model in (ref, low):
        model.train()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.SGD(model.trainable_parameters(), lr=tiny)
        model(**_batch(model)).loss.backward()
        opt.step()
        deltas.append(
            torch.cat(
                [
                    (p.detach() - before[n]).flatten()
                    for n, p in model.named_parameters()
                    if p.requires_grad and "lora_" in n
                ]
            )
        )
    d_ref, d_low = deltas
    assert d_low.abs().max() > 0  # a bf16 master would have rounded every one of these updates away
    cos = torch.nn.functional.cosine_similarity(d_ref, d_low, dim=0)
    assert cos > 0.99, cos
    assert abs(d_low.norm() / d_ref.norm() - 1) < 0.05


def test_lora_dropout_is_active_in_training_and_the_frozen_lm_dropout_is_not():
    model = _lora_model("fp32", family="gpt2", dropout=0.1)
    model.train()
    lora_drop = [m for n, m in model.named_modules() if ".lora_dropout." in n and isinstance(m, nn.Dropout)]
    lm_drop = [m for n, m in model.lm.named_modules() if isinstance(m, nn.Dropout) and "lora_" not in n]
    assert len(lora_drop) == 4  # c_attn in each of the 4 layers
    assert all(m.training for m in lora_drop)
    assert lm_drop and not any(m.training for m in lm_drop)
    assert not model.vision.training
    model.eval()
    assert not any(m.training for m in lora_drop)
