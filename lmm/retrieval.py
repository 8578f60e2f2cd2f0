"""Image-text similarity through the contrastive head (`bridge.contrastive_dim > 0`): retrieval and zero-shot
scoring, BLIP-2 ITC style, with the very features the contrastive loss trains.

A text is embedded as the caption of a pair sample (`<image>text<|endofchunk|>`, the labelled tokens of
`encode_document`), read from `LMM.contrastive_text_states` (a text-only pass), as in training.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lmm.data.formats import MediaRef
from lmm.data.text import encode_document
from lmm.generation import load_images


def _head(model):
    if getattr(model, "contrastive", None) is None:
        raise ValueError("this model has no contrastive head: build it with bridge.contrastive_dim > 0 and train "
                         "with contrastive_weight > 0")
    return model.contrastive


@torch.no_grad()
def image_embeddings(model, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """(N, dim) unit vectors, one per image (PIL images or paths)."""
    head, out = _head(model), []
    images = list(images)
    for i in range(0, len(images), batch_size):
        pix = torch.stack([model.image_processor(im) for im in load_images(images[i:i + batch_size])])
        media = model.encode_media(pix[:, None, None].to(model.device))  # (n, 1, L, D)
        out.append(head.embed_media(media, torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)))
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(N, dim) unit vectors, one per text, pooled over the tokens the contrastive loss pools in training."""
    head, out = _head(model), []
    pad = model.tokenizer.pad_token_id
    for i in range(0, len(texts), batch_size):
        enc = [encode_document([MediaRef(None), t], model.tokenizer) for t in texts[i:i + batch_size]]
        T = max(len(e.input_ids) for e in enc)
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        pos = torch.zeros((len(enc), T), dtype=torch.bool)
        for b, e in enumerate(enc):  # right padding
            n = len(e.input_ids)
            ids[b, :n], mask[b, :n] = torch.tensor(e.input_ids), 1
            pos[b, :n] = torch.tensor([lab != -100 for lab in e.labels])
        hidden = model.contrastive_text_states(ids, mask)
        out.append(head.embed_text(hidden, pos.to(hidden.device)))
    return torch.cat(out)


def similarity(model, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
    """(N_images, N_texts) cosine similarities; argmax over texts = zero-shot choice, over images = retrieval."""
    return image_embeddings(model, images) @ text_embeddings(model, texts).t()
