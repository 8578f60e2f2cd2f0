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
    head: Callable, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_CHUNK, sparse: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over labelled targets, per-token losses (B, T-1) with 0 where labels[:, 1:] == -100).

    `sparse` (default: unless compiling) runs the head on labelled positions only: instruction data labels a few
    answer tokens per row, and full-vocabulary logits for every position would cost more than the rest of a
    bridge step. Finding those positions reads the labels on the host (one sync); `sparse=False` runs the head
    everywhere instead, with no sync and one graph for `torch.compile`. The head runs in chunks of `chunk`
    positions, each recomputed in backward, so full-vocabulary logits for the whole batch never exist at once."""
    target = labels[:, 1:].to(hidden.device)
    h = hidden[:, :-1]
    B, T1, D = h.shape
    flat_h, flat_t = h.reshape(B * T1, D), target.reshape(B * T1)
    if sparse is None:
        sparse = not torch.compiler.is_compiling()
    idx = (flat_t != -100).nonzero().squeeze(1) if sparse else None  # labelled positions (host sync)
    if idx is not None:
        flat_h, flat_t = flat_h[idx], flat_t[idx]
    n_rows = flat_h.shape[0]
    pieces = []
    for s in range(0, n_rows, chunk):
        hs, ts = flat_h[s : s + chunk], flat_t[s : s + chunk]
        if torch.is_grad_enabled() and hs.requires_grad and n_rows > chunk:
            pieces.append(checkpoint(_chunk_losses, head, hs, ts, use_reentrant=False))
        else:
            pieces.append(_chunk_losses(head, hs, ts))
    losses = torch.cat(pieces) if pieces else h.new_zeros(0, dtype=torch.float32)
    if idx is not None:
        losses = torch.zeros(B * T1, dtype=losses.dtype, device=losses.device).index_put((idx,), losses)
    per_token = losses.view(B, T1)
    n = (target != -100).sum().clamp(min=1)
    return per_token.sum() / n, per_token
