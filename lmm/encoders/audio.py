"""Frozen audio encoders: HF Whisper's encoder (`kind: whisper`) and any HF audio model that returns
`last_hidden_state` through `AutoModel` (`kind: hf_audio`: AST, wav2vec2, HuBERT ...), each with the feature
extractor of its own folder, or random weights from `hf_config` (tests).

One clip is one media item and its fixed windows are the item's frames: `preprocess(waveform)` cuts mono
samples at `sampling_rate` into `ceil(seconds / window)` chunks (Whisper: 30 s -> 80 x 3000 log-mel; the last
chunk padded with silence, as Whisper pads) and returns (chunks, ...); `forward((n, ...))` -> (n, N, dim). The
model's (batch, media, frames) bookkeeping does the rest. A clip of more than `max_chunks` windows is refused
with the limit named, never cut. `pool: k` averages every k output positions (Whisper's 1500 per window -> 1500/k),
which is what makes Whisper's tokens affordable for a projector or cross-attention.

    encoders: {audio: {kind: whisper, options: {path: /models/whisper-tiny.en, pool: 4, max_chunks: 8}}}
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmm.config import ConfigError, EncoderConfig

OPTIONS = {"path", "hf_config", "feature_extractor", "pool", "max_chunks", "chunk_seconds"}
DEFAULT_MAX_CHUNKS = 8  # = bridge.perceiver.max_frames' default: 8 x 30 s = 4 minutes of Whisper audio


class AudioEncoder(nn.Module):
    """A frozen HF audio model + its feature extractor, behind the encoder contract (lmm.encoders)."""

    def __init__(self, modality: str, cfg: EncoderConfig, whisper: bool):
        super().__init__()
        o = dict(cfg.options)
        where = f"encoders.{modality}.options"
        known = OPTIONS - {"chunk_seconds"} if whisper else OPTIONS  # Whisper's window is fixed: 30 s
        if set(o) - known:
            raise ConfigError(f"{where}: unknown option(s) {sorted(set(o) - known)}; known: {sorted(known)}")
        if (o.get("path") is None) == (o.get("hf_config") is None):
            raise ConfigError(f"{where} needs exactly one of path (a local HF folder) or hf_config (random weights)")
        self.where, self.whisper = where, whisper
        self.weights_from_path = o.get("path") is not None
        if self.weights_from_path:
            self.model, self.feature_extractor = _from_folder(Path(o["path"]), whisper, where)
        else:
            self.model, self.feature_extractor = _from_config(dict(o["hf_config"]), o.get("feature_extractor"), whisper)
        self.model.requires_grad_(False)
        self.model.eval()
        c = self.model.config
        self.dim = int(c.d_model if whisper else c.hidden_size)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        self.input_name = "input_features" if whisper else self.feature_extractor.model_input_names[0]
        self.pool = _positive_int(o.get("pool", 1), f"{where}.pool")
        self.max_chunks = _positive_int(o.get("max_chunks", DEFAULT_MAX_CHUNKS), f"{where}.max_chunks")
        seconds = o.get("chunk_seconds") or _window_seconds(self.feature_extractor)
        self.chunk_samples = int(round(float(seconds) * self.sampling_rate))
        if self.chunk_samples <= 0:
            raise ConfigError(f"{where}.chunk_seconds={seconds!r} must be positive")
        if whisper:
            positions = c.max_source_positions
            if positions % self.pool:
                divisors = [k for k in range(1, positions + 1) if positions % k == 0][:12]
                raise ConfigError(
                    f"{where}.pool={self.pool} must divide Whisper's {positions} positions per window (e.g. {divisors})"
                )
            self.tokens_per_chunk = positions // self.pool
        else:
            with torch.no_grad():
                self.tokens_per_chunk = self.forward(self.preprocess(np.zeros(self.chunk_samples, np.float32))).shape[1]

    def check_length(self, n_samples: int) -> int:
        """The number of windows of a clip of `n_samples` samples; a ValueError naming the limit when it is more
        than `max_chunks` (cheap: callers check a clip before anything is computed from it)."""
        n = math.ceil(n_samples / self.chunk_samples)
        if n > self.max_chunks:
            window = self.chunk_samples / self.sampling_rate
            raise ValueError(
                f"an audio clip of {n_samples / self.sampling_rate:.1f} s is {n} windows of {window:g} s, more than "
                f"{self.where}.max_chunks={self.max_chunks} (at most {self.max_chunks * window:g} s); raise "
                "max_chunks (and bridge.perceiver.max_frames with it) or split the clip (nothing is truncated)"
            )
        return n

    def preprocess(self, waveform) -> torch.Tensor:
        """Mono samples (n,) at `sampling_rate` (lmm.data.audio.decode_audio) -> features (chunks, ...)."""
        x = np.asarray(waveform.detach().cpu() if hasattr(waveform, "detach") else waveform, dtype=np.float32)
        if x.ndim != 1 or x.size == 0:
            raise ValueError(
                f"audio preprocess takes mono samples (n,) at {self.sampling_rate} Hz, got shape {x.shape}; "
                "decode files with lmm.data.audio.decode_audio(value, encoder.sampling_rate)"
            )
        n = self.check_length(x.size)
        x = np.pad(x, (0, n * self.chunk_samples - x.size))  # silence after the clip, as Whisper pads
        chunks = list(x.reshape(n, self.chunk_samples))
        feats = self.feature_extractor(chunks, sampling_rate=self.sampling_rate, return_tensors="pt")
        return feats[self.input_name].float()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Features (n, ...) from `preprocess` -> frozen hidden states (n, N, dim), N = positions / pool."""
        p = next(self.model.parameters())
        with torch.no_grad():
            h = self.model(**{self.input_name: items.to(device=p.device, dtype=p.dtype)}).last_hidden_state
            if self.pool > 1:
                h = F.avg_pool1d(h.transpose(1, 2), self.pool, self.pool, ceil_mode=True).transpose(1, 2)
        return h

    def train(self, mode: bool = True):  # always eval: frozen, no dropout
        return super().train(False)


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive whole number")
    return value


