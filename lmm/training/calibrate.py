"""Data-dependent start for the cross-attention blocks: standardise what their LayerNorms hand on.

Decoders such as SmolLM2 carry a few massive activation dimensions (hundreds where the rest are ~10). After a
plain LayerNorm the rest of the hidden state is nearly flat, so the bridge learns comparisons that need the
question's content ("is there a red shape?") only after a long plateau. Setting each block's LayerNorm scale and
shift from one batch so that every normalised dimension has mean 0 and std 1 removes that; the gates are still
0, so the model's outputs do not change. (The same trick made a yes/no probe on SmolLM2's hidden states learn
in a fraction of the steps.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmm.config import ConfigError


@torch.no_grad()
def standardize_xattn_norms(model, batch: dict, all_reduce_sum: Callable | None = None, min_std: float = 0.05) -> int:
    """Set the input LayerNorms of `model`'s fresh cross-attention blocks (attention and dense sub-block) from the
    hidden states `batch` produces at each block; returns the number of blocks. `all_reduce_sum` sums the
    statistics over ranks (DDP) so every rank sets the same values."""
    blocks = model.xattn_blocks()
    if not blocks:
        raise ConfigError("calibrate_xattn_norms needs the flamingo bridge (cross-attention blocks)")
    if any(float(b.attn_gate.abs().max()) != 0 or float(b.ff_gate.abs().max()) != 0 for b in blocks):
        raise ConfigError(
            "calibrate_xattn_norms is for a fresh bridge (gates at 0), but this model's bridge is "
            "already trained; set calibrate_xattn_norms: false"
        )
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        b.norm.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach()))
        for i, b in enumerate(blocks)
    ]
    was_training = model.training
    try:
        model.eval()
        model(**{k: v for k, v in batch.items() if k != "labels"}, return_logits=False)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    mask = batch.get("attention_mask")
    for i, block in enumerate(blocks):
        x = seen[i]  # (B, T, D): cross-attention keeps the sequence, so the batch's mask picks the real tokens
        x = x[mask.to(x.device).bool()] if mask is not None else x.flatten(0, -2)
        z = F.layer_norm(x.float(), x.shape[-1:])  # what the LayerNorm computes before its scale and shift
        stats = torch.cat([z.sum(0), (z * z).sum(0), z.new_tensor([z.shape[0]])])
        if all_reduce_sum is not None:
            all_reduce_sum(stats)
        d = z.shape[-1]
        n = stats[-1]
        mean = stats[:d] / n
        std = (stats[d : 2 * d] / n - mean * mean).clamp(min=0).sqrt().clamp(min=min_std)
        for ln in (block.norm, block.ff[0]):
            ln.weight.copy_((1 / std).to(ln.weight.dtype))
            ln.bias.copy_((-mean / std).to(ln.bias.dtype))
    return len(blocks)
