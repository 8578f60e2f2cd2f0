"""Frozen media encoders, one per modality, behind one small contract.

An encoder is a frozen `nn.Module` with `dim` (feature width), `token` (its marker in text, e.g. `<image>`) and
`preprocess` (one raw item -> tensor); `forward(items)` maps a batch of preprocessed items (n, ...) to features
(n, N, dim). The model does the (batch, media, frames) bookkeeping around it, so every modality gets masks,
resampling and fusion alike. The image encoder comes from `LMMConfig.vision` (lmm.backbones.vision); any other
modality from `LMMConfig.encoders[name]`, built by `ENCODERS[kind]`: a new modality is one file plus one entry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lmm.config import ConfigError, EncoderConfig


def _whisper(modality: str, cfg: EncoderConfig) -> nn.Module:
    from lmm.encoders.audio import build_whisper  # imported when built: no import-time cost or side effect

    return build_whisper(modality, cfg)


def _hf_audio(modality: str, cfg: EncoderConfig) -> nn.Module:
    from lmm.encoders.audio import build_hf_audio

    return build_hf_audio(modality, cfg)


# kind -> builder(modality name, EncoderConfig) -> encoder module
ENCODERS: dict[str, Callable[[str, EncoderConfig], nn.Module]] = {"whisper": _whisper, "hf_audio": _hf_audio}


def build_encoder(modality: str, cfg: EncoderConfig) -> nn.Module:
    """The frozen encoder for `modality`, with its `token` set (`cfg.token` or `<modality>`)."""
    if cfg.kind not in ENCODERS:
        raise ConfigError(
            f"encoders.{modality}.kind={cfg.kind!r} is not a known encoder kind "
            f"({', '.join(sorted(ENCODERS)) or 'none registered'})"
        )
    encoder = ENCODERS[cfg.kind](modality, cfg)
    encoder.token = cfg.token or f"<{modality}>"
    for attr in ("dim", "preprocess"):
        if not hasattr(encoder, attr):
            raise ConfigError(f"encoder kind {cfg.kind!r} built a module without `{attr}`")
    encoder.requires_grad_(False)
    return encoder.eval()
