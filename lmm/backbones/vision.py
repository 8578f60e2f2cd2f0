"""Frozen vision towers that turn images into per-patch tokens, with their own preprocessing.

`build_vision_tower(cfg)` returns a `VisionTower`: forward((B, C, H, W)) -> (B, N, D), `.dim`, `.preprocess`
(PIL image or uint8 tensor -> normalised (C, H, W)). Weights load from local paths only.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmm.backbones.image_transform import ImageTransform
from lmm.config import ConfigError, VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTower(nn.Module):
    """A frozen encoder; subclasses implement `encode` ((B, C, H, W) -> (B, N, D))."""

    dim: int
    preprocess: Callable  # image -> normalised (C, H, W); an ImageTransform where the tower's preprocessing allows

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised pixels, or uint8 pixels (resized, not yet normalised: see ImageTransform)."""
        dtype = next(self.parameters()).dtype
        with torch.no_grad():
            if pixel_values.dtype == torch.uint8:
                if not callable(getattr(self.preprocess, "normalize", None)):
                    raise ValueError(
                        "uint8 pixel_values need a tower whose preprocess has resize_crop/normalize "
                        "(an ImageTransform: it knows the mean/std); pass normalised float pixels"
                    )
                return self.encode(self.preprocess.normalize(pixel_values, dtype))
            return self.encode(pixel_values.to(dtype))

    def train(self, mode: bool = True):  # always eval: frozen, no dropout/batch-norm updates
        return super().train(False)


class OpenClipVision(VisionTower):
    """open_clip `model.visual`: a ViT (tokens from a chosen block) or a timm trunk (final feature map)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        import open_clip

        if cfg.model_cfg is not None:
            register_open_clip_config(cfg.name, cfg.model_cfg)
        if cfg.pretrained is not None and not Path(cfg.pretrained).is_file() and "/" in cfg.pretrained:
            raise ConfigError(f"vision.pretrained: checkpoint file not found: {cfg.pretrained}")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.name,
                pretrained=cfg.pretrained,
                force_image_size=cfg.image_size,
                image_mean=tuple(cfg.mean) if cfg.mean else None,
                image_std=tuple(cfg.std) if cfg.std else None,
            )
        except RuntimeError as e:
            raise ConfigError(
                f"open_clip could not build '{cfg.name}' (pretrained={cfg.pretrained!r}): {e}. "
                "Pass a local checkpoint path as vision.pretrained; nothing is downloaded."
            ) from e
        self.visual = model.visual
        del model
        # the same pixels as open_clip's PIL transform, faster; its own transform where ours does not match it
        self.preprocess = ImageTransform.from_open_clip(getattr(self.visual, "preprocess_cfg", {}) or {}) or preprocess
        self.layer, self.include_cls, self.final_norm = cfg.layer, cfg.include_cls, cfg.final_norm
        if cfg.final_norm and not hasattr(self.visual, "ln_post"):
            raise ConfigError("vision.final_norm needs an open_clip ViT tower (with ln_post); set it false")
        self.is_vit = hasattr(self.visual, "transformer")
        if self.is_vit:
            self.dim = self.visual.transformer.width
            self.num_blocks = len(self.visual.transformer.resblocks)
        else:
            if cfg.layer != -1:
                raise ConfigError("vision.layer is only supported for ViT towers; use -1 for timm trunks")
            with torch.no_grad():
                size = preprocess.transforms[0].size if hasattr(preprocess.transforms[0], "size") else 224
                size = size[0] if isinstance(size, (tuple, list)) else size
                self.dim = self.visual.trunk.forward_features(torch.zeros(1, 3, size, size)).shape[1]
        self.requires_grad_(False)
        self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            fmap = self.visual.trunk.forward_features(x)  # (B, C, h, w)
            return fmap.flatten(2).transpose(1, 2)
        idx = self.layer % self.num_blocks
        out = self.visual.forward_intermediates(
            x,
            indices=[idx],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.include_cls,
            normalize_intermediates=self.final_norm,
        )
        tokens = out["image_intermediates"][0]
        if tokens.ndim == 4:  # NCHW fallback
            tokens = tokens.flatten(2).transpose(1, 2)
        if self.include_cls and out.get("image_intermediates_prefix"):
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens


def register_open_clip_config(name: str, model_cfg: dict) -> None:
    """Make `model_cfg` known to open_clip as `name`. The name comes from a model folder's config (untrusted):
    a plain identifier only, so the file open_clip reads it from stays inside a private temporary folder."""
    import open_clip

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
        raise ConfigError(
            f"vision.name {name!r}: with vision.model_cfg the name must be a plain identifier "
            "(letters, digits, '.', '_', '-')"
        )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.json")
        with open(path, "w") as f:
            json.dump(model_cfg, f)
        open_clip.add_model_config(path)


class HFVision(VisionTower):
    """HF `CLIPVisionModel` / `SiglipVisionModel` (or any vision model with hidden states) from a folder."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if cfg.path is not None:
            if not Path(cfg.path).is_dir():
                raise ConfigError(f"vision.path: HF model folder not found: {cfg.path}")
            self.model = AutoModel.from_pretrained(cfg.path, attn_implementation="sdpa")
        elif cfg.hf_config is not None:
            d = dict(cfg.hf_config)
            if "model_type" not in d:
                raise ConfigError("vision.hf_config needs a model_type (clip_vision_model or siglip_vision_model)")
            self.model = AutoModel.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
        else:
            raise ConfigError("vision.kind=hf needs vision.path (an HF folder) or vision.hf_config")
        c = self.model.config
        self.dim = c.hidden_size
        self.layer = cfg.layer
        self.has_cls = "clip" in c.model_type
        self.include_cls = cfg.include_cls
        size = cfg.image_size or c.image_size
        siglip = "siglip" in c.model_type
        mean = cfg.mean or ((0.5, 0.5, 0.5) if siglip else CLIP_MEAN)
        std = cfg.std or ((0.5, 0.5, 0.5) if siglip else CLIP_STD)
        resize = cfg.resize_mode or ("squash" if siglip else "shortest")
        self.preprocess = ImageTransform(size, tuple(mean), tuple(std), "bicubic", resize)
        self.requires_grad_(False)
        self.eval()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x, output_hidden_states=True)
        tokens = out.hidden_states[self.layer]
        if self.has_cls and not self.include_cls:
            tokens = tokens[:, 1:]
        return tokens


def build_vision_tower(cfg: VisionConfig) -> VisionTower:
    if cfg.kind == "open_clip":
        return OpenClipVision(cfg)
    if cfg.kind == "hf":
        return HFVision(cfg)
    raise ConfigError(f"vision.kind must be open_clip or hf, got {cfg.kind!r}")
