"""Where lmm's greedy decoding spends its time, at bench/compare_openflamingo.py's shapes: media encoding +
prefill, one decode step (dynamic and static KV cache) and the step's matmul floor (its matrix products
alone), then a torch.profiler table of the decode by op and input shape (stderr).

    python bench/profile_decode.py --shape mid --rows 8 --threads 1

On a shared machine trust the proportions, not the absolute times. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compare_openflamingo import SHAPES, batch, build_lmm, matmul_floor  # noqa: E402

from lmm.generation import GenerationConfig, decode_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mid", choices=sorted(SHAPES))
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ops", type=int, default=20, help="rows of the profiler table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = SHAPES[args.shape]
    model = build_lmm(s, "cpu", "auto").eval()
    ids, mask, pix = batch(s, model.image_token_id, model.eoc_token_id, "cpu", args.rows, s["prompt"] + 1, 1)
    n = s["new_tokens"]

    def run(new_tokens: int, cache: str = "dynamic") -> float:
        cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_end_of_chunk=False, cache=cache)
        t = time.perf_counter()
        for _ in decode_steps(model, ids, mask, pix, cfg=cfg):
            pass
        return time.perf_counter() - t

    run(2), run(2, "static")  # warm-up
    first, dynamic, static = [], [], []
    for _ in range(args.repeats):
        first.append(run(1))
        dynamic.append(run(n))
        static.append(run(n, "static"))
    t1 = statistics.median(first)
    out = {
        "bench": "profile_decode",
        "shape": args.shape,
        "rows": args.rows,
        "threads": args.threads,
        "encode_and_prefill_ms": t1 * 1e3,
        "step_ms": {
            "dynamic": (statistics.median(dynamic) - t1) / (n - 1) * 1e3,
            "static": (statistics.median(static) - t1) / (n - 1) * 1e3,
        },
        "matmul_floor_ms": matmul_floor(model, args.rows, args.repeats) * 1e3,
    }
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run(n)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    out["top_ops_share"] = {
        e.key: round(e.self_cpu_time_total / total, 3)
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    }
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=args.ops)
    print(table, file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
