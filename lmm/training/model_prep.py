"""What training does to a model before the first step: frozen new-token rows, compilation (activation
checkpointing is `LMM.gradient_checkpointing_enable`). Nothing here changes parameter names, so saved weights
stay loadable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def new_token_rows(model: nn.Module) -> list[nn.Parameter]:
    """The `<image>` / `<|endofchunk|>` rows of the input embedding and output head."""
    return [
        m.extra
        for m in (getattr(model, "embed", None), getattr(model, "head", None))
        if m is not None and isinstance(getattr(m, "extra", None), nn.Parameter)
    ]


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


def compile_model(model: nn.Module) -> nn.Module:
    """`torch.compile` in place (parameter names unchanged)."""
    model.compile(dynamic=True)
    return model
