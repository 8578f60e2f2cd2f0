"""Every record of one dataset, once, in file order, parsed into `Sample`s.

For work that needs the whole dataset rather than the training loader's shuffled, sharded, endless stream:
precomputing frozen features (`lmm.training.frozen_cache`) and held-out evaluation sets (`lmm.eval`). Image
paths come back resolved against the dataset's `image_root`, so equal files compare equal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from .config import DatasetConfig
from .errors import BadSample
from .formats import MediaRef, Sample, parse_record
from .media import resolve_path
from .sources import build_source


def iter_dataset(dcfg: DatasetConfig, seed: int = 0) -> Iterator[tuple[str, Sample | None, str | None]]:
    """(key, sample, None) per usable record and (key, None, reason) per unusable one, in file order."""
    source = build_source(dataclasses.replace(dcfg, shuffle=False), seed)
    source.check()
    errors: list = []
    for key, record, _ in source.iter_records(0, 0, 1, None, lambda exn, path: errors.append((exn, path))):
        while errors:
            _, path = errors.pop()
            yield str(path), None, "truncated_shard"
        if record is None:
            continue
        try:
            sample = parse_record(record, dcfg.format, key, dcfg.image_key, dcfg.text_key, dcfg.min_similarity)
        except BadSample as e:
            yield key, None, e.reason
            continue
        yield key, _resolved(sample, dcfg.image_root), None
    for _, path in errors:
        yield str(path), None, "truncated_shard"


def read_samples(
    path: str, fmt: str = "auto", image_root: str | None = None
) -> Iterator[tuple[str, Sample | None, str | None]]:
    """`iter_dataset` for a file (or glob / folder) given by path."""
    return iter_dataset(DatasetConfig(path=path, format=fmt, image_root=image_root))


def _resolved(sample: Sample, root: str | None) -> Sample:
    def fix(ref: MediaRef) -> MediaRef:
        return MediaRef(resolve_path(ref.value, root), ref.kind) if isinstance(ref.value, str) else ref

    if sample.kind == "document":
        return dataclasses.replace(sample, parts=[fix(p) if isinstance(p, MediaRef) else p for p in sample.parts])
    return dataclasses.replace(sample, media=[fix(m) for m in sample.media])
