"""Look at a dataset the way the trainer will see it: counts, rendered samples, lengths, bad samples.

Backs `lmm data inspect`. Reads the first `limit` records of every dataset in a config (one reader,
first epoch), renders a few with their `<image>` / `<audio>` markers and loss spans, and tallies the rest.
Audio items show their duration, the file's own sample rate and the encoder chunks they take (30 s each,
Whisper's window); each is decoded as the loader decodes it, so a bad clip is counted by its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .audio import DEFAULT_SAMPLE_RATE
from .config import DataConfig, DatasetConfig
from .encode import SampleEncoder
from .errors import BadSample, BadSampleCounter, format_counts
from .formats import AUDIO_TOKEN, parse_record
from .media import read_media_bytes
from .sources import ShardSource, build_source
from .text import IGNORE_INDEX


@dataclass
class Inspection:
    name: str
    source: str
    records: int = 0
    good: int = 0
    lengths: list = field(default_factory=list)
    images: list = field(default_factory=list)
    audio_seconds: list = field(default_factory=list)  # duration of every usable audio clip
    shown: list = field(default_factory=list)  # dicts: key, text, media sizes, loss spans
    bad: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)  # reason -> (record key, detail) of its first bad sample
    image_root: str | None = None


def loss_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded runs of tokens that carry a loss."""
    spans, run = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            run.append(t)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def _width_height(frame) -> str:
    """WxH of a decoded frame: a PIL image, or a uint8 (3, H, W) tensor from the fast path."""
    w, h = (frame.shape[-1], frame.shape[-2]) if isinstance(frame, torch.Tensor) else frame.size
    return f"{w}x{h}"


CHUNK_SECONDS = 30  # the audio encoder's window (Whisper): a clip takes ceil(seconds / 30) chunks


def _chunks(samples: np.ndarray) -> int:
    return max(1, -(-len(samples) // (CHUNK_SECONDS * DEFAULT_SAMPLE_RATE)))


def source_rate(value, root=None) -> int | None:
    """The sample rate an audio file or field was recorded at (from its header; None when unknown)."""
    if isinstance(value, dict) and value.get("sampling_rate"):
        return int(value["sampling_rate"])
    if isinstance(value, tuple) and len(value) == 2:
        return int(value[0])
    try:
        import io

        import av

        with av.open(io.BytesIO(read_media_bytes(value, root, "audio"))) as c:
            return int(c.streams.audio[0].rate)
    except Exception:  # an array, or something the loader already counted as bad
        return None


def _describe(ref, item, root) -> str:
    if ref.kind == "audio":
        rate = source_rate(ref.value, root)
        seconds = len(item[0]) / DEFAULT_SAMPLE_RATE
        return f"audio {seconds:.2f} s ({rate or '?'} Hz source), {_chunks(item[0])} chunk(s)"
    return f"{len(item)} frame(s) {_width_height(item[0])}"


def inspect_dataset(dcfg: DatasetConfig, cfg: DataConfig, tokenizer, limit: int = 200, show: int = 3) -> Inspection:
    from lmm.tokens import add_tokens

    source = build_source(dcfg, cfg.seed)
    kind = f"{type(source).__name__}, {len(source)} {'shards' if isinstance(source, ShardSource) else 'rows'}"
    rep = Inspection(dcfg.display_name(), kind, image_root=dcfg.image_root)
    add_tokens(tokenizer, [AUDIO_TOKEN])  # so `<audio>` renders as the one marker token a model would add
    encoder = SampleEncoder(
        tokenizer,
        lambda im: torch.zeros(3, 1, 1),
        cfg.max_tokens,
        cfg.max_images,
        cfg.too_many_images,
        cfg.num_frames,
        media_processors={"audio": lambda w: torch.zeros(_chunks(w), 1)},  # decoded for real, not encoded
    )
    counter = BadSampleCounter(log=False)

    def on_error(exn, path):
        counter.add(BadSample("truncated_shard", str(exn)), key=path)

    for key, record, _ in source.iter_records(0, 0, 1, None, on_error):
        if record is None:
            continue
        if rep.records >= limit:
            break
        rep.records += 1
        try:
            sample = parse_record(record, dcfg.format, key, dcfg.image_key, dcfg.text_key, dcfg.min_similarity)
            sample, frames = encoder.decode(sample, dcfg.image_root, dcfg.num_frames)
            enc = encoder.encode(sample, frames)
        except BadSample as e:
            counter.add(e, key=key)
            rep.examples.setdefault(e.reason, (key, e.detail))
            continue
        rep.good += 1
        rep.lengths.append(len(enc.input_ids))
        rep.images.append(len(enc.media))
        rep.audio_seconds += [
            len(f[0]) / DEFAULT_SAMPLE_RATE for r, f in zip(sample.media_refs, frames) if r.kind == "audio"
        ]
        if len(rep.shown) < show:
            rep.shown.append(
                {
                    "key": key,
                    "text": tokenizer.decode(enc.input_ids),
                    "media": [_describe(r, f, dcfg.image_root) for r, f in zip(sample.media_refs, frames)],
                    "loss": loss_spans(tokenizer, enc.input_ids, enc.labels),
                }
            )
    rep.bad = dict(counter.counts)
    return rep


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    if not values:
        return ["  (no samples)"]
    counts, edges = np.histogram(values, bins=min(bins, max(1, len(set(values)))))
    top = max(counts.max(), 1)
    return [
        f"  {int(lo):6d}-{int(hi):<6d} {'#' * int(round(width * c / top))} {c}"
        for c, lo, hi in zip(counts, edges[:-1], edges[1:])
    ]


def format_inspection(rep: Inspection) -> str:
    lines = [
        f"== {rep.name} ({rep.source})",
        f"records read: {rep.records}   usable: {rep.good}   skipped: {sum(rep.bad.values())}",
    ]
    for i, s in enumerate(rep.shown):
        lines += [
            f"-- sample {i} [{s['key']}]  media: {', '.join(s['media']) or 'none'}",
            s["text"],
            "   loss on: " + " | ".join(repr(x) for x in s["loss"]),
        ]
    if rep.lengths:
        lines += [f"tokens per sample: min {min(rep.lengths)}  mean {np.mean(rep.lengths):.1f}  max {max(rep.lengths)}"]
        lines += histogram(rep.lengths)
        values, counts = np.unique(rep.images, return_counts=True)
        lines += [f"images per sample: {dict(zip(values.tolist(), counts.tolist()))}"]
    if rep.audio_seconds:
        a = rep.audio_seconds
        lines += [
            f"audio clips: {len(a)}   seconds: min {min(a):.2f}  mean {np.mean(a):.2f}  max {max(a):.2f}   "
            f"total {sum(a):.1f}"
        ]
    lines.append(format_counts(rep.bad))
    for reason, (key, detail) in rep.examples.items():
        if detail:
            lines.append(f"  first {reason} [{key}]: {detail}")
    if rep.bad.get("missing_image") or rep.bad.get("missing_video") or rep.bad.get("missing_audio"):
        if rep.image_root is None:
            lines.append(
                f"  hint: relative media paths are resolved against the current folder ({os.getcwd()}); pass "
                "--image-root FOLDER (image_root: in a data config) for the folder that holds them"
            )
        else:
            lines.append(f"  hint: relative media paths are resolved against image_root {rep.image_root}")
    return "\n".join(lines)