def _window_seconds(fe) -> float:
    """The encoder's window: Whisper 30 s (n_samples), AST its max_length frames of 10 ms, else 30 s."""
    if getattr(fe, "n_samples", None):
        return fe.n_samples / fe.sampling_rate
    if type(fe).__name__ == "ASTFeatureExtractor":
        return (fe.max_length - 1) * 0.01 + 0.025  # 25 ms kaldi frames every 10 ms: exactly max_length frames
    return 30.0


def _from_folder(path: Path, whisper: bool, where: str):
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    if not path.is_dir():
        raise ConfigError(f"{where}.path: HF model folder not found: {path}")
    if not (path / "preprocessor_config.json").is_file():
        raise ConfigError(f"{where}.path: {path} has no preprocessor_config.json (the feature extractor)")
    model_type = AutoConfig.from_pretrained(path).model_type
    if whisper != (model_type == "whisper"):
        other = "whisper" if model_type == "whisper" else "hf_audio"
        raise ConfigError(f"{where}.path: {path} holds a {model_type!r} model; use kind: {other}")
    fe = AutoFeatureExtractor.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    if whisper:  # WhisperModel (also from a WhisperForConditionalGeneration folder): keep the encoder only
        model = model.get_encoder()
    return model, fe


def _from_config(hf_config: dict, fe_options: dict | None, whisper: bool):
    from transformers import AutoConfig, AutoModel, WhisperFeatureExtractor
    from transformers.models.auto.feature_extraction_auto import (
        FEATURE_EXTRACTOR_MAPPING_NAMES,
        feature_extractor_class_from_name,
    )
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    model_type = hf_config.pop("model_type", "whisper" if whisper else None)
    if model_type is None:
        raise ConfigError(
            "hf_audio hf_config needs a model_type (e.g. wav2vec2, hubert, audio-spectrogram-transformer)"
        )
    config = AutoConfig.for_model(model_type, **hf_config)
    fe_options = dict(fe_options or {})
    if whisper:
        if model_type != "whisper":
            raise ConfigError(f"kind whisper needs hf_config.model_type whisper, got {model_type!r}")
        fe_options.setdefault("feature_size", config.num_mel_bins)
        return WhisperEncoder(config), WhisperFeatureExtractor(**fe_options)
    name = FEATURE_EXTRACTOR_MAPPING_NAMES.get(model_type)
    if name is None:
        raise ConfigError(f"hf_audio: no feature extractor is known for model_type {model_type!r}")
    return AutoModel.from_config(config), feature_extractor_class_from_name(name)(**fe_options)


def build_whisper(modality: str, cfg: EncoderConfig) -> AudioEncoder:
    return AudioEncoder(modality, cfg, whisper=True)


def build_hf_audio(modality: str, cfg: EncoderConfig) -> AudioEncoder:
    return AudioEncoder(modality, cfg, whisper=False)
