"""Losses over the model's outputs, kept out of the forward's arithmetic (HF LLaVA's `loss_function` style)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Rows of (positions x vocabulary) logits materialised at once: 2048 x 50k x (bf16 + fp32 + fp32 grad) = 1 GB,
# freed per chunk.
LOSS_CHUNK = 2048


def _chunk_losses(head: Callable, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), target, ignore_index=-100, reduction="none")


def next_token_losses(
    head: Callable, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over labelled targets, per-token losses (B, T-1) with 0 where labels[:, 1:] == -100).

    The head runs in chunks of `chunk` positions; under autograd each chunk is recomputed in backward, so
    full-vocabulary logits for the whole batch never exist at once (the largest activation of an LM step
    otherwise). No boolean indexing: nothing here waits for the device (no host sync), and
    `torch.compile` sees one graph."""
    target = labels[:, 1:].to(hidden.device)
    h = hidden[:, :-1]
    B, T1, D = h.shape
    flat_h, flat_t = h.reshape(B * T1, D), target.reshape(B * T1)
    pieces = []
    for s in range(0, B * T1, chunk):
        hs, ts = flat_h[s : s + chunk], flat_t[s : s + chunk]
        if torch.is_grad_enabled() and hs.requires_grad and B * T1 > chunk:
            pieces.append(checkpoint(_chunk_losses, head, hs, ts, use_reentrant=False))
        else:
            pieces.append(_chunk_losses(head, hs, ts))
    per_token = torch.cat(pieces).view(B, T1) if pieces else h.new_zeros(B, T1, dtype=torch.float32)
    n = (target != -100).sum().clamp(min=1)
    return per_token.sum() / n, per_token
