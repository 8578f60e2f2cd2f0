"""One full training step (vision fwd, bridge + LM fwd/bwd, AdamW step) at a named shape.

    python bench/train_step.py --shape small --device cpu
    python bench/train_step.py --shape 3b --device cuda

Prints samples/s, tokens/s, images/s, peak memory and MFU (FlopCounterMode FLOPs of one step / median step
time / the matmul rate measured in the same run), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from shapes import build, get_shape, matmul_rate, peak_memory_gib, random_batch, sync  # noqa: E402

from lmm.testing import saved_activation_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=["small", "3b", "9b"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--eight-bit", action="store_true", help="bitsandbytes AdamW8bit (CUDA)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args()
    shape = get_shape(args.shape)
    model = build(shape, args.device)
    model.train()
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    params = model.trainable_parameters()
    if args.eight_bit:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, fused=args.device.startswith("cuda"))
    batch = random_batch(model, shape, args.device)
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(**batch, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def loss_only():
        with autocast:
            return model(**batch, return_logits=False).loss

    saved = saved_activation_bytes(model, loss_only)  # activations autograd keeps for backward (one step's worth)
    opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    rate = matmul_rate(args.device)
    out = {
        "bench": "train_step",
        "shape": args.shape,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": shape.batch,
        "step_s": dt,
        "samples_per_s": shape.batch / dt,
        "tokens_per_s": shape.batch * shape.tokens / dt,
        "images_per_s": shape.batch * shape.images / dt,
        "tflop_per_step": flops / 1e12,
        "matmul_tflops": rate / 1e12,
        "mfu": flops / dt / rate,
        "peak_mem_gib": peak_memory_gib(args.device),
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "saved_activation_mib": saved / 2**20,
        "grad_checkpointing": args.grad_checkpointing,
        "eight_bit": args.eight_bit,
        "torch": torch.__version__,
    }
    for k, v in out.items():
        print(f"{k:>20}: {v:.4g}" if isinstance(v, float) else f"{k:>20}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
