"""Perceiver Resampler (Flamingo): a fixed number of learned latents attend to a variable number of
visual tokens (all frames of one media item), giving L tokens per image or video.

Options (Unified-IO 2's stabilisers): `qk_norm`, `cosine` (scaled cosine attention) and `rope_2d` (each media
key rotated by its patch's row and column; the latents and a CLS token stay unrotated)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, feed_forward
from .rope import rope_2d


class PerceiverLayer(nn.Module):
    def __init__(
        self, dim: int, heads: int, head_dim: int, ff_mult: int, qk_norm: bool, cosine: bool = False, ff_act="gelu"
    ):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, head_dim=head_dim, qk_norm=qk_norm, cosine=cosine)
        self.ff = feed_forward(dim, ff_mult, ff_act)

    def forward(
        self, x: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor | None, k_rope: tuple | None = None
    ) -> torch.Tensor:
        # Flamingo: keys/values are the media tokens concatenated with the latents themselves.
        lat = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(x), lat], dim=1)
        latents = latents + self.attn(lat, kv, mask, k_rope=k_rope)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """(B, M, F, N, D) visual tokens -> (B, M, L, D) latents.

    Frame embeddings (video) and media-time embeddings (which image in the sequence) are added to the
    inputs before resampling; `frame_mask` (B, M, F) hides padded frames.
    """

    def __init__(
        self,
        dim: int,
        num_latents: int = 64,
        depth: int = 6,
        heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
        max_media: int = 32,
        max_frames: int = 8,
        qk_norm: bool = False,
        cosine: bool = False,
        rope: bool = False,
        ff_act: str = "gelu",  # "relu": IDEFICS's perceiver MLP
    ):
        super().__init__()
        if rope and head_dim % 4:
            raise ValueError(f"perceiver.rope_2d needs perceiver.head_dim divisible by 4, got {head_dim}")
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.frame_embs = nn.Parameter(torch.zeros(max_frames, dim))
        self.media_time_embs = nn.Parameter(torch.zeros(max_media, dim))
        self.layers = nn.ModuleList(
            PerceiverLayer(dim, heads, head_dim, ff_mult, qk_norm, cosine, ff_act) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.max_media, self.max_frames = max_media, max_frames
        self.rope, self.head_dim = rope, head_dim

    def key_rotations(self, frames: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for the keys: every frame's patch grid, then the latents unrotated (angle 0)."""
        cos, sin = rope_2d(tokens, self.head_dim)
        n_lat = self.latents.shape[0]
        cos = torch.cat([cos.repeat(frames, 1), cos.new_ones(n_lat, self.head_dim)])
        sin = torch.cat([sin.repeat(frames, 1), sin.new_zeros(n_lat, self.head_dim)])
        return cos.to(device), sin.to(device)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, F, N, D = x.shape
        if F > self.max_frames:
            raise ValueError(
                f"{F} frames per video exceed perceiver.max_frames={self.max_frames}; "
                "raise bridge.perceiver.max_frames or sample fewer frames"
            )
        if M > self.max_media:
            raise ValueError(
                f"{M} media items per sample exceed perceiver.max_media={self.max_media}; "
                "raise bridge.perceiver.max_media or use fewer images per sample"
            )
        x = x + self.frame_embs[:F].view(1, 1, F, 1, D) + self.media_time_embs[:M].view(1, M, 1, 1, D)
        x = x.reshape(B * M, F * N, D)
        mask = None
        if frame_mask is not None:  # keys: F*N media tokens then L latents (always visible)
            keys = frame_mask.reshape(B * M, F, 1).expand(B * M, F, N).reshape(B * M, F * N)
            keys = torch.cat([keys, keys.new_ones(B * M, self.latents.shape[0])], dim=1)
            mask = keys[:, None, None, :]
        latents = self.latents.to(x.dtype).unsqueeze(0).expand(B * M, -1, -1)
        k_rope = self.key_rotations(F, N, x.device) if self.rope else None
        for layer in self.layers:
            latents = layer(x, latents, mask, k_rope)
        return self.norm(latents).view(B, M, -1, D)
