"""Model merging by weight interpolation (UnIVAL): C = (1 - alpha) * A + alpha * B.

    from lmm.merge import merge_models
    merge_models("runs/vqa/final", "runs/caption/final", alpha=0.5, out="runs/merged")

A and B must be save_pretrained directories fine-tuned from the same start: the same model config
(run name aside), the same trainable tensors (bridge, new token rows, LoRA) with the same shapes,
identical frozen weights and tokenizer. Anything else is refused with an IncompatibleModels error.
alpha = 0 and alpha = 1 reproduce A and B exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lmm.config import ConfigError
from lmm.model import CONFIG_FILE, FROZEN_FILE, WEIGHTS_FILE, upgrade_names

TOKENIZER_DIR = "tokenizer"


class IncompatibleModels(ConfigError):
    """The two models cannot be interpolated (different configs, tensors, shapes or starting points)."""


def _config(path: Path) -> dict:
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise IncompatibleModels(
            f"{path}: not a save_pretrained model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg.pop("name", None)
    return cfg


def _diff(a, b, where: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{where}.{k}" if where else k)
        return out
    return [] if a == b else [where]


def _same_tensors(a: dict, b: dict, what: str, pa: Path, pb: Path, exact: bool) -> None:
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise IncompatibleModels(f"{what} differ: only in {pa}: {only_a[:5]}; only in {pb}: {only_b[:5]}")
    for k in a:
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype:
            raise IncompatibleModels(
                f"{what} {k}: {tuple(a[k].shape)} {a[k].dtype} in {pa} but {tuple(b[k].shape)} {b[k].dtype} in {pb}"
            )
        if exact and not torch.equal(a[k], b[k]):
            raise IncompatibleModels(
                f"frozen weight {k} differs between {pa} and {pb}: they were not fine-tuned from the same start"
            )


def _same_tokenizer(pa: Path, pb: Path) -> None:
    ta, tb = pa / TOKENIZER_DIR, pb / TOKENIZER_DIR
    files_a = {p.relative_to(ta): p.read_bytes() for p in ta.rglob("*") if p.is_file()} if ta.is_dir() else {}
    files_b = {p.relative_to(tb): p.read_bytes() for p in tb.rglob("*") if p.is_file()} if tb.is_dir() else {}
    if files_a != files_b:
        raise IncompatibleModels(f"the tokenizers of {pa} and {pb} differ")


def check_compatible(a: str | Path, b: str | Path) -> None:
    """Raise IncompatibleModels naming the first difference that forbids interpolating A and B."""
    from safetensors.torch import load_file

    pa, pb = Path(a), Path(b)
    diff = _diff(_config(pa), _config(pb))
    if diff:
        raise IncompatibleModels(
            f"{pa} and {pb} have different model configs ({', '.join(diff[:6])}); only models "
            "fine-tuned from the same start can be merged"
        )
    _same_tensors(load_file(pa / WEIGHTS_FILE), load_file(pb / WEIGHTS_FILE), "trainable tensors", pa, pb, False)
    fa, fb = (pa / FROZEN_FILE).is_file(), (pb / FROZEN_FILE).is_file()
    if fa != fb:
        raise IncompatibleModels(f"only {pa if fa else pb} has {FROZEN_FILE}: the frozen weights differ")
    if fa:
        _same_tensors(load_file(pa / FROZEN_FILE), load_file(pb / FROZEN_FILE), "frozen tensors", pa, pb, True)
    _same_tokenizer(pa, pb)


def interpolate(wa: dict, wb: dict, alpha: float) -> dict:
    """(1 - alpha) * A + alpha * B per tensor, computed in fp32 (exact at alpha 0 and 1)."""
    out = {}
    for k, ta in wa.items():
        merged = torch.lerp(ta.float(), wb[k].float(), alpha)
        out[k] = merged.to(ta.dtype).contiguous()
    return out


def merge_models(a: str | Path, b: str | Path, alpha: float, out: str | Path) -> Path:
    """Write C = (1 - alpha) A + alpha B to `out` (a save_pretrained directory LMM.from_pretrained opens)."""
    from safetensors.torch import load_file, save_file

    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be between 0 (= A) and 1 (= B), got {alpha}")
    pa, pb, po = Path(a), Path(b), Path(out)
    if po.resolve() in (pa.resolve(), pb.resolve()):
        raise ConfigError("--out must be a new directory, not one of the inputs")
    check_compatible(pa, pb)
    po.mkdir(parents=True, exist_ok=True)
    merged = interpolate(
        upgrade_names(load_file(pa / WEIGHTS_FILE)), upgrade_names(load_file(pb / WEIGHTS_FILE)), alpha
    )
    save_file(merged, po / WEIGHTS_FILE)
    cfg = json.loads((pa / CONFIG_FILE).read_text())
    cfg["name"] = (
        f"merge({cfg.get('name', 'a')}, {json.loads((pb / CONFIG_FILE).read_text()).get('name', 'b')}, alpha={alpha})"
    )
    (po / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    if (pa / FROZEN_FILE).is_file():
        shutil.copyfile(pa / FROZEN_FILE, po / FROZEN_FILE)
    if (pa / TOKENIZER_DIR).is_dir():
        shutil.copytree(pa / TOKENIZER_DIR, po / TOKENIZER_DIR, dirs_exist_ok=True)
    return po
