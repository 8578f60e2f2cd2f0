"""Early fusion (LLaVA, BLIP-2): media tokens spliced into the LM's input embeddings at their markers."""

from __future__ import annotations

import torch
from torch import nn

from lmm.adapters import Projector, QFormer
from lmm.bridges.common import FusionInputs
from lmm.config import BridgeConfig


class EarlyFusion(nn.Module):
    """Each media marker token becomes the K resampled tokens of its media item (projector or Q-Former output
    at the LM's width); the LM runs unchanged on the longer sequence. Holds no weights itself."""

    def __init__(self, cfg: BridgeConfig, lm: nn.Module, media_dim: int):
        super().__init__()
        self.cfg, self.lm_dim = cfg, lm.get_input_embeddings().embedding_dim

    def attach(self, lm: nn.Module) -> None:
        """Nothing to put inside the LM: the media enter through its input embeddings."""

    def resampler(self, in_dim: int) -> nn.Module:
        """Per-modality resampler: media of width `in_dim` -> (B, M, K, lm_dim)."""
        c = self.cfg
        if c.kind == "qformer" and c.qformer.variant == "blip2":
            from lmm.blip2 import build_qformer  # weights: lmm.blip2.init_qformer at a training run's start

            return build_qformer(c.qformer, in_dim, self.lm_dim, max_frames=c.perceiver.max_frames)
        if c.kind == "qformer":
            q = c.qformer
            return QFormer(
                in_dim,
                self.lm_dim,
                q.num_queries,
                q.depth,
                q.hidden,
                q.heads,
                q.ff_mult,
                q.cross_every,
                c.perceiver.max_frames,
            )
        return Projector(in_dim, self.lm_dim, c.projector.depth, c.projector.hidden_mult, c.perceiver.max_frames)

    def forward(
        self, lm: nn.Module, x: FusionInputs, prefix_hidden: torch.Tensor | None = None, prefix_layer: int | None = None
    ):
        """(last hidden states, the LM's output, inputs as used: expanded embeddings, mask, labels, segments)."""
        if prefix_hidden is not None:
            raise ValueError("prefix_hidden (frozen-prefix replay) works with the flamingo bridge only")
        if x.media is not None and bool(x.is_media.any()):
            x = splice(x)
        out = lm.base_model(**x.lm_kwargs())
        return out.last_hidden_state, out, x


def splice(x: FusionInputs) -> FusionInputs:
    """Expand each media marker into the K media embeddings; a left-padded batch stays left-padded."""
    embeds, is_img, media, attention_mask = x.embeds, x.is_media, x.media, x.attention_mask
    B, T, D = embeds.shape
    K = media.shape[2]
    counts = torch.where(is_img, K, 1)
    total = counts.sum(1)
    Tn = int(total.max())
    left_padded = bool((attention_mask[:, 0] == 0).any()) and bool((attention_mask[:, -1] == 1).all())
    shift = (Tn - total) if left_padded else torch.zeros_like(total)
    start = counts.cumsum(1) - counts + shift[:, None]
    new_embeds = embeds.new_zeros(B, Tn, D)
    new_mask = attention_mask.new_zeros(B, Tn)
    bt, tt = (~is_img).nonzero(as_tuple=True)
    new_embeds[bt, start[bt, tt]] = embeds[bt, tt]
    new_mask[bt, start[bt, tt]] = attention_mask[bt, tt]
    bi, ti = is_img.nonzero(as_tuple=True)
    m_idx = (is_img.long().cumsum(1) - 1)[bi, ti]
    pos = start[bi, ti][:, None] + torch.arange(K, device=embeds.device)
    new_embeds[bi[:, None], pos] = media[bi, m_idx].to(embeds.dtype)
    new_mask[bi[:, None], pos] = attention_mask[bi, ti][:, None]
    new_labels = None
    if x.labels is not None:
        new_labels = x.labels.new_full((B, Tn), -100)
        new_labels[bt, start[bt, tt]] = x.labels[bt, tt]
    new_seg = None
    if x.segment_ids is not None:
        seg = x.segment_ids
        new_seg = seg.new_full((B, Tn), -1)
        new_seg[bt, start[bt, tt]] = seg[bt, tt]
        new_seg[bi[:, None], pos] = seg[bi, ti][:, None]
        new_seg = torch.where(new_seg < 0, seg.max() + 1, new_seg)  # padding slots form their own segment
    return x.replace(
        embeds=new_embeds,
        is_media=torch.zeros_like(new_mask, dtype=torch.bool),
        attention_mask=new_mask,
        labels=new_labels,
        segment_ids=new_seg,
        position_ids=None,
        unpadded=False,
    )
