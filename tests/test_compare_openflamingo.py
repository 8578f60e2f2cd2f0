"""The OpenFlamingo comparison script runs end to end at its tiny shape and reports both sides and the ratios,
including lmm's static-cache and compiled variants (the script itself stops if they decode other tokens than the
dynamic cache) and the bounds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("open_flamingo")
pytest.importorskip("einops_exts")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "compare_openflamingo.py"


def test_compare_script_reports_both_sides_and_ratios():
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--shape",
            "tiny",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--compile-backend",
            "eager",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["train_step_s"]["lmm"] > 0 and out["train_step_s"]["openflamingo"] > 0
    for rows in (1, 8):
        tps = out[f"decode_b{rows}_tokens_per_s"]
        assert min(tps["lmm"], tps["lmm_static"], tps["lmm_compiled"], tps["openflamingo"]) > 0
        assert out[f"decode_b{rows}_compiled_token_agreement"] == 1.0
        assert out[f"decode_b{rows}_compiled_speedup"] == pytest.approx(tps["lmm_compiled"] / tps["openflamingo"])
        # the end-to-end bound counts the prefill too: it is below the per-step bound
        assert 0 < out[f"decode_b{rows}_end_to_end_bound"] < out[f"decode_b{rows}_speedup_bound"]
        assert out[f"decode_b{rows}_prefill_ms"] > 0
        assert out[f"decode_b{rows}_speedup"] == pytest.approx(tps["lmm"] / tps["openflamingo"])
        assert out[f"decode_b{rows}_static_speedup"] == pytest.approx(tps["lmm_static"] / tps["openflamingo"])
        assert out[f"decode_b{rows}_matmul_floor_ms"] > 0 and out[f"decode_b{rows}_speedup_bound"] > 0
