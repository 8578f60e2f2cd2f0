"""What training does to a model before the first step: frozen new-token rows, activation
checkpointing, compilation. Nothing here changes parameter names, so saved weights stay loadable.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def new_token_rows(model: nn.Module) -> list[nn.Parameter]:
    """The `<image>` / `<|endofchunk|>` rows of the input embedding and output head."""
    return [m.extra for m in (getattr(model, "embed", None), getattr(model, "head", None))
            if m is not None and isinstance(getattr(m, "extra", None), nn.Parameter)]


def freeze_new_token_rows(model: nn.Module) -> None:
    """Keep the new token rows at their initial values: with no LoRA, nothing below the lowest
    cross-attention layer then needs a gradient, so backward stops there (much cheaper on CPU)."""
    for p in new_token_rows(model):
        p.requires_grad_(False)
    model._lmm_frozen_rows = True


@contextlib.contextmanager
def saveable(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily mark frozen new-token rows trainable so `save_pretrained` writes every bridge weight
    (a saved model always holds them; `LMM.from_pretrained` expects them)."""
    rows = new_token_rows(model) if getattr(model, "_lmm_frozen_rows", False) else []
    for p in rows:
        p.requires_grad_(True)
    try:
        yield model
    finally:
        for p in rows:
            p.requires_grad_(False)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in backward (non-reentrant `torch.utils.checkpoint`),
    by wrapping the layer's forward in place. Returns the number of layers wrapped."""
    from lmm.fusion import find_layer_list

    count = 0
    for layer in find_layer_list(model.lm):
        if getattr(layer, "_lmm_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._lmm_checkpointed = True
        count += 1
    return count


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile` in place (parameter names unchanged)."""
    model.compile(dynamic=True)
    return model
