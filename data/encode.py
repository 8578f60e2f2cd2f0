"""One parsed Sample -> decoded media -> an `Encoded` sample (token ids, labels, media tensors).

Split in two so the expensive half (decoding) can be cached by the repeat buffer while the cheap
half (image transform, i.e. augmentation, and tokenisation) runs again at every use.

Fast path: an image processor with `resize_crop` and `normalize` methods (lmm's `ImageTransform`) gets
uint8 tensors decoded by torchvision and returns uint8 media, which the model normalises on its device;
any other callable gets PIL images and returns float tensors, as torchvision/open_clip transforms expect.

Other modalities (audio) are decoded here (`data.audio.decode_audio`: float32 mono at `sampling_rate`) and turned
into tensors (F, ...) by the model's own encoder (`media_processors[kind]`, i.e. `model.encoders[kind].preprocess`;
F: an audio clip's 30 s chunks), as images are by the vision tower's transform.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from lmm.chat import with_system_prompt
from lmm.tokens import IMAGE_TOKEN

from .audio import DEFAULT_SAMPLE_RATE, decode_audio
from .errors import REASONS, BadSample
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
    # modality (a MediaRef kind other than image/video, e.g. "audio") -> raw item -> tensor (F, ...): the model's
    # `encoders[kind].preprocess`; media of a kind without one are skipped and counted as no_encoder
    media_processors: dict[str, Callable] | None = None
    sampling_rate: int = DEFAULT_SAMPLE_RATE  # audio is decoded to this rate (the audio encoder's)

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
        for ref in sample.media_refs:  # before decoding anything
            if ref.kind not in ("image", "video") and ref.kind not in (self.media_processors or {}):
                raise BadSample("no_encoder", f"{ref.kind} media but the model has no {ref.kind} encoder", sample.key)
        frames = []
        for ref in sample.media_refs:
            if ref.kind == "audio":
                frames.append([decode_audio(ref.value, self.sampling_rate, image_root)])
            elif ref.kind == "video":
                frames.append(sample_frames(ref.value, num_frames or self.num_frames, image_root))
            else:
                frames.append([(decode_image_tensor if self._uint8 else decode_image)(ref.value, image_root)])
        return sample, frames

    def encode(self, sample: Sample, frames: list[list], task: int = 0) -> Encoded:
        """Tokenise, truncate to max_tokens (dropping media whose `<image>` was cut) and transform media."""
        refs = sample.media_refs
        markers = {r.marker for r in refs}
        if sample.kind == "conversation":  # rendered as model.render_chat / model.chat render it
            messages = with_system_prompt(sample.messages, self.system_prompt)
            tok = encode_conversation(messages, self.tokenizer, markers)
        else:
            tok = encode_document(sample.parts, self.tokenizer)
        ids = {m: self._marker_id(m) for m in markers | {IMAGE_TOKEN}}
        for marker, i in ids.items():
            n_tokens, n_media = tok.input_ids.count(i), sum(r.marker == marker for r in refs)
            if n_tokens != n_media:  # e.g. a literal "<image>" inside a caption
                reason = "image_count_mismatch" if marker == IMAGE_TOKEN else "audio_count_mismatch"
                raise BadSample(reason, f"{n_tokens} {marker} tokens for {n_media} media", sample.key)
        tok, _ = truncate(tok, self.max_tokens, self.image_id)
        kept = {m: tok.input_ids.count(i) for m, i in ids.items()}  # media whose marker survived, per marker
        media, other, seen = [], {}, dict.fromkeys(ids, 0)
        for ref, item in zip(refs, frames):
            seen[ref.marker] += 1
            if seen[ref.marker] > kept[ref.marker]:
                continue
            if ref.kind in ("image", "video"):
                media.append(self._pixels(item, sample.key))
            else:
                other.setdefault(ref.kind, []).append(self._process(ref.kind, item[0], sample.key))
        return Encoded(tok.input_ids, tok.labels, media, task, sample.key, other)

    def _marker_id(self, marker: str) -> int:
        i = self.tokenizer.convert_tokens_to_ids(marker)
        if i is None or i == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {marker} token; build the data with the model's tokenizer")
        return i

    def _pixels(self, item: list, key: str) -> torch.Tensor:
        try:
            pix = [self._to_pixels(f) for f in item]
            return pix[0][None] if len(pix) == 1 else torch.stack(pix)  # (F, C, H, W)
        except Exception as e:  # an image the backbone's preprocessing rejects
            raise BadSample("corrupt_image", f"image transform failed: {type(e).__name__}: {e}", key) from None

    def _process(self, kind: str, item, key: str) -> torch.Tensor:
        """The model's encoder preprocessing of one decoded item -> (F, ...)."""
        try:
            x = torch.as_tensor(self.media_processors[kind](item))
        except BadSample:
            raise
        except ValueError as e:  # audio: a clip of more windows than the encoder's max_chunks (never truncated)
            reason = f"{kind}_too_long" if f"{kind}_too_long" in REASONS else "bad_record"
            raise BadSample(reason, f"{kind} preprocessing refused it: {e}", key) from None
        except Exception as e:
            reason = f"corrupt_{kind}" if f"corrupt_{kind}" in REASONS else "bad_record"
            raise BadSample(reason, f"{kind} preprocessing failed: {type(e).__name__}: {e}", key) from None
        return x

    def blank_media(self) -> torch.Tensor:
        """What the transform makes of a blank image: empty media slots take its shape and dtype (uint8 on the
        fast path)."""
        return self._to_pixels(Image.new("RGB", (64, 64)))
