"""2-D rotary position embeddings for image patch tokens (Unified-IO 2, after RoFormer's 1-D RoPE).

Half of each head's channels rotate by the patch's row, the other half by its column, so the score between a
query and a key both rotated depends only on their (dy, dx) offset. A CLS token (or any token without a place
on the grid) gets the identity rotation (cos 1, sin 0).
"""

from __future__ import annotations

import math

import torch


def patch_grid(num_tokens: int) -> tuple[int, int]:
    """(side, leading unrotated tokens) of a frame's tokens: a square grid, optionally after one CLS token."""
    for lead in (0, 1):
        side = math.isqrt(num_tokens - lead) if num_tokens > lead else 0
        if side > 0 and side * side == num_tokens - lead:
            return side, lead
    raise ValueError(
        f"rope_2d needs a square grid of patch tokens (optionally after a CLS token); a frame has {num_tokens} "
        "tokens: set bridge.perceiver.rope_2d=false for this vision tower"
    )


def rope_2d(num_tokens: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (num_tokens, head_dim), for one frame's tokens laid out row by row on a square grid."""
    if head_dim % 4:
        raise ValueError(f"rope_2d needs a head_dim divisible by 4, got {head_dim}")
    side, lead = patch_grid(num_tokens)
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (d/4,)
    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ang_y = y.reshape(-1, 1).double() * freqs  # (side*side, d/4)
    ang_x = x.reshape(-1, 1).double() * freqs
    angles = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)  # [row half | column half], each rotate-half pairs
    angles = torch.cat([angles.new_zeros(lead, head_dim), angles])  # CLS: angle 0 = no rotation
    return angles.cos().float(), angles.sin().float()


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope_2d(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate t (..., T, head_dim) by per-token angles (T, head_dim): rows in the first half, columns in the second."""
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    (ty, tx), (cy, cx), (sy, sx) = t.chunk(2, -1), cos.chunk(2, -1), sin.chunk(2, -1)
    return torch.cat([ty * cy + _rotate_half(ty) * sy, tx * cx + _rotate_half(tx) * sx], dim=-1)
