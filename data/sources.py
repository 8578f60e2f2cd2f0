"""Where records come from: local webdataset shards and HF `datasets` files (all paths, no hub).

Every source splits its data across the G = world_size x num_workers readers of a run so that no
record is read twice per epoch, and reads from a small cursor so a resumed run continues at the
next unread record:

  ShardSource (webdataset tars; HF files in streaming mode): a shard is a file; reader g of G takes
    every G-th file of the epoch's (seeded) shard order, or, with fewer files than readers, every
    file but only every G-th record of it. Cursor: {"shard": position in its list, "record": records read}.
  TableSource (HF Dataset from parquet/json/arrow/save_to_disk): random access; reader g
    takes every G-th row of the epoch's (seeded) row permutation. Cursor: {"row": position}.

`iter_records` yields (key, record, cursor_after); a `None` record marks a shard boundary (only
the cursor moves), so saved cursors never straddle an end-of-shard event.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator

import numpy as np

from .errors import DataError

HF_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def expand_paths(pattern: str, exts: tuple[str, ...] = ()) -> list[str]:
    """Brace patterns (`a/{000..009}.tar`), globs, files and folders -> sorted existing files."""
    from webdataset.shardlists import expand_urls

    out: list[str] = []
    for p in expand_urls(os.path.expanduser(pattern)):
        if os.path.isdir(p):
            out += [os.path.join(p, f) for f in sorted(os.listdir(p)) if not exts or f.endswith(exts)]
        elif any(c in p for c in "*?["):
            out += sorted(glob.glob(p))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise DataError(f"data file not found: {p} (from {pattern!r})")
    return list(dict.fromkeys(out))


def detect_source(path: str) -> str:
    """webdataset / parquet / json / arrow / disk, from the path's extension or folder contents."""
    p = os.path.expanduser(path)
    if os.path.isdir(p):
        names = os.listdir(p)
        if {"dataset_dict.json", "state.json", "dataset_info.json"} & set(names):
            return "disk"
        for ext, kind in ((".tar", "webdataset"), *HF_BUILDERS.items()):
            if any(n.endswith(ext) for n in names):
                return kind
        raise DataError(
            f"{path}: cannot tell the format of this folder (no .tar/.parquet/.json/.jsonl/.arrow "
            "files, not a save_to_disk folder); set `source:` explicitly"
        )
    if ".tar" in p:
        return "webdataset"
    for ext, kind in HF_BUILDERS.items():  # also matches brace patterns like part-{0..3}.parquet
        if ext in os.path.basename(p):
            return kind
    raise DataError(
        f"{path}: cannot tell the source from the name; set `source:` to one of webdataset, parquet, json, arrow, disk"
    )


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The same permutation of range(n) on every rank and worker for a given (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch, 7919]).permutation(n).tolist()


class ShardSource:
    """Records from a list of shard files, split across readers by file (or by record when few files)."""

    def __init__(self, name: str, files: list[str], open_shard: Callable, shuffle: bool = True, seed: int = 0):
        self.name, self.files, self.open_shard, self.shuffle, self.seed = name, files, open_shard, shuffle, seed

    def __len__(self):  # shards, not records
        return len(self.files)

    def iter_records(self, epoch: int, g: int, G: int, cursor: dict | None, on_error) -> Iterator:
        order = [self.files[i] for i in epoch_order(len(self.files), self.seed, epoch, self.shuffle)]
        mine, stride, offset = (order[g::G], 1, 0) if len(order) >= G else (order, G, g)
        cursor = cursor or {"shard": 0, "record": 0}
        for pos in range(cursor["shard"], len(mine)):
            skip = cursor["record"] if pos == cursor["shard"] else 0
            path = mine[pos]
            for j, (key, record) in enumerate(self.open_shard(path, on_error)):
                if j < skip or j % stride != offset:
                    continue
                yield f"{os.path.basename(path)}:{key}", record, {"shard": pos, "record": j + 1}
            yield None, None, {"shard": pos + 1, "record": 0}

    def check(self) -> None:
        """Fail now if the first shard yields nothing readable."""
        errors: list = []
        for _key, _rec in self.open_shard(self.files[0], lambda e, path: errors.append(e)):
            return
        why = f": {errors[0]}" if errors else " (it holds no records)"
        raise DataError(f"dataset {self.name!r}: cannot read {self.files[0]}{why}")


class TableSource:
    """Rows of a random-access table (an HF `Dataset` or a list of dicts), split across readers by row."""

    def __init__(self, name: str, load: Callable, shuffle: bool = True, seed: int = 0):
        self.name, self._load, self.shuffle, self.seed = name, load, shuffle, seed
        self._table = None

    @property
    def table(self):
        if self._table is None:
            self._table = self._load()
        return self._table

    def __len__(self):
        return len(self.table)

    def iter_records(self, epoch: int, g: int, G: int, cursor: dict | None, on_error) -> Iterator:
        rows = epoch_order(len(self.table), self.seed, epoch, self.shuffle)[g::G]
        for pos in range((cursor or {"row": 0})["row"], len(rows)):
            yield f"{self.name}:{rows[pos]}", self.table[rows[pos]], {"row": pos + 1}

    def check(self) -> None:
        if len(self.table) == 0:
            raise DataError(f"dataset {self.name!r} is empty")


