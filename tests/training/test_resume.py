"""Killed runs (SIGKILL mid-training, and mid-checkpoint-write) resume to the same losses, step for step."""

from __future__ import annotations

import json
import signal
import time

import pytest

from lmm.training.checkpoint import KILL_ENV, complete_checkpoints

STEPS = 12


def config(run_dir, tiny_dir, dataset, h) -> dict:
    return h.run_config(
        run_dir, tiny_dir, dataset, schedule={"max_steps": STEPS, "warmup_steps": 3}, checkpoint={"every": 3}
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir, dataset, h) -> dict:
    """Per-step losses of the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    h.finish(h.launch(config(tmp / "run", tiny_dir, dataset, h), tmp))
    losses = h.step_losses(tmp / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_kill_during_checkpoint_write_resumes_from_last_complete_one(tmp_path, tiny_dir, dataset, h, reference):
    cfg = config(tmp_path / "run", tiny_dir, dataset, h)
    killed = h.launch(cfg, tmp_path, {KILL_ENV: "6"})  # SIGKILLs itself halfway through writing checkpoint 6
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert (ckpt_dir / ".tmp-step_00000006").is_dir()  # the half-written checkpoint is there ...
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step_00000003"]  # ... and ignored

    out = h.finish(h.launch(cfg, tmp_path))
    assert "resumed from" in out and "step 3" in out
    assert h.step_losses(tmp_path / "run") == reference  # exactly the same numbers, step for step
    assert not list(ckpt_dir.glob(".tmp-*"))
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step_00000009", "step_00000012"]  # keep 2


def test_sigkill_mid_training_resumes_to_identical_losses(tmp_path, tiny_dir, dataset, h, reference):
    cfg = config(tmp_path / "run", tiny_dir, dataset, h)
    proc = h.launch(cfg, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill as soon as step 4 has been logged
        if metrics.is_file() and any(
            json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines() if line.strip()
        ):
            break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    partial = h.step_losses(tmp_path / "run")
    assert 4 <= max(partial) < STEPS, "the run must have been killed mid-training"
    done = [int(p.name.split("_")[1]) for p in complete_checkpoints(tmp_path / "run")]
    assert done and max(done) < STEPS

    out = h.finish(h.launch(cfg, tmp_path))
    assert f"step {max(done)}" in out
    assert h.step_losses(tmp_path / "run") == reference
