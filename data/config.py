"""Typed data configuration (loadable by `lmm.config.from_dict` / `load_yaml`, with dotted overrides).

A run reads either one mixture (`datasets`) or an ordered curriculum (`stages`), each stage with its
own mixture and length in steps (batches per rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from lmm.config import ConfigError, from_dict

SOURCES = ("auto", "webdataset", "parquet", "json", "arrow", "disk")
FORMATS = ("auto", "pair", "mmc4", "obelics", "conversation", "video", "audio")


@dataclass
class DatasetConfig:
    """One dataset: where its files are, how records are laid out, and its share of the mixture.

    path: a file, glob, brace pattern (`shards/{000..009}.tar`) or folder.
    prepare: the name of a data preparer (`lmm.data.prepare.PREPARERS`) that writes `path` when it is missing
    (e.g. the demo's data, made from a pip package into ordinary conversation JSON).
    """

    path: str = ""
    name: str | None = None  # shown in logs / task_names; default: derived from path
    source: Literal["auto", "webdataset", "parquet", "json", "arrow", "disk"] = "auto"
    format: Literal["auto", "pair", "mmc4", "obelics", "conversation", "video", "audio"] = "auto"
    streaming: bool = False  # HF datasets: stream the files instead of building an Arrow cache
    split: str = "train"  # split name inside a `save_to_disk` DatasetDict
    weight: float = 1.0  # share of the mixture (normalised within a stage)
    loss_weight: float = 1.0  # per-dataset loss weight for the trainer (via task_ids)
    image_root: str | None = None  # folder that relative image/video/audio paths are resolved against
    image_key: str | None = None  # column/extension holding the image (default: detected)
    text_key: str | None = None  # column/extension holding the caption (conversation: a JSON member of turns)
    min_similarity: float = 0.24  # MMC4: drop images whose matched_sim is below this
    num_frames: int | None = None  # video: frames sampled uniformly (default: data.num_frames)
    repeat: int = 1  # 4M repeat sampling: each decoded sample used up to this many times
    repeat_buffer: int = 0  # size of the in-memory repeat buffer (0: off)
    shuffle: bool = True  # shuffle shard order (files) / row order (tables) each epoch
    prepare: str | None = None  # a data preparer that writes `path` when it is missing (see above)

    def display_name(self) -> str:
        if self.name:
            return self.name
        parts = self.path.rstrip("/").split("/")
        return "/".join(parts[-2:]) if len(parts) > 1 else self.path

    def identity(self) -> tuple:
        """What makes two entries the same dataset (same stream) when they appear in several stages."""
        return (self.path, self.source, self.format, self.split)


@dataclass
class StageConfig:
    """One curriculum stage: a mixture used for `steps` batches (None: until the data ends)."""

    datasets: list[DatasetConfig] = field(default_factory=list)
    steps: int | None = None
    name: str | None = None


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)  # a single-stage mixture
    stages: list[StageConfig] = field(default_factory=list)  # or a curriculum
    batch_size: int = 8  # rows per batch (per rank)
    max_tokens: int = 512  # longest sample (and packed row length); longer samples are truncated
    max_images: int = 8  # most images one sample may hold
    too_many_images: Literal["skip", "truncate"] = "skip"  # skip (and count) or keep the first max_images
    num_frames: int = 8  # video frames sampled uniformly per clip
    packing: bool = False  # several samples per fixed-length row (segment_ids / position_ids)
    pack_max_images: int | None = None  # most media per packed row (default: unlimited)
    num_workers: int = 0  # DataLoader worker processes per rank
    prefetch_factor: int = 2
    seed: int = 0
    epochs: int | None = None  # None: cycle forever (step-based training); N: stop after N passes
    drop_last: bool = False  # drop a final short batch (finite runs)
    log_bad_samples: bool = True  # log each skipped sample with its key

    def resolved_stages(self) -> list[StageConfig]:
        """The stages to run: `stages`, or one stage made of `datasets`; validated."""
        if self.datasets and self.stages:
            raise ConfigError("data: give either `datasets` (one mixture) or `stages` (a curriculum), not both")
        stages = self.stages or [StageConfig(datasets=self.datasets)]
        if not any(s.datasets for s in stages):
            raise ConfigError(
                "data: no datasets configured; add `data.datasets: [{path: ...}]` "
                "(configs/demo.yaml shows a prepared one: `prepare: NAME`)"
            )
        for i, s in enumerate(stages):
            if not s.datasets:
                raise ConfigError(f"data.stages[{i}] has no datasets")
            if s.steps is None and i < len(stages) - 1:
                raise ConfigError(f"data.stages[{i}] needs `steps` (only the last stage may run until the data ends)")
            if s.steps is not None and s.steps <= 0:
                raise ConfigError(f"data.stages[{i}].steps must be positive, got {s.steps}")
            for d in s.datasets:
                if d.weight <= 0:
                    raise ConfigError(f"dataset {d.display_name()!r}: weight must be > 0, got {d.weight}")
                if d.repeat < 1:
                    raise ConfigError(f"dataset {d.display_name()!r}: repeat must be >= 1, got {d.repeat}")
                if not d.path:
                    raise ConfigError("a dataset has no `path`; set it to a file, glob, brace pattern or folder")
        seen: dict = {}
        for s in stages:
            for d in s.datasets:
                other = seen.setdefault(d.display_name(), d.identity())
                if other != d.identity():
                    raise ConfigError(
                        f"two different datasets are both named {d.display_name()!r}; give them distinct `name:` values"
                    )
        for name, v in (
            ("batch_size", self.batch_size),
            ("max_tokens", self.max_tokens),
            ("max_images", self.max_images),
            ("num_frames", self.num_frames),
        ):
            if v < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {v}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        return stages

    def task_names(self) -> list[str]:
        """Distinct dataset names over all stages, in first-seen order: task_ids index this list."""
        names: list[str] = []
        for s in self.resolved_stages():
            for d in s.datasets:
                if d.display_name() not in names:
                    names.append(d.display_name())
        return names

    def loss_weights(self) -> list[float]:
        """Per-task loss weight, aligned with task_names()."""
        weights: dict[str, float] = {}
        for s in self.resolved_stages():
            for d in s.datasets:
                weights.setdefault(d.display_name(), d.loss_weight)
        return [weights[n] for n in self.task_names()]

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        return from_dict(cls, d)

    @classmethod
    def from_yaml(cls, path, overrides: list[str] | None = None) -> DataConfig:
        """A YAML file whose top level is the data section (or a full run config with a `data:` key)."""
        import yaml

        from lmm.config import apply_overrides

        if not os.path.isfile(path):
            raise ConfigError(f"data config file not found: {path}")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if isinstance(raw, dict) and "data" in raw and isinstance(raw["data"], dict):
            raw = raw["data"]
        return from_dict(cls, apply_overrides(raw, overrides))


__all__ = ["DataConfig", "DatasetConfig", "StageConfig", "ConfigError"]
