"""Image-text similarity from an open_clip model given by path (MMC4's filter): cosine of the normalised image and
text embeddings. Nothing is downloaded: the weights are a local file, the architecture an open_clip name or a
model-config JSON file (registered under the file's stem)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmm.config import ConfigError


class ClipSimilarity:
    """`scorer(images, texts) -> [cosine similarity]` for paired PIL images and texts."""

    def __init__(self, model: str, checkpoint: str, device: str | torch.device = "cpu"):
        import open_clip

        if not os.path.isfile(os.path.expanduser(checkpoint)):
            raise ConfigError(f"--clip-checkpoint {checkpoint}: no such file (an open_clip .safetensors/.pt file)")
        name = model
        if model.endswith(".json"):
            if not os.path.isfile(model):
                raise ConfigError(f"--clip-model {model}: no such model-config file")
            open_clip.add_model_config(model)
            name = Path(model).stem
        if name not in open_clip.list_models():
            raise ConfigError(f"--clip-model {model!r}: not an open_clip architecture (nor a model-config .json)")
        self.device = torch.device(device)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            name, pretrained=os.path.expanduser(checkpoint), device=self.device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)

    @torch.no_grad()
    def __call__(self, images: list, texts: list[str]) -> list[float]:
        pix = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        img = self.model.encode_image(pix, normalize=True)
        txt = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)
        return (img.float() * txt.float()).sum(-1).tolist()
