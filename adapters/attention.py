"""Multi-head attention over (query, key/value) sequences through SDPA, with optional QK-norm.

Shared by the perceiver, the gated cross-attention and the Q-Former. Plain tensors in, plain out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """q from `x`, k/v from `context`; `qk_norm` applies LayerNorm per head to q and k (Unified-IO 2)."""

    def __init__(
        self,
        dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        qk_norm: bool = False,
        out_dim: int | None = None,
    ):
        super().__init__()
        context_dim = context_dim or dim
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, out_dim or dim, bias=False)
        self.q_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim) if qk_norm else nn.Identity()

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, heads, Tk, head_dim), for a context (B, Tk, context_dim): reusable while it stays."""
        B = context.shape[0]
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        return self.k_norm(k), v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # x: (B, Tq, dim); context: (B, Tk, context_dim), or its `keys_values` as kv; mask: bool, broadcastable
        # to (B, 1, Tq, Tk), True = attend
        B, Tq, _ = x.shape
        q = self.q_norm(self.to_q(x).view(B, Tq, self.heads, self.head_dim).transpose(1, 2))
        k, v = kv if kv is not None else self.keys_values(context)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, Tq, head_dim)
        return self.to_out(out.transpose(1, 2).reshape(B, Tq, self.heads * self.head_dim))


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """Pre-norm GELU MLP, as in Flamingo's dense blocks."""
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )
