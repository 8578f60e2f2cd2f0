"""LLaVA-style MLP projector bridge: every visual token of every frame projected into the LM's
embedding space (placed at the `<image>` positions)."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """(B, M, F, N, Dv) -> (B, M, F*N, D_lm). depth=2 is LLaVA-1.5's Linear-GELU-Linear."""

    def __init__(self, media_dim: int, lm_dim: int, depth: int = 2, hidden_mult: int = 1, max_frames: int = 8):
        super().__init__()
        hidden = lm_dim * hidden_mult
        layers: list[nn.Module] = [nn.Linear(media_dim, hidden if depth > 1 else lm_dim)]
        for i in range(1, depth):
            layers += [nn.GELU(), nn.Linear(hidden, hidden if i < depth - 1 else lm_dim)]
        self.mlp = nn.Sequential(*layers)
        self.frame_embs = nn.Parameter(torch.zeros(max_frames, media_dim))

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, F, N, D = x.shape
        x = x + self.frame_embs[:F].view(1, 1, F, 1, D)
        if frame_mask is not None:  # padded frames contribute zeros
            x = x * frame_mask.view(B, M, F, 1, 1).to(x.dtype)
        return self.mlp(x).reshape(B, M, F * N, -1)


class MediaFlatten(nn.Module):
    """Flamingo without a perceiver: a linear map of every visual token, frames flattened: (B,M,F,N,D)->(B,M,F*N,D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, F, N, D = x.shape
        if frame_mask is not None:
            x = x * frame_mask.view(B, M, F, 1, 1).to(x.dtype)
        return self.norm(self.proj(x)).reshape(B, M, F * N, D)
