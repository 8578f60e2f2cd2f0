"""Encoded samples -> the model's batch dict (plain right-padded rows, or packed rows).

Batch contract (what `LMM.forward` consumes):
  input_ids, attention_mask, labels, task_ids: (B, T) long; right padding, labels -100 on padding
  pixel_values: (B, M, F, C, H, W) float, or uint8 (not yet normalised) from an image processor with
      `resize_crop` and `normalize` (the vision tower normalises it); the k-th `<image>` of row b is pixel_values[b, k]
      (counted across all packed segments of the row); unused slots are zeros; M >= 1
  frame_mask: (B, M, F) bool, only when media in the batch have different frame counts
  media_inputs: {modality: (B, M, F, ...)} for other modalities (audio: F = 30 s chunks), the k-th `<audio>` of
      row b is media_inputs["audio"][b, k]; media_frame_mask: {modality: (B, M, F) bool} when their frame counts
      differ. A batch with only such media has no pixel_values.
  segment_ids, position_ids: (B, T) long, packed rows only; position ids restart at 0 per segment;
      padding forms one extra segment (attention_mask 0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .text import IGNORE_INDEX


@dataclass
class Encoded:
    """One tokenised sample with its media: media[k] (F, C, H, W) belongs to the k-th `<image>` token;
    other_media[name][k] (F, ...) to the k-th marker of modality `name` (`<audio>` ...)."""

    input_ids: list[int]
    labels: list[int]
    media: list[torch.Tensor] = field(default_factory=list)
    task: int = 0
    key: str = ""
    other_media: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def n_media(self) -> int:
        return len(self.media) + sum(len(v) for v in self.other_media.values())

    def __len__(self) -> int:
        return len(self.input_ids)


def _pixel_values(
    rows_media: list[list[torch.Tensor]], media_shape: tuple[int, int, int], media_dtype: torch.dtype = torch.float32
):
    """Stack per-row media lists into (B, M, F, C, H, W), plus frame_mask when frame counts differ."""
    shapes = {tuple(m.shape[1:]) for row in rows_media for m in row}
    if len(shapes) > 1:
        raise ValueError(
            f"the image transform returned different sizes {sorted(shapes)}; make it resize "
            "and crop to one fixed size (e.g. Resize + CenterCrop)"
        )
    chw = shapes.pop() if shapes else tuple(media_shape)
    frames = {m.shape[0] for row in rows_media for m in row}
    B, M, F = len(rows_media), max([1] + [len(r) for r in rows_media]), max([1] + list(frames))
    dtype = next((m.dtype for row in rows_media for m in row), media_dtype)  # text-only batches: media_dtype
    pixels = torch.zeros(B, M, F, *chw, dtype=dtype)
    mask = torch.zeros(B, M, F, dtype=torch.bool)
    for b, row in enumerate(rows_media):
        for k, m in enumerate(row):
            pixels[b, k, : m.shape[0]] = m
            mask[b, k, : m.shape[0]] = True
    out = {"pixel_values": pixels}
    if len(frames) > 1:
        out["frame_mask"] = mask
    return out


def _media_inputs(rows: list[dict[str, list[torch.Tensor]]]) -> dict:
    """Other modalities' items per row -> {"media_inputs": {name: (B, M, F, ...)}} (zero-padded slots and frames),
    plus {"media_frame_mask": {name: (B, M, F) bool}} for the modalities whose items differ in frame count."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    inputs, masks = {}, {}
    for name in names:
        items = [row.get(name, []) for row in rows]
        shapes = {tuple(x.shape[1:]) for row in items for x in row}
        if len(shapes) > 1:
            raise ValueError(f"the {name} preprocessing returned items of different shapes {sorted(shapes)}")
        frames = {x.shape[0] for row in items for x in row}
        first = next(x for row in items for x in row)
        values = torch.zeros(len(rows), max(len(r) for r in items), max(frames), *shapes.pop(), dtype=first.dtype)
        mask = torch.zeros(values.shape[:3], dtype=torch.bool)
        for b, row in enumerate(items):
            for k, x in enumerate(row):
                values[b, k, : x.shape[0]] = x
                mask[b, k, : x.shape[0]] = True
        inputs[name] = values
        if len(frames) > 1:
            masks[name] = mask
    out = {"media_inputs": inputs} if inputs else {}
    if masks:
        out["media_frame_mask"] = masks
    return out


def _add_media(batch: dict, images: list[list[torch.Tensor]], others: list[dict], media_shape, media_dtype) -> dict:
    """pixel_values (always, as before, unless the batch holds only other modalities' media) and media_inputs."""
    extra = _media_inputs(others)
    if not extra or any(images):
        batch.update(_pixel_values(images, media_shape, media_dtype))
    batch.update(extra)
    return batch


def collate(samples: list[Encoded], pad_id: int, media_shape=(3, 224, 224), media_dtype=torch.float32) -> dict:
    """One sample per row, right-padded to the longest row."""
    T = max(len(s) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    task_ids = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        attention_mask[b, :n] = 1
        task_ids[b, :] = s.task
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}
    return _add_media(batch, [s.media for s in samples], [s.other_media for s in samples], media_shape, media_dtype)


def collate_packed(
    rows: list[list[Encoded]], pad_id: int, row_length: int, media_shape=(3, 224, 224), media_dtype=torch.float32
) -> dict:
    """Several samples per fixed-length row; samples keep their order, their media follow them."""
    B, T = len(rows), row_length
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    task_ids = torch.zeros((B, T), dtype=torch.long)
    segment_ids = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, row in enumerate(rows):
        start = 0
        for seg, s in enumerate(row):
            n = len(s)
            if start + n > T:
                raise ValueError(f"packed row {b} holds {start + n} tokens, more than row_length={T}")
            sl = slice(start, start + n)
            input_ids[b, sl] = torch.tensor(s.input_ids)
            labels[b, sl] = torch.tensor(s.labels)
            attention_mask[b, sl] = 1
            task_ids[b, sl] = s.task
            segment_ids[b, sl] = seg
            position_ids[b, sl] = torch.arange(n)
            start += n
        segment_ids[b, start:] = len(row)  # padding: a segment of its own
        position_ids[b, start:] = torch.arange(T - start)
        if row:
            task_ids[b, start:] = row[-1].task
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "task_ids": task_ids,
        "segment_ids": segment_ids,
        "position_ids": position_ids,
    }
    images = [[m for s in row for m in s.media] for row in rows]
    others = [{} for _ in rows]
    for b, row in enumerate(rows):
        for s in row:
            for name, items in s.other_media.items():
                others[b].setdefault(name, []).extend(items)
    return _add_media(batch, images, others, media_shape, media_dtype)


def fits(row: list[Encoded], sample: Encoded, row_length: int, max_media: int | None = None) -> bool:
    """Whether `sample` can join `row` (greedy, order-preserving packing)."""
    if sum(len(s) for s in row) + len(sample) > row_length:
        return False
    return max_media is None or sum(s.n_media for s in row) + sample.n_media <= max_media
