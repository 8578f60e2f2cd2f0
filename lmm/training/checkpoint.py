"""Atomic, resumable checkpoints: written into a temporary folder, fsynced, then renamed.

    <run_dir>/checkpoints/step_00000120/
        trainable.safetensors    trainable weights (bridge, new token rows, LoRA), full tensors
        optimizer.pt             optimizer + scheduler state (parameters keyed by name)
        rank_<r>.pt              per rank: data stream state and RNG states (python, numpy, torch, cuda)
        config.yaml              the resolved run config
        meta.json                step and counters; written last
A folder only gets its final name once everything in it is on disk, so `latest_checkpoint` never
sees a half-written one (a crash leaves a `.tmp-step_*` folder, removed by the next save).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"
# Test-only hook: "STEP" makes the process SIGKILL itself halfway through writing checkpoint STEP.
KILL_ENV = "LMM_TEST_KILL_DURING_CHECKPOINT"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders and folders without meta are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit() and (p / META).is_file()
    ]  # a stray folder such as step_final/ is not a checkpoint
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states in a form `torch.load(weights_only=True)` reads."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _maybe_kill_for_test(step: int) -> None:
    if os.environ.get(KILL_ENV) == str(step):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
    weights: dict | None,
    optim_state: dict | None,
    rank_state: dict,
    config_yaml: str,
    meta: dict,
    keep_last: int,
) -> Path | None:
    """Write checkpoint `step` atomically. Every rank calls this; rank 0 writes the shared files.

    weights / optim_state: full (gathered) tensors, needed on rank 0 only. Returns the final folder."""
    from safetensors.torch import save_file

    root = checkpoint_root(run_dir)
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{checkpoint_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    torch.save(rank_state, tmp / f"rank_{rank}.pt")
    if rank == 0:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "trainable.safetensors")
        _maybe_kill_for_test(step)
        torch.save(optim_state, tmp / "optimizer.pt")
        (tmp / "config.yaml").write_text(config_yaml)
    barrier()
    if rank == 0:
        (tmp / META).write_text(json.dumps({**meta, "step": step, "world_size": world_size}, indent=2))
        _fsync_tree(tmp)
        if final.exists():  # the same step saved by an earlier (crashed) attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | Path, rank: int) -> dict:
    """Read a checkpoint for this rank: weights, optimizer (+ scheduler) state, this rank's state, meta."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META})")
    meta = json.loads((path / META).read_text())
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{path} has no state for rank {rank}: it was written by {meta.get('world_size')} "
            "processes; resume with the same number"
        )
    return {
        "meta": meta,
        "weights": load_file(path / "trainable.safetensors"),
        "optim": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        "rank": torch.load(rank_file, map_location="cpu", weights_only=True),
    }
