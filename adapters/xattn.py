"""GATED XATTN-DENSE (Flamingo): text tokens cross-attend to resampled visual tokens, then a dense FFN,
each behind a tanh gate initialised at 0 so the frozen LM is unchanged at the start of training."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, feed_forward, norm_layer


def media_mask(
    text_media_idx: torch.Tensor,
    num_media: int,
    only_previous: bool = True,
    text_segment: torch.Tensor | None = None,
    media_segment: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which media each text token may see: bool (B, T, M).

    text_media_idx (B, T): number of `<image>` tokens at or before each position (0 = no image yet).
    Flamingo masking: only the immediately preceding image (`only_previous`) or all previous ones.
    With packed rows, `text_segment` (B, T) and `media_segment` (B, M) keep media within their sample.
    """
    m = torch.arange(1, num_media + 1, device=text_media_idx.device)  # 1-based media index
    idx = text_media_idx.unsqueeze(-1)  # (B, T, 1)
    mask = (m == idx) if only_previous else (m <= idx)
    if text_segment is not None and media_segment is not None:
        mask = mask & (text_segment.unsqueeze(-1) == media_segment.unsqueeze(1))
    return mask


class GatedCrossAttentionBlock(nn.Module):
    """x (B, T, D) + tanh(g_a) * xattn(x -> media) ; then + tanh(g_f) * ffn. Tokens with no visible media get
    no cross-attention output."""

    def __init__(
        self,
        dim: int,
        media_dim: int,
        heads: int = 8,
        head_dim: int = 64,
        ff_mult: int = 4,
        qk_norm: bool = False,
        cosine: bool = False,
        norm: str = "layer",
        norm_eps: float = 1e-5,
        ff_act: str = "gelu",
        ff_hidden: int | None = None,
        vector_gates: bool = False,
    ):
        # norm="rms", ff_act="swiglu", vector_gates: IDEFICS's block (RMSNorm pre-norms and q/k norms, a Llama MLP,
        # one tanh gate per channel); the defaults are Flamingo's
        super().__init__()
        self.norm = norm_layer(norm, dim, norm_eps)
        self.attn = Attention(
            dim, media_dim, heads=heads, head_dim=head_dim, qk_norm=qk_norm, cosine=cosine, norm=norm, norm_eps=norm_eps
        )
        self.attn_gate = nn.Parameter(torch.zeros(dim if vector_gates else 1))
        self.ff = feed_forward(dim, ff_mult, ff_act, norm, norm_eps, ff_hidden)
        self.ff_gate = nn.Parameter(torch.zeros(dim if vector_gates else 1))

    def forward(
        self, x: torch.Tensor, media: torch.Tensor, visible: torch.Tensor, kv_cache: dict | None = None
    ) -> torch.Tensor:
        # media: (B, M, L, Dv); visible: bool (B, T, M) from `media_mask`. kv_cache: a dict the caller keeps for
        # as long as `media` stays the same (one generation): this block's keys/values of the media are computed
        # on the first call and read back on the next ones (decode steps), instead of projected every step.
        B, M, L, _ = media.shape
        has_media = visible.any(-1, keepdim=True)  # (B, T, 1)
        # Boolean mask shared by all heads, (B, 1, T, M*L): tokens without media attend to everything (avoids
        # NaN rows in SDPA) and their output is zeroed below.
        mask = (visible | ~has_media).repeat_interleave(L, dim=-1).unsqueeze(1)
        context = media.reshape(B, M * L, -1)
        kv = None
        if kv_cache is not None:
            kv = kv_cache.get(id(self))
            if kv is None:
                kv = kv_cache[id(self)] = self.attn.keys_values(context)
        attn = self.attn(self.norm(x), context, mask, kv=kv)
        x = x + torch.tanh(self.attn_gate) * attn * has_media.to(attn.dtype)
        return x + torch.tanh(self.ff_gate) * self.ff(x)