# --------------------------------------------------------------------------- readers


_TAR_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split: "dir/key" + "ext.ext2"
_TAR_META = re.compile(r"__[^/]*__($|/)")


def read_tar(path: str, on_error, max_member_bytes: int | None = None) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) per sample of a webdataset tar, grouped as webdataset groups them; read errors go
    to `on_error` (the shard stops there, what was read is kept).

    A member's size is read from its tar header before its data: one over `max_member_bytes` (default
    LMM_MAX_MEMBER_BYTES, 256 MiB) is never read (a 10 KB sparse tar can declare a 1 GiB member); its sample
    carries the names under `TOO_LARGE_KEY`, which `parse_record` counts as member_too_large."""
    import tarfile

    from .formats import TOO_LARGE_KEY
    from .media import max_member_bytes as default_limit

    limit = default_limit() if max_member_bytes is None else max_member_bytes
    key, sample, seen = None, None, set()
    try:
        with tarfile.open(path, mode="r|*") as tf:
            for info in tf:
                tf.members = []  # streaming: do not keep every header of the shard
                if not info.isreg():
                    continue
                name = info.name
                if ("/" not in name and name.startswith("__") and name.endswith("__")) or _TAR_META.match(name):
                    continue
                m = _TAR_KEY.match(name)
                if not m:
                    continue
                prefix, ext = m.group(1), m.group(2).lower()
                if prefix != key:
                    if sample:
                        yield key, sample
                    key, sample, seen = prefix, {}, set()
                if ext in seen:
                    on_error(ValueError(f"{name}: duplicate file name in tar file"), path)
                    continue
                seen.add(ext)
                if info.size > limit:
                    sample.setdefault(TOO_LARGE_KEY, []).append(f"{ext} ({info.size} bytes > {limit})")
                    continue
                sample[ext] = tf.extractfile(info).read()
    except Exception as e:  # a truncated or damaged shard (tarfile.ReadError, EOFError, zlib.error, OSError ...)
        on_error(e, path)
    if sample:
        yield key, sample


def _undecoded(ds):
    """Media columns as raw {"bytes", "path"} dicts: we decode them ourselves to count failures."""
    import datasets

    feats = getattr(ds, "features", None) or {}
    for name, feat in feats.items():
        if isinstance(feat, datasets.Image) and feat.decode:
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif hasattr(datasets, "Video") and isinstance(feat, datasets.Video) and getattr(feat, "decode", False):
            ds = ds.cast_column(name, datasets.Video(decode=False))
        elif isinstance(feat, datasets.Audio) and feat.decode:  # decoded by data.audio (PyAV), not torchcodec
            ds = ds.cast_column(name, datasets.Audio(decode=False))
    return ds


def hf_file_reader(builder: str):
    """A shard reader streaming one parquet/json/arrow file through HF `datasets`."""

    def read(path: str, on_error) -> Iterator[tuple[str, dict]]:
        import datasets

        try:
            ds = _undecoded(datasets.load_dataset(builder, data_files=[path], split="train", streaming=True))
            for i, row in enumerate(ds):
                yield str(i), row
        except Exception as e:  # a damaged file: what was read is kept, the rest of the file is counted once
            on_error(e, path)

    return read


def load_table(kind: str, files: list[str], split: str):
    """An HF `Dataset` (Arrow-backed, memory-mapped) from local files or a save_to_disk folder."""
    import datasets

    try:
        if kind == "disk":
            ds = datasets.load_from_disk(files[0])
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{files[0]} has splits {list(ds)}; set `split:` to one of them")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(
                HF_BUILDERS.get(os.path.splitext(files[0])[1], kind), data_files=files, split="train"
            )
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot load {files[0] if len(files) == 1 else files}: {type(e).__name__}: {e}") from e
    return _undecoded(ds)


def build_source(cfg, seed: int = 0):
    """The Source for one DatasetConfig; DataError when nothing usable is there."""
    name = cfg.display_name()
    kind = detect_source(cfg.path) if cfg.source == "auto" else cfg.source
    if kind == "disk":
        path = os.path.expanduser(cfg.path)
        if not os.path.isdir(path):
            raise DataError(f"dataset {name!r}: {path} is not a save_to_disk folder")
        return TableSource(name, lambda: load_table("disk", [path], cfg.split), cfg.shuffle, seed)
    exts = (".tar",) if kind == "webdataset" else tuple(e for e, b in HF_BUILDERS.items() if b == kind)
    files = expand_paths(cfg.path, exts)
    if not files:
        raise DataError(f"dataset {name!r}: no {'/'.join(exts)} files match {cfg.path!r}")
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"dataset {name!r}: {cfg.path!r} holds only empty files")
    if kind == "webdataset":
        return ShardSource(name, files, read_tar, cfg.shuffle, seed)
    if cfg.streaming:
        return ShardSource(name, files, hf_file_reader(kind), cfg.shuffle, seed)
    return TableSource(name, lambda: load_table(kind, files, cfg.split), cfg.shuffle, seed)


__all__ = ["ShardSource", "TableSource", "build_source", "expand_paths", "detect_source", "read_tar"]
