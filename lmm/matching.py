"""Image-text matching at inference (`bridge.itm`): the probability that a text describes an image, from the
fused model (the text reads the image through the bridge), e.g. to re-rank the top candidates of contrastive
retrieval as BLIP-2 does. A text is scored as the caption of a pair sample (`<image>text<|endofchunk|>`), the
rows the ITM loss trains on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmm.data.formats import MediaRef
from lmm.data.packing import Encoded, collate
from lmm.data.text import encode_document


@torch.no_grad()
def match(model, images: Sequence, texts: Sequence, batch_size: int = 16) -> torch.Tensor:
    """Matching probabilities: texts[i] a string -> (N,) for the pairs (images[i], texts[i]); texts[i] a list
    of K strings -> (N, K) for images[i] against each of its K candidates."""
    if getattr(model, "itm", None) is None:
        raise ValueError(
            "this model has no image-text matching head: build it with bridge.itm=true and train with itm_weight > 0"
        )
    images, texts = list(images), list(texts)
    if len(images) != len(texts):
        raise ValueError(
            f"match needs one text (or one list of candidates) per image: {len(images)} images, {len(texts)}"
        )
    nested = any(not isinstance(t, str) for t in texts)
    if nested and not all(not isinstance(t, str) and len(t) == len(texts[0]) for t in texts):
        raise ValueError("match: give every image a list of the same number of candidate texts (or one text each)")
    candidates = [list(t) for t in texts] if nested else [[t] for t in texts]
    pairs = [(i, t) for i, cands in enumerate(candidates) for t in cands]
    media = torch.cat(
        [
            model.encode_media(model.pixel_values(images[s : s + batch_size])[:, None, None].to(model.device))
            for s in range(0, len(images), batch_size)
        ]
    )  # (N, 1, L, D): each image once
    probs = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        enc = [encode_document([MediaRef(None), t], model.tokenizer) for _, t in chunk]
        batch = collate([Encoded(e.input_ids, e.labels) for e in enc], model.tokenizer.pad_token_id)  # right-padded
        which = torch.tensor([i for i, _ in chunk], device=media.device)
        logits = model.matching_logits(batch["input_ids"], batch["attention_mask"], media[which])
        probs.append(logits.float().softmax(-1)[:, 1].cpu())
    out = torch.cat(probs)
    return out.view(len(images), -1) if nested else out
