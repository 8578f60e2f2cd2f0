"""Multi-head attention over (query, key/value) sequences through SDPA, with optional QK-norm, scaled cosine
attention and rotary keys (Unified-IO 2's stabilisers).

Shared by the perceiver, the gated cross-attention and the Q-Former. Plain tensors in, plain out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope_2d

MAX_LOGIT_SCALE = math.log(100.0)  # Swin-v2 clamps the learned cosine-attention scale at 100


class Attention(nn.Module):
    """q from `x`, k/v from `context`; `qk_norm` applies LayerNorm per head to q and k (Unified-IO 2); `cosine`
    L2-normalises q and k and multiplies by a learned per-head scale (init 10, clamped at 100: Swin-v2), so every
    logit lies in [-scale, scale] whatever the inputs' size."""

    def __init__(
        self,
        dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        head_dim: int = 64,
        qk_norm: bool = False,
        out_dim: int | None = None,
        cosine: bool = False,
        norm: str = "layer",
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        context_dim = context_dim or dim
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, out_dim or dim, bias=False)
        self.q_norm = norm_layer(norm, head_dim, norm_eps) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(norm, head_dim, norm_eps) if qk_norm else nn.Identity()
        self.log_scale = nn.Parameter(torch.full((heads, 1, 1), math.log(10.0))) if cosine else None

    def keys_values(
        self, context: torch.Tensor, k_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, heads, Tk, head_dim), for a context (B, Tk, context_dim): reusable while it stays.
        `k_rope`: (cos, sin), each (Tk, head_dim), rotating each key by its token's 2-D position (adapters.rope)."""
        B = context.shape[0]
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(B, -1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(k)
        if self.log_scale is not None:
            k = F.normalize(k, dim=-1)
        if k_rope is not None:
            k = apply_rope_2d(k, *k_rope)
        return k, v

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, Tq, head_dim) queries, with the cosine scale folded in (then SDPA's own scale is 1)."""
        B, Tq, _ = x.shape
        q = self.q_norm(self.to_q(x).view(B, Tq, self.heads, self.head_dim).transpose(1, 2))
        if self.log_scale is not None:
            q = F.normalize(q, dim=-1) * self.log_scale.clamp(max=MAX_LOGIT_SCALE).exp().to(q.dtype)
        return q

    def sdpa_scale(self) -> float | None:
        return 1.0 if self.log_scale is not None else None  # None: SDPA's 1/sqrt(head_dim)

    def logits(
        self, x: torch.Tensor, context: torch.Tensor, k_rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The pre-softmax scores (B, heads, Tq, Tk) that `forward` attends with (for inspection and tests)."""
        k, _ = self.keys_values(context, k_rope)
        scale = self.sdpa_scale() or self.head_dim**-0.5
        return self.queries(x) @ k.transpose(-1, -2) * scale

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        k_rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        # x: (B, Tq, dim); context: (B, Tk, context_dim), or its `keys_values` as kv; mask: bool, broadcastable
        # to (B, 1, Tq, Tk), True = attend
        B, Tq, _ = x.shape
        q = self.queries(x)
        k, v = kv if kv is not None else self.keys_values(context, k_rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.sdpa_scale())  # (B, h, Tq, hd)
        return self.to_out(out.transpose(1, 2).reshape(B, Tq, self.heads * self.head_dim))


def norm_layer(kind: str, dim: int, eps: float = 1e-5) -> nn.Module:
    """LayerNorm ("layer", Flamingo) or RMSNorm ("rms", Llama-style blocks such as IDEFICS's cross-attention)."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the Llama-family MLP (IDEFICS's cross-attention blocks use it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def feed_forward(
    dim: int, mult: int = 4, act: str = "gelu", norm: str = "layer", norm_eps: float = 1e-5, hidden: int | None = None
) -> nn.Sequential:
    """Pre-norm MLP: GELU as in Flamingo's dense blocks; "relu" (IDEFICS's perceiver) or "swiglu" (IDEFICS's
    cross-attention blocks) for imported models. `hidden` overrides the width dim * mult."""
    hidden = hidden or dim * mult
    if act == "swiglu":
        return nn.Sequential(norm_layer(norm, dim, norm_eps), SwiGLU(dim, hidden))
    acts = {"gelu": nn.GELU, "relu": nn.ReLU}
    if act not in acts:
        raise ValueError(f"feed-forward activation must be gelu, relu or swiglu, got {act!r}")
    return nn.Sequential(
        norm_layer(norm, dim, norm_eps),
        nn.Linear(dim, hidden, bias=False),
        acts[act](),
        nn.Linear(hidden, dim, bias=False),
    )
