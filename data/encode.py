"""One parsed Sample -> decoded media -> an `Encoded` sample (token ids, labels, media tensors).

Split in two so the expensive half (decoding) can be cached by the repeat buffer while the cheap
half (image transform, i.e. augmentation, and tokenisation) runs again at every use.

Fast path: an image processor with `resize_crop` and `normalize` methods (lmm's `ImageTransform`) gets
uint8 tensors decoded by torchvision and returns uint8 media, which the model normalises on its device;
any other callable gets PIL images and returns float tensors, as torchvision/open_clip transforms expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from lmm.chat import with_system_prompt

from .errors import BadSample
from .formats import MediaRef, Sample
from .media import decode_image, decode_image_tensor
from .packing import Encoded
from .text import encode_conversation, encode_document, media_token_ids, truncate
from .video import sample_frames


@dataclass
class SampleEncoder:
    """Everything the model side decides about a sample: tokenizer, image transform, limits."""

    tokenizer: object
    image_transform: Callable[[Image.Image], torch.Tensor]
    max_tokens: int = 512
    max_images: int = 8
    too_many_images: str = "skip"  # or "truncate"
    num_frames: int = 8
    system_prompt: str | None = None  # the model's default system message (conversations without one get it)

    def __post_init__(self):
        self.image_id, self.eoc_id = media_token_ids(self.tokenizer)
        # the uint8 protocol (lmm's ImageTransform): resize_crop here, normalize in the vision tower
        self._uint8 = all(callable(getattr(self.image_transform, f, None)) for f in ("resize_crop", "normalize"))
        self._to_pixels = self.image_transform.resize_crop if self._uint8 else self.image_transform

    def limit_media(self, sample: Sample) -> Sample:
        """Apply max_images: skip the sample, or (documents, policy truncate) cut it before the extra image."""
        n = len(sample.media_refs)
        if n <= self.max_images:
            return sample
        if self.too_many_images == "skip" or sample.kind != "document":
            raise BadSample("too_many_images", f"{n} images > max_images={self.max_images}", sample.key)
        parts, seen = [], 0
        for p in sample.parts:
            if isinstance(p, MediaRef):
                seen += 1
                if seen > self.max_images:
                    break
            parts.append(p)
        return Sample(key=sample.key, kind="document", parts=parts)

    def decode(self, sample: Sample, image_root=None, num_frames=None) -> tuple[Sample, list[list]]:
        """(sample, frames per media item): images are one frame (a uint8 tensor on the fast path, else a PIL
        image), videos `num_frames` sampled PIL frames."""
        sample = self.limit_media(sample)
        frames = []
        for ref in sample.media_refs:
            if ref.kind == "video":
                frames.append(sample_frames(ref.value, num_frames or self.num_frames, image_root))
            else:
                frames.append([(decode_image_tensor if self._uint8 else decode_image)(ref.value, image_root)])
        return sample, frames

    def encode(self, sample: Sample, frames: list[list], task: int = 0) -> Encoded:
        """Tokenise, truncate to max_tokens (dropping media whose `<image>` was cut) and transform media."""
        if sample.kind == "conversation":  # rendered as model.render_chat / model.chat render it
            tok = encode_conversation(with_system_prompt(sample.messages, self.system_prompt), self.tokenizer)
        else:
            tok = encode_document(sample.parts, self.tokenizer)
        n_tokens = tok.input_ids.count(self.image_id)
        if n_tokens != len(frames):  # e.g. a literal "<image>" inside a caption
            raise BadSample("image_count_mismatch", f"{n_tokens} <image> tokens for {len(frames)} media", sample.key)
        tok, kept = truncate(tok, self.max_tokens, self.image_id)
        media = []
        for item in frames[:kept]:
            try:
                pix = [self._to_pixels(f) for f in item]
                media.append(pix[0][None] if len(pix) == 1 else torch.stack(pix))  # (F, C, H, W)
            except Exception as e:  # an image the backbone's preprocessing rejects
                raise BadSample(
                    "corrupt_image", f"image transform failed: {type(e).__name__}: {e}", sample.key
                ) from None
        return Encoded(tok.input_ids, tok.labels, media, task, sample.key)

    def blank_media(self) -> torch.Tensor:
        """What the transform makes of a blank image: empty media slots take its shape and dtype (uint8 on the
        fast path)."""
        return self._to_pixels(Image.new("RGB", (64, 64)))
