"""Image-text similarity through the contrastive head (`bridge.contrastive_dim > 0`): retrieval and zero-shot
scoring, BLIP-2 ITC style, with the very features the contrastive loss trains.

A text is embedded as the caption of a pair sample (`<image>text<|endofchunk|>`, the labelled tokens of
`encode_document`), read from `LMM.contrastive_text_states` (a text-only pass), as in training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmm.data.formats import MediaRef
from lmm.data.packing import Encoded, collate
from lmm.data.text import encode_document


def _head(model):
    if getattr(model, "contrastive", None) is None:
        raise ValueError(
            "this model has no contrastive head: build it with bridge.contrastive_dim > 0 and train "
            "with contrastive_weight > 0"
        )
    return model.contrastive


@torch.no_grad()
def image_embeddings(model, images: Sequence, batch_size: int = 64) -> torch.Tensor:
    """(N, dim) unit vectors, one per image (PIL images or paths)."""
    head, out = _head(model), []
    images = list(images)
    for i in range(0, len(images), batch_size):
        pix = model.pixel_values(images[i : i + batch_size])
        media = model.encode_media(pix[:, None, None].to(model.device))  # (n, 1, L, D)
        out.append(head.embed_media(media, torch.ones(media.shape[:2], dtype=torch.bool, device=media.device)))
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(model, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(N, dim) unit vectors, one per text, pooled over the tokens the contrastive loss pools in training."""
    head, out = _head(model), []
    for i in range(0, len(texts), batch_size):
        enc = [encode_document([MediaRef(None), t], model.tokenizer) for t in texts[i : i + batch_size]]
        batch = collate([Encoded(e.input_ids, e.labels) for e in enc], model.tokenizer.pad_token_id)  # right-padded
        hidden = model.contrastive_text_states(batch["input_ids"], batch["attention_mask"])
        out.append(head.embed_text(hidden, (batch["labels"] != -100).to(hidden.device)))
    return torch.cat(out)


def similarity(model, images: Sequence, texts: Sequence[str]) -> torch.Tensor:
    """(N_images, N_texts) cosine similarities; argmax over texts = zero-shot choice, over images = retrieval."""
    return image_embeddings(model, images) @ text_embeddings(model, texts).t()
