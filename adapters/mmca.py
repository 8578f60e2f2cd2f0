"""Multimodal causal attention's text-to-image part (DeepSpeed-VisualChat): text tokens read the image tokens'
hidden states through projections of their own, beside the frozen LM's unchanged text-to-text attention."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention


class TextToImageAttention(nn.Module):
    """x + tanh(gate) * attention(text queries -> visible image keys). The gate starts at 0, so a new block
    leaves the LM exactly as it was; rows that see no image get nothing added."""

    def __init__(self, dim: int, heads: int = 8, head_dim: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, dim, heads=heads, head_dim=head_dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, heads, S, head_dim), of hidden states x (B, S, dim): kept across decode steps."""
        return self.attn.keys_values(self.norm(x))

    def forward(self, x: torch.Tensor, visible: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: (B, T, dim) hidden states entering the decoder layer; visible: bool (B, T, S), True where query t may
        # read key s (an image token of an earlier image); kv: the keys' (k, v) from `keys_values`
        neg = torch.finfo(x.dtype).min
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, neg)[:, None]
        out = self.attn(self.norm(x), mask=bias, kv=kv)  # additive mask: a row with no key stays finite
        return x + torch.tanh(self.attn_gate) * out * visible.any(-1, keepdim=True).to(out.dtype)
