"""Smoke test of the benchmark scripts at the small CPU shape: they run and end with one valid JSON line
holding positive rates (no timing thresholds: numbers come from the scripts, not from tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    "script,args,keys",
    [
        ("train_step.py", ["--steps", "2"], ["samples_per_s", "tokens_per_s", "images_per_s", "mfu", "tflop_per_step"]),
        (
            "generate.py",
            ["--new-tokens", "8", "--batch", "4", "--repeats", "1"],
            ["ttft_s", "decode_tokens_per_s_b1", "throughput_tokens_per_s"],
        ),
        ("data.py", ["--workers", "0", "--docs", "16"], ["samples_per_s", "images_per_s"]),
        ("label.py", ["--samples", "8", "--per-shard", "4", "--batch", "4", "--new-tokens", "4"], ["samples_per_s"]),
    ],
)
def test_bench_script_prints_json(script, args, keys):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--shape", "small", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shape"] == "small"
    for k in keys:
        assert out[k] > 0, (k, out)
