"""What the OpenFlamingo, IDEFICS and LLaVA converters share: untrusted weight files read without unpickling,
output folders written whole or not at all, exact tensor copies, and self-contained saved configs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from lmm.config import ConfigError

PROVENANCE_FILE = "converted_from.json"


def load_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a .safetensors file or a torch checkpoint loaded with weights_only=True.
    A pickle that would run code (or any non-tensor object) is refused with a ConfigError; nesting under
    "model_state_dict" / "state_dict" / "model" (training checkpoints) is unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(p)
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ConfigError(f"{what}: {p} is not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        if "weights_only" in str(e) or isinstance(e, pickle.UnpicklingError):
            raise ConfigError(
                f"{what}: {p} holds Python objects that only a full unpickling (which can run arbitrary code) "
                "would load, so lmm refuses it. Re-save it as a plain state dict of tensors where you trust it: "
                "torch.save(torch.load(path, weights_only=False)['model_state_dict' or ...], 'plain.pt') "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from e
        raise ConfigError(f"{what}: {p} is not a readable torch checkpoint ({e})") from e
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ConfigError(f"{what}: {p} does not hold a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{what}: {p} holds non-tensor entries {bad[:5]}: not a state dict of weights")
    return obj


def copy_tensors(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor], what: str) -> None:
    """targets[k].copy_(sources[k]) with the same key set and exact shapes, else a ConfigError naming them."""
    missing, extra = sorted(set(targets) - set(sources)), sorted(set(sources) - set(targets))
    if missing or extra:
        raise ConfigError(f"{what}: missing tensors {missing[:6]}, unexpected tensors {extra[:6]}")
    for k, v in sources.items():
        if tuple(v.shape) != tuple(targets[k].shape):
            raise ConfigError(f"{what}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(targets[k].shape)}")
    with torch.no_grad():
        for k, v in sources.items():
            targets[k].copy_(v.to(targets[k].dtype))


def plain_config_dict(config) -> dict:
    """An HF config as the dict lmm's `hf_config` fields take (model_type kept, bookkeeping keys dropped)."""
    d = config.to_dict()
    drop = ("transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path", "auto_map")
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in drop}


def publish(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh hidden folder beside `out`, then rename it to `out`: a failure or an
    interruption leaves nothing at `out`. An existing non-empty `out` is refused."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not empty; choose a new folder or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_converted(model, out: str | Path, provenance: dict) -> Path:
    """Save an LMM as a self-contained directory (every frozen weight included, no paths outside it), with a
    small JSON note of where it came from."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, include_frozen=True)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2))

    return publish(out, write)
