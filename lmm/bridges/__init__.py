"""Bridges between the media and the frozen LM: `DeepFusion` (Flamingo's gated cross-attention inside the
decoder) and `EarlyFusion` (media tokens in the input sequence: projector, Q-Former). Each makes the resamplers
of its kind and runs the LM in a forward of a few lines; `build_bridge` is the one place that reads the kind."""

from __future__ import annotations

from torch import nn

from lmm.bridges.common import FusionInputs, positions_from_mask, positions_from_segments
from lmm.bridges.deep_fusion import DeepFusion
from lmm.bridges.early_fusion import EarlyFusion
from lmm.bridges.mmca import MultimodalCausalAttention
from lmm.config import BridgeConfig, ConfigError

BRIDGES = {
    "flamingo": DeepFusion,
    "qformer": EarlyFusion,
    "projector": EarlyFusion,
    "mmca": MultimodalCausalAttention,
}


def build_bridge(cfg: BridgeConfig, lm: nn.Module, media_dim: int) -> nn.Module:
    """The bridge for `cfg.kind` (`bridge.resampler(dim)` makes resamplers; `bridge.attach(lm)` then puts its
    blocks into the LM, where it has any)."""
    if cfg.kind not in BRIDGES:
        raise ConfigError(f"bridge.kind must be one of {', '.join(BRIDGES)}; got {cfg.kind!r}")
    return BRIDGES[cfg.kind](cfg, lm, media_dim)


__all__ = [
    "DeepFusion",
    "EarlyFusion",
    "FusionInputs",
    "MultimodalCausalAttention",
    "build_bridge",
    "positions_from_mask",
    "positions_from_segments",
]
