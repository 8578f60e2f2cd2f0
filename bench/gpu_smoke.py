"""Everything a lent GPU should confirm, in one command that ends in minutes: one JSON line per check.

    python bench/gpu_smoke.py                  # on a CUDA machine (the 3b benches need ~45 GiB)
    python bench/gpu_smoke.py --device cpu     # dry run: the same checks at the small shape, quantisation skipped
    python bench/gpu_smoke.py --only parity,qlora

Checks (each in its own process, with its own timeout, so one failure or hang does not stop the rest):
  pytest_gpu   the gpu-marked tests
  placement    a model built on the device has every tensor there; forward, loss, cached generation
  parity       bf16 frozen weights vs fp32: logits, greedy tokens, one train step (loss, gradient direction)
  adamw8bit    bitsandbytes AdamW8bit against torch AdamW, 10 steps each (needs bitsandbytes + CUDA)
  qlora        a saved model directory restarted with LoRA over a 4-bit LM (the instruct_lora.yaml route;
               without CUDA + bitsandbytes the same route over a full-precision LM)
  train_3b, train_3b_lowmem, generate_3b    bench/train_step.py and bench/generate.py at the 3b shape
  generate_3b_compiled   bench/generate.py --compile (the decode step torch.compile'd, CUDA graphs)
  memory_model the analytic estimate for the same shape (bench/memory_model.py), beside the measured peaks
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECKS = [
    "placement",
    "parity",
    "pytest_gpu",
    "qlora",
    "adamw8bit",
    "train_3b",
    "generate_3b",
    "generate_3b_compiled",
    "train_3b_lowmem",
    "memory_model",
]
TIMEOUT_S = {
    "pytest_gpu": 120,
    "train_3b": 120,
    "train_3b_lowmem": 120,
    "generate_3b": 100,
    "generate_3b_compiled": 180,  # compiles once per batch size (1 and 32); CUDA graphs
}  # others: 75 s


class Skip(Exception):
    pass


# ---------------------------------------------------------------------------------------------- the checks


def _small_model(device: str, dtype: str = "fp32", seed: int = 0):
    import torch

    sys.path.insert(0, str(HERE))
    from shapes import get_shape

    from lmm.model import LMM
    from lmm.testing import tiny_tokenizer

    torch.manual_seed(seed)
    model = LMM.from_config(get_shape("small", dtype=dtype).lmm, tokenizer=tiny_tokenizer(), device=device)
    with torch.no_grad():
        for blk in model.xattn_blocks():  # open gates: the images must change the logits
            blk.attn_gate.fill_(0.5)
            blk.ff_gate.fill_(0.5)
    return model


def _small_batch(model, device: str, B: int = 4, T: int = 48):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(402, model.lm.config.vocab_size, (B, T), generator=g)
    ids[:, 0] = ids[:, T // 2] = model.image_token_id
    pix = torch.randint(0, 256, (B, 2, 1, 3, 32, 32), generator=g, dtype=torch.uint8)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.masked_fill(ids == model.image_token_id, -100).to(device),
        "pixel_values": pix.to(device),
    }


def _autocast(device: str, on: bool):
    import contextlib

    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if on and device == "cuda" else contextlib.nullcontext()


def check_placement(device: str) -> dict:
    import torch

    from lmm.generation import GenerationConfig, decode_steps

    model = _small_model(device, "auto")
    wrong = [
        n
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.device.type != torch.device(device).type
    ]
    batch = _small_batch(model, device)
    with _autocast(device, True):
        loss = model(**batch, return_logits=False).loss
    loss.backward()
    model.eval()
    ids, mask, pix = batch["input_ids"][:2, :20], batch["attention_mask"][:2, :20], batch["pixel_values"][:2, :1]
    ids[:, 10] = 500  # one image per row
    cfg = GenerationConfig(max_new_tokens=12, stop_at_end_of_chunk=False)
    cached = torch.stack(list(decode_steps(model, ids, mask, pix, cfg=cfg)), 1)
    cfg.use_cache = False
    uncached = torch.stack(list(decode_steps(model, ids, mask, pix, cfg=cfg)), 1)
    frozen = {str(p.dtype) for n, p in model.lm.named_parameters() if not p.requires_grad}
    ok = not wrong and bool(torch.isfinite(loss)) and torch.equal(cached, uncached)
    return {
        "ok": ok,
        "off_device": wrong[:5],
        "loss": float(loss),
        "cached_equals_uncached": torch.equal(cached, uncached),
        "frozen_dtypes": sorted(frozen),
        "trainable_dtypes": sorted({str(p.dtype) for p in model.trainable_parameters()}),
    }


def check_parity(device: str) -> dict:
    import torch

    from lmm.generation import GenerationConfig, decode_steps

    ref = _small_model(device, "fp32")
    low = _small_model(device, "bf16")
    low.load_state_dict(ref.state_dict())  # the same weights; frozen ones rounded to bf16
    batch = _small_batch(ref, device)
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
    out = {}
    with torch.no_grad():
        ref.eval(), low.eval()
        l_ref = ref(**batch).logits
        with _autocast(device, True):
            l_low = low(**batch).logits
        out["logits_rel_err"] = rel(l_low, l_ref)
        out["top1_agreement"] = float((l_low.argmax(-1) == l_ref.argmax(-1)).float().mean())
        cfg = GenerationConfig(max_new_tokens=16, stop_at_end_of_chunk=False)
        ids, mask, pix = batch["input_ids"][:, :24], batch["attention_mask"][:, :24], batch["pixel_values"][:, :1]
        g_ref = torch.stack(list(decode_steps(ref, ids, mask, pix, cfg=cfg)), 1)
        with _autocast(device, True):
            g_low = torch.stack(list(decode_steps(low, ids, mask, pix, cfg=cfg)), 1)
        out["greedy_token_agreement"] = float((g_ref == g_low).float().mean())
    grads = []
    for model, amp in ((ref, False), (low, True)):
        model.train()
        with _autocast(device, amp):
            loss = model(**batch, return_logits=False).loss
        loss.backward()
        grads.append((float(loss), torch.cat([p.grad.float().flatten() for p in model.trainable_parameters()])))
    out["train_loss_rel_err"] = abs(grads[1][0] - grads[0][0]) / abs(grads[0][0])
    out["grad_cosine"] = float(torch.nn.functional.cosine_similarity(grads[0][1], grads[1][1], dim=0))
    out["ok"] = out["logits_rel_err"] < 3e-2 and out["train_loss_rel_err"] < 1e-2 and out["grad_cosine"] > 0.99
    return out


def _train(model, opt, batch: dict, device: str, steps: int) -> list[float]:
    """Losses of `steps` optimizer steps on one batch (bf16 autocast on CUDA)."""
    losses = []
    for _ in range(steps):
        with _autocast(device, True):
            loss = model(**batch, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _need_bnb(device: str) -> None:
    if device != "cuda":
        raise Skip("needs CUDA")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not installed")


def check_adamw8bit(device: str) -> dict:
    _need_bnb(device)
    import torch

    from lmm.training.config import OptimConfig
    from lmm.training.optim import build_optimizer

    out = {}
    for eight in (False, True):
        model = _small_model(device, "auto")
        model.train()
        opt = build_optimizer(model, OptimConfig(lr=1e-3, eight_bit=eight), torch.device(device))
        losses = _train(model, opt, _small_batch(model, device), device, steps=10)
        out["adamw8bit" if eight else "adamw"] = {
            "first": losses[0],
            "last": losses[-1],
            "optimizer": type(opt).__name__,
        }
    out["ok"] = out["adamw8bit"]["last"] < out["adamw8bit"]["first"] and out["adamw"]["last"] < out["adamw"]["first"]
    return out


def check_qlora(device: str) -> dict:
    """On CUDA with bitsandbytes: LoRA over a 4-bit LM. Elsewhere the same route over a full-precision LM
    (a dry run of everything but the quantisation), reported as such."""
    four_bit = device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
    import torch
    from transformers import AutoModelForCausalLM

    from lmm.config import LanguageConfig
    from lmm.model import LMM
    from lmm.testing import tiny_lmm_config, tiny_tokenizer
    from lmm.training import TrainConfig, build_model
    from lmm.training.config import OptimConfig
    from lmm.training.optim import build_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_lmm_config("llama")
        lm_cfg = dict(
            cfg.language.hf_config, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
        )
        from transformers import AutoConfig

        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lm_cfg.pop("model_type"), **lm_cfg))
        lm.save_pretrained(f"{tmp}/lm")
        tiny_tokenizer().save_pretrained(f"{tmp}/lm")
        cfg.language = LanguageConfig(path=f"{tmp}/lm")
        cfg.dtype = "auto"
        LMM.from_config(cfg, device=device).save_pretrained(f"{tmp}/base")
        train_cfg = TrainConfig.from_dict(
            {
                "preset": f"{tmp}/base",
                "run_dir": f"{tmp}/run",
                "model_overrides": [
                    "lora.r=8",
                    "lora.target_modules=[q_proj,v_proj]",
                    f"language.load_in_4bit={str(four_bit).lower()}",
                ],
            }
        )
        model = build_model(train_cfg, torch.device(device))
        linear4 = sum(type(m).__name__ == "Linear4bit" for m in model.lm.modules())
        lora_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "lora_" in n})
        model.train()
        opt = build_optimizer(model, OptimConfig(lr=1e-3), torch.device(device))
        batch = _small_batch(model, device, T=32)
        batch["pixel_values"] = batch["pixel_values"].float().div(255)
        losses = _train(model, opt, batch, device, steps=5)
    ok = (linear4 > 0) == four_bit and lora_dtypes == ["torch.float32"] and losses[-1] < losses[0]
    return {"ok": ok, "four_bit": four_bit, "linear4bit_modules": linear4, "lora_dtypes": lora_dtypes, "losses": losses}


def _script(device: str, script: str, *args: str) -> dict:
    shape = "3b" if device == "cuda" else "small"
    proc = subprocess.run(
        [sys.executable, str(HERE / script), "--shape", shape, *args]
        + (["--device", device] if script != "memory_model.py" else []),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-1500:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["ok"] = True
    return out


def check_pytest_gpu(device: str) -> dict:
    # only the files that hold gpu-marked tests: the others may need packages a GPU image lacks (openai, selenium)
    files = sorted(str(f) for f in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in f.read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )  # the installed lmm, not ./lmm
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    return {
        "ok": proc.returncode in (0, 5),
        "summary": last,
        "returncode": proc.returncode,
        "failures": [line for line in proc.stdout.splitlines() if line.startswith("FAILED")][:10],
    }


def check_memory_model(device: str) -> dict:
    out = _script("cuda", "memory_model.py")  # the analytic 3b estimate needs no GPU
    return {"ok": True, "totals_gib": {k: v["total_gib"] for k, v in out["estimates"].items()}, "fits": out["fits"]}


RUNNERS = {
    "pytest_gpu": check_pytest_gpu,
    "placement": check_placement,
    "parity": check_parity,
    "adamw8bit": check_adamw8bit,
    "qlora": check_qlora,
    "memory_model": check_memory_model,
    "train_3b": lambda d: _script(d, "train_step.py", "--steps", "5"),
    "train_3b_lowmem": lambda d: _script(
        d, "train_step.py", "--steps", "5", "--grad-checkpointing", *(["--eight-bit"] if d == "cuda" else [])
    ),
    "generate_3b": lambda d: _script(d, "generate.py", "--new-tokens", "64", "--batch", "32", "--repeats", "2"),
    "generate_3b_compiled": lambda d: _script(
        d, "generate.py", "--new-tokens", "64", "--batch", "32", "--repeats", "2", "--compile"
    ),
}


# ---------------------------------------------------------------------------------------------- the driver


def run_one(name: str, device: str) -> None:
    """Child process: run one check, print its JSON result as the last line."""
    from lmm.runtime import enable_tf32, offline

    offline()
    enable_tf32()
    t = time.perf_counter()
    try:
        res = RUNNERS[name](device)
    except Skip as e:
        res = {"ok": True, "skipped": str(e)}
    res = {"check": name, "device": device, "seconds": round(time.perf_counter() - t, 1), **res}
    print(json.dumps(res, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu (dry run)")
    ap.add_argument("--only", default=None, help="comma-separated checks (default: all)")
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)  # child mode
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.run:
        return run_one(args.run, args.device)
    names = args.only.split(",") if args.only else CHECKS
    unknown = [n for n in names if n not in RUNNERS]
    if unknown:
        raise SystemExit(f"unknown checks {unknown}; known: {', '.join(CHECKS)}")
    results = []
    for name in names:
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--run", name, "--device", args.device],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S.get(name, 75),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            lines = proc.stdout.strip().splitlines()
            res = (
                json.loads(lines[-1])
                if proc.returncode == 0 and lines
                else {"check": name, "ok": False, "returncode": proc.returncode, "error": proc.stderr[-1500:]}
            )
        except subprocess.TimeoutExpired:
            res = {"check": name, "ok": False, "error": f"timed out after {TIMEOUT_S.get(name, 75)} s"}
        res.setdefault("wall_s", round(time.perf_counter() - t, 1))
        results.append(res)
        print(json.dumps(res, default=str), flush=True)
    print(
        json.dumps(
            {
                "check": "summary",
                "device": args.device,
                "ok": all(r["ok"] for r in results),
                "failed": [r["check"] for r in results if not r["ok"]],
            }
        )
    )


if __name__ == "__main__":
    main()
