"""The KV cache a decode loop starts with: transformers' dynamic cache (it grows by concatenating every step's
keys/values) or its `StaticCache` (preallocated for the prompt plus the new tokens and written in place: no
per-step copy of the whole cache, and fixed shapes, which torch.compile and CUDA graphs need)."""

from __future__ import annotations

import torch

CACHE_KINDS = ("dynamic", "static")


def check_cache_kind(kind: str) -> None:
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache={kind!r}: choose one of {', '.join(CACHE_KINDS)}")


def new_cache(model, kind: str, input_ids: torch.Tensor, media: torch.Tensor | None, max_new_tokens: int):
    """None for "dynamic" (the LM makes its own), else a StaticCache with room for every LM position of the prompt
    and `max_new_tokens` more. A bridge that splices media into the sequence (`media_in_sequence`, the default)
    may turn a marker into up to L positions per media item: the room counts M x L more (unused slots are never
    attended to: the causal mask stops at the current position)."""
    check_cache_kind(kind)
    if kind == "dynamic":
        return None
    if not getattr(model.bridge, "static_cache", True):
        raise ValueError(f"the {model.config.bridge.kind} bridge decodes with cache='dynamic' only")
    from transformers import StaticCache

    length = input_ids.shape[1] + max_new_tokens
    if media is not None and getattr(model.bridge, "media_in_sequence", True):
        length += media.shape[1] * media.shape[2]
    return StaticCache(config=model.lm.config, max_cache_len=length)
