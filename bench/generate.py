"""Generation speed: batch 1 with one image, a 32-token prompt and 64 new greedy tokens (time to first token,
decode tokens/s), and batch-32 throughput.

    python bench/generate.py --shape small --device cpu
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
from shapes import build, get_shape, sync  # noqa: E402

from lmm.generation import GenerationConfig, decode_steps  # noqa: E402


def timed_decode(
    model, ids, mask, pix, new_tokens: int, device: str, cache: str = "dynamic", compile: bool = False
) -> tuple[float, float, int]:
    """(seconds to the first token, seconds for all tokens, tokens generated); only EOS stops a row early."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_end_of_chunk=False, cache=cache, compile=compile)
    sync(device)
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in decode_steps(model, ids, mask, pix, None, cfg):
        n += 1
        if first is None:
            sync(device)
            first = time.perf_counter() - t0
    sync(device)
    return first, time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=["small", "3b", "9b"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default="dynamic", choices=["dynamic", "static"], help="the decode loop's KV cache")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (static cache)")
    args = ap.parse_args()
    shape = get_shape(args.shape)
    model = build(shape, args.device).eval()
    V = model.lm.config.vocab_size

    def inputs(B):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(402, V, (B, 32), generator=g)
        ids[:, 0] = model.image_token_id
        pix = torch.randn(B, 1, 1, 3, shape.image_size, shape.image_size, generator=g)
        return ids.to(args.device), torch.ones_like(ids).to(args.device), pix.to(args.device)

    run = lambda B: timed_decode(model, *inputs(B), args.new_tokens, args.device, args.cache, args.compile)  # noqa: E731
    single = [run(1) for _ in range(args.repeats + 1)][1:]  # the first call warms up (and compiles)
    ttft = statistics.median(s[0] for s in single)
    decode_tps = statistics.median((s[2] - 1) / (s[1] - s[0]) for s in single)
    batched = [run(args.batch) for _ in range(2)][1:]
    out = {
        "bench": "generate",
        "shape": args.shape,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "cache": args.cache,
        "compile": args.compile,
        "ttft_s": ttft,
        "decode_tokens_per_s_b1": decode_tps,
        "tokens_generated_b1": single[0][2],
        "batch": args.batch,
        "throughput_tokens_per_s": args.batch * batched[0][2] / batched[0][1],
        "torch": torch.__version__,
    }
    for k, v in out.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
