"""What every bridge hands the frozen LM: token embeddings, masks and positions for one forward call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0 at each row's first real token (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every segment boundary (packed rows)."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    seg_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - seg_start


@dataclass
class FusionInputs:
    """One forward call's inputs after media encoding; a bridge may return a changed copy (early fusion expands
    each media token into the media's tokens)."""

    embeds: torch.Tensor  # (B, T, D) input embeddings
    is_media: torch.Tensor  # bool (B, T): media marker tokens (`<image>`, ...)
    attention_mask: torch.Tensor  # (B, past + T); all ones when `unpadded`
    unpadded: bool = False  # no padding anywhere: the LM builds a plain causal mask (no host sync in HF's builder)
    media: torch.Tensor | None = None  # (B, M, L, Dm) resampled media, in text order
    media_offset: torch.Tensor | None = None  # (B,) media consumed by earlier (cached) tokens
    media_kv: dict | None = None  # deep fusion: media keys/values per block, kept across decode steps
    position_ids: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None  # (B, T) packed rows: attention stays within a segment
    labels: torch.Tensor | None = None
    past_key_values: Any = None
    use_cache: bool = False

    def replace(self, **changes) -> FusionInputs:
        return replace(self, **changes)

    def positions(self) -> torch.Tensor:
        if self.position_ids is not None:
            return self.position_ids
        if self.segment_ids is not None:
            return positions_from_segments(self.segment_ids)
        return positions_from_mask(self.attention_mask)[:, -self.embeds.shape[1] :]

    def lm_kwargs(self) -> dict:
        """Keyword arguments for the LM's base model (`lm.base_model(**kwargs)`)."""
        mask = None if self.segment_ids is not None or self.unpadded else self.attention_mask
        return dict(
            inputs_embeds=self.embeds,
            attention_mask=mask,
            position_ids=self.positions(),
            past_key_values=self.past_key_values,
            use_cache=self.use_cache,
        )
