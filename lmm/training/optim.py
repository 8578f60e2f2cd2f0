"""AdamW over the trainable parameters only, with parameter groups, and the warmup + decay schedule.

Groups: weights with decay; biases, norms and other 1-D tensors without; the cross-attention tanh
gates without decay and at `lr x gate_lr_mult` (zero-init gates facing a frozen LM's large hidden
states otherwise open very slowly). Frozen parameters never enter the optimizer (nor its state).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmm.config import ConfigError, require_bitsandbytes

GATE_NAMES = ("attn_gate", "ff_gate")


def is_gate(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in GATE_NAMES


def param_groups(model: nn.Module, weight_decay: float, gate_lr_mult: float) -> list[dict]:
    """Named trainable parameters split into decay / no-decay / gate groups (empty groups dropped).

    Each group carries `lr_mult` (the schedule multiplies the base lr by it) and `names`."""
    groups = {
        "decay": ([], [], weight_decay, 1.0),
        "no_decay": ([], [], 0.0, 1.0),
        "gates": ([], [], 0.0, gate_lr_mult),
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "gates" if is_gate(name) else ("decay" if p.ndim >= 2 and not name.endswith("extra") else "no_decay")
        groups[key][0].append(p)
        groups[key][1].append(name)
    return [
        {"params": params, "names": names, "weight_decay": wd, "lr_mult": mult, "group": key}
        for key, (params, names, wd, mult) in groups.items()
        if params
    ]


def build_optimizer(model: nn.Module, optim_cfg, device: torch.device, sharded: bool = False) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA and CPU unless sharded; bitsandbytes AdamW8bit when `eight_bit`)."""
    groups = param_groups(model, optim_cfg.weight_decay, optim_cfg.gate_lr_mult)
    if not groups:
        raise ConfigError("the model has no trainable parameters (is the bridge frozen?)")
    for g in groups:
        g["lr"] = optim_cfg.lr * g["lr_mult"]
    kw = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if optim_cfg.eight_bit:
        require_bitsandbytes("optim.eight_bit (AdamW8bit)", "set optim.eight_bit=false")
        if device.type != "cuda":
            raise ConfigError(
                f"optim.eight_bit (AdamW8bit) needs the model on CUDA, not {device}; set optim.eight_bit=false"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    if device.type in ("cuda", "cpu") and optim_cfg.fused and not sharded:
        kw["fused"] = True  # one kernel for all parameters (on CPU ~4x faster than the foreach loop)
    return torch.optim.AdamW(groups, **kw)


def lr_factor(step: int, sched_cfg) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup, then the decay."""
    warm, total, floor = sched_cfg.warmup_steps, sched_cfg.max_steps, sched_cfg.min_lr_ratio
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if sched_cfg.kind == "constant" or total <= warm:
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if sched_cfg.kind == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `lr_factor` to every group (each group's lr already includes its multiplier)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, sched_cfg))
