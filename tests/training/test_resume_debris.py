"""Resume survives what a crash leaves behind: a torn last line in metrics.jsonl, a stray `step_final/` folder
and a damaged newest checkpoint (the previous complete one is used); two processes converting the same preset
into an empty cache both succeed and leave no temporary file."""

from __future__ import annotations

import os
import subprocess
import sys

from lmm.training.checkpoint import complete_checkpoints
from lmm.training.monitor import read_metrics


def test_resume_past_torn_metrics_stray_folder_and_damaged_newest_checkpoint(tmp_path, tiny_dir, dataset, h):
    cfg = h.run_config(
        tmp_path / "run", tiny_dir, dataset, schedule={"max_steps": 6, "warmup_steps": 1}, checkpoint={"every": 3}
    )
    h.finish(h.launch(cfg, tmp_path))
    run = tmp_path / "run"
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000003", "step_00000006"]
    (run / "checkpoints" / "step_final").mkdir()  # debris: not a step folder
    (run / "checkpoints" / "step_final" / "meta.json").write_text("{}")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.12')  # a line torn by a crash mid-write
    newest = run / "checkpoints" / "step_00000006" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a damaged newest checkpoint

    cfg["schedule"]["max_steps"] = 9
    out = h.finish(h.launch(cfg, tmp_path))
    assert "step_00000006 cannot be read" in out
    assert "resumed from" in out and "(step 3)" in out
    steps = [m["step"] for m in read_metrics(run) if "loss" in m]
    assert steps == list(range(1, 10))  # 4-6 written again from step 3, the torn line gone


def test_two_processes_converting_a_preset_at_once_both_succeed(tmp_path):
    code = "from lmm.presets import efficientnet_checkpoint; print(efficientnet_checkpoint())"
    env = {**os.environ, "LMM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    files = sorted(f.name for f in (tmp_path / "cache").iterdir())
    assert files == ["efficientnet-lite0-open_clip.safetensors"]  # no temporary file left behind
