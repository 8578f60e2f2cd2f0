"""Prompts + raw media -> one model batch for inference: images, videos and audio clips at their markers.

A prompt holds markers in text order: `<image>` (an image), `<video>` (a video: an image-modality item of
`config.video_frames` frames, sampled uniformly as the training loader samples them; it becomes `<image>` in
the tokens) and each other encoder's token (`<audio>`: one clip, its 30 s chunks as frames). Videos and audio
are decoded by the training loader's own decoders (lmm.data.video / lmm.data.audio), so inference sees what
training saw. `Video(...)` / `Audio(...)` wrap items in a mixed media list (what `render_chat` returns).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmm.tokens import IMAGE_TOKEN

VIDEO_MARKER = "<video>"


@dataclass(frozen=True)
class Video:
    """A video in a mixed media list: a path, bytes, (F, H, W, 3) uint8 frames (array/tensor) or PIL frames."""

    value: Any


@dataclass(frozen=True)
class Audio:
    """An audio clip in a mixed media list: a path, bytes, a float waveform (at `sampling_rate`, default the
    encoder's), or an HF Audio dict {"array", "sampling_rate"}."""

    value: Any
    sampling_rate: int | None = None


def load_images(images) -> list:
    """PIL images from PIL images or file paths; a missing or undecodable file is a clear ValueError."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for im in images or []:
        if isinstance(im, (str, Path)):
            p = Path(im)
            if not p.is_file():
                raise ValueError(f"image not found: {p}")
            try:
                with Image.open(p) as f:
                    f.load()
                    im = f.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"cannot decode image {p}: {e}") from e
        elif not isinstance(im, Image.Image):
            raise ValueError(f"expected a PIL image or a path, got {type(im).__name__}")
        out.append(im)
    return out


def _bad(kind: str, e: Exception) -> ValueError:
    return ValueError(f"cannot use this {kind}: {e}")


def video_frames(model, value) -> torch.Tensor:
    """(F, C, H, W) preprocessed frames of one video, F = model.config.video_frames sampled uniformly."""
    from PIL import Image

    from lmm.data.errors import BadSample
    from lmm.data.video import sample_frames, uniform_indices

    n = model.config.video_frames
    if isinstance(value, Video):
        value = value.value
    if isinstance(value, (list, tuple)) and value and all(isinstance(f, Image.Image) for f in value):
        frames = [value[i].convert("RGB") for i in uniform_indices(len(value), n)]
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        arr = value.numpy() if isinstance(value, torch.Tensor) else value
        if arr.ndim != 4 or arr.dtype != np.uint8 or 3 not in (arr.shape[1], arr.shape[-1]):
            raise ValueError(f"video frames must be a (F, H, W, 3) or (F, 3, H, W) uint8 array; got {arr.shape}")
        if arr.shape[-1] != 3:
            arr = arr.transpose(0, 2, 3, 1)
        if arr.shape[0] == 0:
            raise ValueError("a video with no frames")
        frames = [Image.fromarray(np.ascontiguousarray(arr[i])) for i in uniform_indices(arr.shape[0], n)]
    else:
        if isinstance(value, (str, Path)):
            if not Path(value).is_file():
                raise ValueError(f"video not found: {value}")
            value = str(value)
        elif not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"expected a video path, bytes or frames, got {type(value).__name__}")
        try:
            frames = sample_frames(bytes(value) if isinstance(value, bytearray) else value, n)
        except BadSample as e:
            raise _bad("video", e) from None
    return torch.stack([model.image_processor(f) for f in frames])


def audio_items(model, modality: str, value) -> torch.Tensor:
    """The encoder's preprocessed tensor for one clip (chunks, ...), decoded and resampled as the loader does."""
    from lmm.data.audio import decode_audio
    from lmm.data.errors import BadSample

    encoder = model.encoders[modality]
    rate = getattr(encoder, "sampling_rate", 16_000)
    given_rate = None
    if isinstance(value, Audio):
        value, given_rate = value.value, value.sampling_rate
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and given_rate is not None:
        value = {"array": value, "sampling_rate": given_rate}
    if isinstance(value, (str, Path)):
        if not Path(value).is_file():
            raise ValueError(f"audio not found: {value}")
        value = str(value)
    try:
        wave = decode_audio(value, sampling_rate=rate)
    except BadSample as e:
        raise _bad("audio clip", e) from None
    return encoder.preprocess(wave)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def media_kind(path: str | Path, default: str | None = "image") -> str | None:
    """ "image", "video" or "audio" from a file's suffix (`default` for any other suffix)."""
    from lmm.data.audio import AUDIO_EXTENSIONS
    from lmm.data.video import VIDEO_EXTENSIONS

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in AUDIO_EXTENSIONS:
        return "audio"
    return "image" if "." + suffix in IMAGE_SUFFIXES else default


def load_media(model, path: str | Path, kind: str):
    """An attachment decoded now, so a bad file is reported when it is attached (ValueError): a PIL image, a
    `Video` of the model's sampled frames, or an `Audio` waveform at its audio encoder's rate."""
    from lmm.data.errors import BadSample

    path = Path(path)
    if kind == "image":
        return load_images([path])[0]
    if not path.is_file():
        raise ValueError(f"{kind} not found: {path}")
    try:
        if kind == "video":
            from lmm.data.video import sample_frames

            return Video(sample_frames(str(path), model.config.video_frames))
        if "audio" not in model.encoders:
            raise ValueError("this model has no audio encoder (its config has no encoders.audio)")
        from lmm.data.audio import decode_audio

        rate = getattr(model.encoders["audio"], "sampling_rate", 16_000)
        return Audio(decode_audio(str(path), sampling_rate=rate), rate)
    except BadSample as e:
        raise ValueError(f"cannot use {path.name}: {e}") from None


def check_audio_length(model, modality: str, wave) -> None:
    """A ValueError (the encoder's, naming its limit) for a decoded clip longer than the encoder takes: from the
    sample count where the encoder has `check_length`, else by preprocessing it."""
    encoder = model.encoders[modality]
    if hasattr(encoder, "check_length"):
        encoder.check_length(len(wave))
    else:
        encoder.preprocess(wave)


def _markers(model) -> dict[str, str]:
    """marker text -> kind ("image", "video" or an encoder modality)."""
    out = {IMAGE_TOKEN: "image"}
    if VIDEO_MARKER not in {e.token for e in model.encoders.values()}:
        out[VIDEO_MARKER] = "video"
    for m, e in model.encoders.items():
        if m != "image":
            out[e.token] = m
    return out


def _queues(model, images, videos, audios) -> dict[str, list]:
    """Per-kind item lists of one prompt: plain items of `images` are images, Video/Audio wrappers their kind."""
    q: dict[str, list] = {"image": [], "video": []}
    clips = [item for item in images or [] if isinstance(item, Audio)] + list(audios or [])
    for item in images or []:
        if not isinstance(item, Audio):
            q["video" if isinstance(item, Video) else "image"].append(item)
    q["video"] += list(videos or [])
    if clips:
        if "audio" not in model.encoders:
            raise ValueError("audio was given, but this model has no audio encoder (config.encoders.audio)")
        q["audio"] = clips
    return q


def _pad_stack(rows: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of (F_i, ...) items -> (B, M, F, ...) zero-padded, plus a (B, M, F) frame mask when frame counts
    differ (as the training collate does: single-frame images keep the mask-free path)."""
    shapes = {tuple(t.shape[1:]) for r in rows for t in r}
    if len(shapes) > 1:
        raise ValueError(f"media items of one kind differ in shape: {sorted(shapes)}")
    first = next(t for r in rows for t in r)
    frames = {t.shape[0] for r in rows for t in r}
    out = torch.zeros(len(rows), max(len(r) for r in rows), max(frames), *first.shape[1:], dtype=first.dtype)
    mask = torch.zeros(out.shape[:3], dtype=torch.bool)
    for b, r in enumerate(rows):
        for m, t in enumerate(r):
            out[b, m, : t.shape[0]] = t
            mask[b, m, : t.shape[0]] = True
    return out, mask if len(frames) > 1 else None


def prepare_inputs(
    model,
    prompts: Sequence[str],
    images: Sequence[Sequence] | None = None,
    add_special_tokens: bool = True,
    videos: Sequence[Sequence] | None = None,
    audios: Sequence[Sequence] | None = None,
) -> dict:
    """Tokenise prompts (left padding) and preprocess their media: `pixel_values` (B, M, F, C, H, W) with
    `frame_mask` (B, M, F) when frame counts differ, `media_inputs` / `media_frame_mask` for other modalities.
    Every marker needs its item and every item its marker (a clear ValueError otherwise)."""
    B = len(prompts)
    for name, lists in (("image", images), ("video", videos), ("audio", audios)):
        if lists is not None and len(lists) != B:
            raise ValueError(f"{B} prompts but {len(lists)} {name} lists")
    markers = _markers(model)
    pattern = re.compile("|".join(re.escape(k) for k in sorted(markers, key=len, reverse=True)))
    image_rows: list[list[torch.Tensor]] = []
    other_rows: dict[str, list[list[torch.Tensor]]] = {}
    texts = []
    for i, prompt in enumerate(prompts):
        queues = _queues(
            model,
            images[i] if images is not None else None,
            videos[i] if videos is not None else None,
            audios[i] if audios is not None else None,
        )
        order = [markers[m.group(0)] for m in pattern.finditer(prompt)]
        for kind, items in queues.items():
            n = order.count(kind)
            if n != len(items):
                marker = next(k for k, v in markers.items() if v == kind)
                raise ValueError(
                    f"prompt {i} has {n} {marker} marker(s) but {len(items)} {kind} item(s) were given; "
                    f"put one {marker} where each belongs"
                )
        taken = {k: iter(v) for k, v in queues.items()}
        row: list[torch.Tensor] = []
        others: dict[str, list[torch.Tensor]] = {}
        for kind in order:
            item = next(taken[kind])
            if kind == "image":
                row.append(model.image_processor(load_images([item])[0])[None])
            elif kind == "video":
                row.append(video_frames(model, item))
            else:
                others.setdefault(kind, []).append(audio_items(model, kind, item))
        image_rows.append(row)
        for kind in set(others) | set(other_rows):
            other_rows.setdefault(kind, [[] for _ in range(i)]).append(others.get(kind, []))
        texts.append(prompt.replace(VIDEO_MARKER, IMAGE_TOKEN) if VIDEO_MARKER in markers else prompt)
    tok = model.tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=add_special_tokens
    )
    batch = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    if any(image_rows):
        batch["pixel_values"], frame_mask = _pad_stack(image_rows)
        if frame_mask is not None:
            batch["frame_mask"] = frame_mask
    for kind, rows in other_rows.items():
        items, mask = _pad_stack(rows)
        batch.setdefault("media_inputs", {})[kind] = items
        if mask is not None:
            batch.setdefault("media_frame_mask", {})[kind] = mask
    return batch


def encode_batch_media(model, batch: dict) -> torch.Tensor | None:
    """The batch's resampled media (B, M, L, D) in text order (None without media): computed once per prompt."""
    return model.encode_inputs(
        batch["input_ids"].to(model.device),
        batch.get("pixel_values"),
        None,
        batch.get("frame_mask"),
        batch.get("media_inputs"),
        batch.get("media_frame_mask"),
    )
