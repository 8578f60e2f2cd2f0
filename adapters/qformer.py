"""BLIP-2 style Q-Former bridge: learned queries self-attend and cross-attend to the visual tokens,
then are projected into the LM's embedding space (placed at the `<image>` positions)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, feed_forward


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, media_dim: int, heads: int, ff_mult: int, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads=heads, head_dim=dim // heads)
        self.norm2 = nn.LayerNorm(dim) if cross else None
        self.cross_attn = Attention(dim, media_dim, heads=heads, head_dim=dim // heads) if cross else None
        self.ff = feed_forward(dim, ff_mult)

    def forward(self, q: torch.Tensor, media: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h, h)
        if self.cross_attn is not None:
            q = q + self.cross_attn(self.norm2(q), media, mask)
        return q + self.ff(q)


class QFormer(nn.Module):
    """(B, M, F, N, Dv) visual tokens -> (B, M, Q, D_lm) query embeddings for the LM."""

    def __init__(
        self,
        media_dim: int,
        lm_dim: int,
        num_queries: int = 32,
        depth: int = 2,
        hidden: int = 256,
        heads: int = 8,
        ff_mult: int = 4,
        cross_every: int = 1,
        max_frames: int = 8,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"qformer.hidden={hidden} must be divisible by qformer.heads={heads}")
        self.queries = nn.Parameter(torch.randn(num_queries, hidden) * 0.02)
        self.frame_embs = nn.Parameter(torch.zeros(max_frames, media_dim))
        self.media_norm = nn.LayerNorm(media_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, media_dim, heads, ff_mult, cross=(i % cross_every == 0)) for i in range(depth)
        )
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, lm_dim)

    @property
    def tokens_per_media(self) -> int:
        return self.queries.shape[0]

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, F, N, D = x.shape
        x = self.media_norm(x + self.frame_embs[:F].view(1, 1, F, 1, D)).reshape(B * M, F * N, D)
        mask = None
        if frame_mask is not None:
            mask = frame_mask.reshape(B * M, F, 1).expand(B * M, F, N).reshape(B * M, 1, 1, F * N)
        q = self.queries.to(x.dtype).unsqueeze(0).expand(B * M, -1, -1)
        for layer in self.layers:
            q = layer(q, x, mask)
        return self.proj(self.norm(q)).view(B, M, -1, self.proj.out_features)
