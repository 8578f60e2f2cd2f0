"""Look at a dataset the way the trainer will see it: counts, rendered samples, lengths, bad samples.

Backs `lmm data inspect`. Reads the first `limit` records of every dataset in a config (one reader,
first epoch), renders a few with their `<image>` markers and loss spans, and tallies the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import DataConfig, DatasetConfig
from .encode import SampleEncoder
from .errors import BadSample, BadSampleCounter, format_counts
from .formats import parse_record
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


def inspect_dataset(dcfg: DatasetConfig, cfg: DataConfig, tokenizer, limit: int = 200, show: int = 3) -> Inspection:
    source = build_source(dcfg, cfg.seed)
    kind = f"{type(source).__name__}, {len(source)} {'shards' if isinstance(source, ShardSource) else 'rows'}"
    rep = Inspection(dcfg.display_name(), kind, image_root=dcfg.image_root)
    encoder = SampleEncoder(
        tokenizer, lambda im: torch.zeros(3, 1, 1), cfg.max_tokens, cfg.max_images, cfg.too_many_images, cfg.num_frames
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
        if len(rep.shown) < show:
            rep.shown.append(
                {
                    "key": key,
                    "text": tokenizer.decode(enc.input_ids),
                    "media": [f"{len(f)} frame(s) {_width_height(f[0])}" for f in frames],
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
    lines.append(format_counts(rep.bad))
    for reason, (key, detail) in rep.examples.items():
        if detail:
            lines.append(f"  first {reason} [{key}]: {detail}")
    if rep.bad.get("missing_image") or rep.bad.get("missing_video"):
        if rep.image_root is None:
            lines.append(
                f"  hint: relative media paths are resolved against the current folder ({os.getcwd()}); pass "
                "--image-root FOLDER (image_root: in a data config) for the folder that holds them"
            )
        else:
            lines.append(f"  hint: relative media paths are resolved against image_root {rep.image_root}")
    return "\n".join(lines)
