"""Data preparers: named steps that write a dataset's files in an ordinary training format.

A dataset entry may name one (`{path: DIR/train.json, format: conversation, prepare: easyvqa}`): when `path`
does not exist yet, `prepare_datasets` (called by `lmm train` before the loader starts) runs the preparer
into `path`'s folder. `lmm data prepare NAME --out DIR` runs one by hand. The files are then read like any
other dataset; nothing about the preparer reaches the loader.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lmm.config import ConfigError


@dataclass(frozen=True)
class Preparer:
    """`function` ("module:attr") writes the files into a folder and returns their paths; `requires` names the
    package it reads from (checked at config validation, before anything loads)."""

    function: str
    requires: str | None = None
    pip: str | None = None  # what to install when `requires` is missing
    help: str = ""


PREPARERS: dict[str, Preparer] = {
    "easyvqa": Preparer(
        "lmm.data.easyvqa:prepare",
        requires="easy_vqa",
        pip="easy-vqa (or lmm[demo])",
        help="easy-vqa (pip package `easy-vqa`): {train,test}.json as LLaVA-style conversations, "
        "{train,test}_caption.json as image-caption pairs; images are the package's PNGs",
    ),
}


def get_preparer(name: str) -> Preparer:
    """The registered preparer, or a ConfigError naming the known ones (and the closest)."""
    if name not in PREPARERS:
        import difflib

        near = difflib.get_close_matches(name, list(PREPARERS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown data preparer {name!r}.{hint} Known: {', '.join(PREPARERS)}")
    p = PREPARERS[name]
    if p.requires and importlib.util.find_spec(p.requires) is None:
        raise ConfigError(f"data preparer {name!r} needs the package {p.requires}: pip install {p.pip or p.requires}")
    return p


def run_preparer(name: str, out_dir: str | Path) -> list[Path]:
    """Write the files of preparer `name` into `out_dir` (created); returns their paths."""
    p = get_preparer(name)
    module, _, attr = p.function.partition(":")
    out = Path(os.path.expanduser(str(out_dir)))
    out.mkdir(parents=True, exist_ok=True)
    return [Path(f) for f in getattr(importlib.import_module(module), attr)(out)]


def prepare_dataset(dcfg) -> bool:
    """Run the dataset's preparer if it names one and its `path` is missing; True if it ran."""
    if not dcfg.prepare:
        return False
    path = Path(os.path.expanduser(dcfg.path))
    if path.exists():
        return False
    written = run_preparer(dcfg.prepare, path.parent)
    if not path.exists():
        raise ConfigError(
            f"data preparer {dcfg.prepare!r} wrote {', '.join(f.name for f in written)} into "
            f"{path.parent}, but not {path.name}: point `path` at one of those files"
        )
    return True


def prepare_datasets(data_cfg) -> list[str]:
    """Run every missing dataset's preparer (each once); returns the paths written for."""
    done = []
    for stage in data_cfg.resolved_stages():
        for d in stage.datasets:
            if d.path not in done and prepare_dataset(d):
                done.append(d.path)
    return done
