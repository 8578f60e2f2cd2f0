"""Image-text contrastive head (CLIP / BLIP-2 ITC, FLAVA): an objective beside next-token prediction.

Images are the bridge's resampled media (what the cross-attention reads); texts are the frozen LM's hidden
states at a middle layer from a text-only pass (CoCa's unimodal text half), so the text side never sees the
image it is compared with. Both are mean-pooled, projected and L2-normalised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveHead(nn.Module):
    """Projections of pooled media (media_dim) and pooled text states (text_dim) into one `dim`-d space."""

    def __init__(self, media_dim: int, text_dim: int, dim: int = 256):
        super().__init__()
        self.media_norm, self.text_norm = nn.LayerNorm(media_dim), nn.LayerNorm(text_dim)
        self.media_proj = nn.Linear(media_dim, dim, bias=False)
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))  # CLIP's initial temperature; (1,) for FSDP2

    def embed_media(self, media: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """media (B, M, L, D), valid bool (B, M) -> unit vectors (B, dim): mean over the row's valid media."""
        w = valid.to(media.dtype)[..., None, None]
        pooled = (media * w).sum((1, 2)) / (w.sum((1, 2)) * media.shape[2]).clamp(min=1)
        return F.normalize(self.media_proj(self.media_norm(pooled.to(self.media_proj.weight.dtype))), dim=-1)

    def embed_text(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D), positions bool (B, T) -> unit vectors (B, dim): mean over the chosen positions."""
        w = positions.to(hidden.dtype)[..., None]
        pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1)
        return F.normalize(self.text_proj(self.text_norm(pooled.to(self.text_proj.weight.dtype))), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100)).exp()  # CLIP caps the logit scale at 100


def info_nce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (image[i], text[i]) unit vectors; the other rows are negatives."""
    logits = scale * image @ text.t()  # (N, N)
    target = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits.float(), target) + F.cross_entropy(logits.t().float(), target)) / 2
