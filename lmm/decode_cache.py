"""The KV cache a decode loop starts with, and the forward its steps run: transformers' dynamic cache (it grows by
concatenating every step's keys/values) or its `StaticCache` (preallocated for the prompt plus the new tokens and
written in place: no per-step copy of the whole cache, and fixed shapes), over which the step can run
`torch.compile`d (`compile=`: one graph per batch size and cache bucket, CUDA graphs on a GPU)."""

from __future__ import annotations

import torch

CACHE_KINDS = ("dynamic", "static")
# A compiled step's static cache length is rounded up to a multiple of this, so that prompts of different lengths
# reuse one graph instead of compiling again.
COMPILE_BUCKET = 256


def check_cache_kind(kind: str) -> None:
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache={kind!r}: choose one of {', '.join(CACHE_KINDS)}")


def new_cache(
    model, kind: str, input_ids: torch.Tensor, media: torch.Tensor | None, max_new_tokens: int, bucket: int = 1
):
    """None for "dynamic" (the LM makes its own), else a StaticCache with room for every LM position of the prompt
    and `max_new_tokens` more, rounded up to a multiple of `bucket`. A bridge that splices media into the sequence
    (`media_in_sequence`, the default) may turn a marker into up to L positions per media item: the room counts
    M x L more (unused slots are never attended to: the causal mask stops at the current position)."""
    check_cache_kind(kind)
    if kind == "dynamic":
        return None
    if not getattr(model.bridge, "static_cache", True):
        raise ValueError(
            f"the {model.config.bridge.kind} bridge decodes with cache='dynamic' only (and without compile)"
        )
    from transformers import StaticCache

    length = input_ids.shape[1] + max_new_tokens
    if media is not None and getattr(model.bridge, "media_in_sequence", True):
        length += media.shape[1] * media.shape[2]
    return StaticCache(config=model.lm.config, max_cache_len=-(-length // bucket) * bucket)


def step_forward(model, compile):
    """The forward a decode step calls: the model itself, or (`compile`: True for inductor, else any backend
    torch.compile takes, a name or a callable) its forward compiled once per model and backend and kept while the
    model lives. The first step of each batch size and cache bucket compiles (tens of seconds on a CPU); mode
    "reduce-overhead" (CUDA graphs) on a GPU."""
    if not compile:
        return model
    backend = "inductor" if compile is True else compile
    # kept on the model itself (a cycle the garbage collector frees with it; a global map would keep it alive)
    per_model = model.__dict__.setdefault("_compiled_decode_steps", {})
    if backend not in per_model:
        mode = "reduce-overhead" if model.device.type == "cuda" and backend == "inductor" else None
        per_model[backend] = torch.compile(model.forward, backend=backend, mode=mode, dynamic=False)
    return per_model[backend]
