"""Activation checkpointing works from every entry point (API, trainer, benchmark): the bytes autograd saves
for backward drop, and the gradients stay the same. (transformers' own `gradient_checkpointing_enable` saved
exactly as much with and without, because the frozen layers stay in eval mode.)"""

import json
import subprocess
import sys
from pathlib import Path

import torch

from lmm.testing import ListSource, saved_activation_bytes, tiny_lmm, tiny_train_config
from lmm.training.trainer import Trainer


def _batch(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 300, (2, 24), generator=g)
    ids[:, 0] = model.image_token_id
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.masked_fill(ids == model.image_token_id, -100),
        "pixel_values": torch.rand(2, 1, 1, 3, 32, 32, generator=g),
    }


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_api_checkpointing_cuts_saved_activations_and_keeps_gradients():
    model = tiny_lmm("llama", "flamingo", gates=0.5).train()
    batch = _batch(model)
    full = saved_activation_bytes(model, lambda: model(**batch, return_logits=False).loss)
    g_full = _grads(model)
    model.zero_grad(set_to_none=True)
    assert model.gradient_checkpointing_enable() == 4
    ckpt = saved_activation_bytes(model, lambda: model(**batch, return_logits=False).loss)
    assert ckpt < 0.5 * full, (ckpt, full)
    g_ckpt = _grads(model)
    assert g_full.keys() == g_ckpt.keys()
    for n in g_full:
        torch.testing.assert_close(g_ckpt[n], g_full[n], rtol=1e-5, atol=1e-7)
    assert model.gradient_checkpointing_enable() == 0  # idempotent


def test_trainer_checkpointing_cuts_saved_activations(tmp_path):
    sizes = []
    for flag in (False, True):
        model = tiny_lmm("llama", "flamingo", gates=0.5)
        batch = _batch(model)
        trainer = Trainer(
            model, tiny_train_config(tmp_path / str(flag), gradient_checkpointing=flag), ListSource([batch])
        )
        step = lambda trainer=trainer, batch=batch: trainer.model(**batch, return_logits=False).loss  # noqa: E731
        sizes.append(saved_activation_bytes(trainer.model, step))
    assert sizes[1] < 0.5 * sizes[0], sizes


def test_bench_checkpointing_flag_cuts_saved_activations():
    bench = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"
    mib = []
    for extra in ([], ["--grad-checkpointing"]):
        proc = subprocess.run(
            [sys.executable, str(bench), "--shape", "small", "--steps", "1", *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        mib.append(json.loads(proc.stdout.strip().splitlines()[-1])["saved_activation_mib"])
    assert mib[1] < 0.5 * mib[0], mib
