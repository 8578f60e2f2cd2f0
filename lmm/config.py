"""Typed configuration: dataclasses loadable from YAML and overridable with dotted `key=value`.

Unknown keys are errors that name the closest valid key, so a misspelling fails at start-up.
This module imports nothing from lmm.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-fixable problem in a configuration (unknown key, wrong type, bad value)."""


def require_bitsandbytes(what: str, fix: str) -> None:
    """Raise a ConfigError for `what` (e.g. "optim.eight_bit") unless bitsandbytes imports and CUDA is there;
    checked when a config is validated, before any model loads."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"{what} needs the bitsandbytes package: pip install 'lmm[quant]' (or pip install bitsandbytes), or {fix}"
        )
    if not torch.cuda.is_available():
        raise ConfigError(f"{what} needs a CUDA GPU (bitsandbytes' 4-bit and 8-bit kernels); {fix} on this machine")


class YamlConfig:
    """from_yaml / from_dict / to_dict / to_yaml for a config dataclass."""

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None):
        return load_yaml(cls, path, overrides)

    @classmethod
    def from_dict(cls, d: dict):
        return from_dict(cls, d)

    def to_dict(self) -> dict:
        return to_dict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- model config


@dataclass
class VisionConfig:
    """Frozen vision tower.

    kind: `open_clip` (any open_clip model by name; `pretrained` = local checkpoint file, or an open_clip
    tag whose weights are already cached), `hf` (CLIPVisionModel / SiglipVisionModel folder at `path`, or
    random weights from `hf_config`).
    """

    kind: Literal["open_clip", "hf"] = "open_clip"
    name: str = "ViT-B-32"  # open_clip model name (may be registered from `model_cfg`)
    pretrained: str | None = None  # local checkpoint path for open_clip
    path: str | None = None  # HF folder for kind=hf
    hf_config: dict | None = None  # HF vision config dict (model_type clip_vision_model / siglip_vision_model)
    model_cfg: dict | None = None  # open_clip model config dict, registered under `name`
    layer: int = -1  # which hidden layer's patch tokens to use (-1: final, -2: penultimate ...)
    include_cls: bool = True  # keep the CLS/pooled token among the visual tokens
    final_norm: bool = False  # open_clip ViT: the tower's final LayerNorm (ln_post) on the tokens (OpenFlamingo's)
    image_size: int | None = None  # override the preprocessing size (default: tower's own)
    mean: list[float] | None = None  # override preprocessing normalisation
    std: list[float] | None = None
    # hf towers: "shortest" (shortest side, centre crop: CLIP) or "squash" (both sides: SigLIP, IDEFICS); None: the
    # tower's usual one
    resize_mode: Literal["shortest", "squash"] | None = None


@dataclass
class EncoderConfig:
    """A frozen encoder for a modality other than images (`LMMConfig.encoders[modality]`): `kind` names a builder
    in `lmm.encoders.ENCODERS`, `options` go to it, `token` marks the media in text (default `<modality>`)."""

    kind: str = ""
    token: str | None = None
    options: dict = field(default_factory=dict)


@dataclass
class LanguageConfig:
    """Frozen causal LM: an HF folder (`path`), a GGUF file inside it (`gguf_file`), or a config dict."""

    path: str | None = None
    gguf_file: str | None = None
    hf_config: dict | None = None  # e.g. {"model_type": "llama", "hidden_size": 64, ...}: random weights
    tokenizer_path: str | None = None  # default: `path`
    # "auto": transformers' choice (SDPA where the family supports it, eager otherwise, e.g. Gemma-2's soft-capped
    # attention); or "sdpa", "eager", "flash_attention_2", "flex_attention"
    attn_implementation: str = "auto"
    load_in_4bit: bool = False  # QLoRA: bitsandbytes nf4 (CUDA only)
    # tokens whose logits are -inf: lmm's <|endofchunk|> in a converted model (IDEFICS, LLaVA) whose vocabulary never
    # had it, so its outputs stay the original's (clear it to fine-tune on interleaved data that ends chunks)
    suppress_tokens: list[str] = field(default_factory=list)


@dataclass
class PerceiverConfig:
    num_latents: int = 64
    depth: int = 6
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    max_media: int = 32  # media-time embeddings (position of the image in the sequence)
    max_frames: int = 8  # frame embeddings for video
    qk_norm: bool = False  # QK-normalised attention (Unified-IO 2)
    cosine_attn: bool = False  # scaled cosine attention: unit q and k times a learned scale <= 100 (Swin-v2)
    rope_2d: bool = False  # 2-D rotary positions on the image patch keys (square grid; a CLS token unrotated)
    ff_act: Literal["gelu", "relu"] = "gelu"  # the layers' MLP activation: relu = IDEFICS's perceiver


@dataclass
class CrossAttnConfig:
    every: int = 4  # a gated xattn block before every Nth decoder layer
    first_layer: int = 0  # index of the first decoder layer that gets one
    layers: list[int] | None = None  # explicit layer indices (overrides every/first_layer)
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    only_previous_image: bool = True  # Flamingo: attend to the immediately preceding image only
    qk_norm: bool = False
    cosine_attn: bool = False  # scaled cosine attention (Unified-IO 2, Swin-v2): logits bounded by a learned scale
    dense_without_media: bool = False  # text-only inputs still run each block's gated dense FFN (OpenFlamingo)
    # IDEFICS's block: norm=rms (RMSNorm pre-norms and q/k norms, eps norm_eps), ff_act=swiglu (a Llama MLP of width
    # ff_hidden), vector_gates (one tanh gate per channel); the defaults are Flamingo's
    norm: Literal["layer", "rms"] = "layer"
    norm_eps: float = 1e-5
    ff_act: Literal["gelu", "relu", "swiglu"] = "gelu"
    ff_hidden: int | None = None  # MLP width (default hidden_size * ff_mult)
    vector_gates: bool = False


@dataclass
class QFormerConfig:
    num_queries: int = 32
    depth: int = 2
    hidden: int = 256
    heads: int = 8
    ff_mult: int = 4
    cross_every: int = 1  # cross-attention to visual tokens in every Nth Q-Former layer (BLIP-2: 2)
    # "simple": learned queries only (no text inside); "blip2": BLIP-2's BERT Q-Former, queries and text sharing
    # its self-attention layers, pre-trained with ITC/ITM/ITG (lmm.training.qformer_pretrain) before stage 2
    variant: Literal["simple", "blip2"] = "simple"
    bert_path: str | None = None  # blip2: a local BERT folder (bert-base-uncased layout): its size, weights, vocab
    max_text_len: int = 64  # blip2: text position embeddings (and stage-1 caption truncation)
    embed_dim: int = 256  # blip2 stage 1: width of the image-text contrastive (ITC) space
    init_from: str | None = None  # blip2 stage 2: the stage-1 weights (qformer.safetensors written by stage 1)


@dataclass
class MMCAConfig:
    """Multimodal causal attention (DeepSpeed-VisualChat): text-to-image attention with its own projections."""

    every: int = 1  # a text-to-image attention block in every Nth decoder layer
    heads: int = 8
    head_dim: int = 64


@dataclass
class ProjectorConfig:
    depth: int = 2  # LLaVA-1.5: 2-layer MLP with GELU
    hidden_mult: int = 1


@dataclass
class BridgeConfig:
    kind: Literal["flamingo", "qformer", "projector", "mmca"] = "flamingo"
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    cross_attn: CrossAttnConfig = field(default_factory=CrossAttnConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)  # also mmca's visual tokens
    mmca: MMCAConfig = field(default_factory=MMCAConfig)
    use_perceiver: bool = True  # flamingo: False = a linear projection of the visual tokens instead
    # flamingo: > 0 adds an image-text contrastive head of this width (train it with contrastive_weight > 0;
    # LMM.similarity scores images against texts with it)
    contrastive_dim: int = 0
    # its text side: hidden states entering this decoder layer in a text-only pass (default: the middle layer)
    contrastive_text_layer: int | None = None
    # an image-text matching head on the fused last token, any bridge (train it with itm_weight > 0; LMM.match
    # scores image-text pairs with it, e.g. to re-rank contrastive retrieval)
    itm: bool = False


@dataclass
class LoraSettings:
    """LoRA adapters on the frozen LM via peft (r=0: off)."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LMMConfig(YamlConfig):
    """Everything needed to build an LMM (weights of the frozen parts come from paths)."""

    vision: VisionConfig = field(default_factory=VisionConfig)  # the image encoder
    encoders: dict[str, EncoderConfig] = field(default_factory=dict)  # more modalities, keyed by name
    language: LanguageConfig = field(default_factory=LanguageConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    dtype: str = "auto"  # frozen weights: auto = bf16 on CUDA, fp32 on CPU
    name: str = "lmm"
    system_prompt: str | None = None  # chat: used when a conversation brings no system message
    video_frames: int = 8  # frames sampled uniformly per video at inference (training writes its data.num_frames)


# --------------------------------------------------------------------------- generic loading


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):
            return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], d: dict, where: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys raise ConfigError with a suggestion."""
    if d is None:
        d = {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = f"{where}.{k}" if where else k
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint} (valid keys here: {sorted(names)})")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(d: dict, overrides: list[str] | None) -> dict:
    """Apply dotted overrides like `bridge.cross_attn.every=2` to a nested dict (values parsed as YAML)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node = node[p]
        node[parts[-1]] = _parse_scalar(text)
    return d


def load_yaml(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read a YAML file (or nothing) into dataclass `cls`, after applying dotted overrides."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
    return from_dict(cls, apply_overrides(d, overrides))
