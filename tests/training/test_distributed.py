"""torchrun with 2 gloo processes (DDP, FSDP2) follows the 1-process loss curve for the same global batch.

The real loader is used on both sides: 1 process x 2 data workers x 2 accumulated micro-batches reads
the same two readers' batches per step as 2 processes x 1 worker x 1 micro-batch.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmm.training.checkpoint import KILL_ENV, complete_checkpoints

STEPS = 5


def config(run_dir, tiny_dir, dataset, h, **top) -> dict:
    return h.run_config(
        run_dir, tiny_dir, dataset, schedule={"max_steps": STEPS, "warmup_steps": 1}, checkpoint={"every": 2}, **top
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_dir, dataset, h):
    """(losses, final trainable weights) of the 1-process run: global batch 8 = 2 micro-batches of 4."""
    tmp = tmp_path_factory.mktemp("single")
    cfg = config(
        tmp / "run", tiny_dir, dataset, h, optim={"global_batch_size": 8, "grad_accum": 2}, data={"num_workers": 2}
    )
    h.finish(h.launch(cfg, tmp))
    return h.step_losses(tmp / "run"), load_file(tmp / "run" / "final" / "trainable.safetensors")


def assert_same_run(run_dir, single, h):
    losses, weights = single
    got = h.step_losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(losses, rel=1e-5)
    assert losses[STEPS] < losses[1]  # it trained
    final = load_file(run_dir / "final" / "trainable.safetensors")
    assert final.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(final[k], weights[k], rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_two_processes_match_one(tmp_path, tiny_dir, dataset, h, single):
    cfg = config(
        tmp_path / "run",
        tiny_dir,
        dataset,
        h,
        distributed="ddp",
        optim={"global_batch_size": 8},
        data={"num_workers": 1},
    )
    out = h.finish(h.launch(cfg, tmp_path, torchrun=2))
    assert "bad samples (rank 1)" in out  # both ranks ran
    assert_same_run(tmp_path / "run", single, h)


@pytest.mark.slow  # two torchrun launches: about a minute and a half on 2 shared cores
def test_fsdp2_two_processes_match_one_across_a_killed_and_resumed_run(tmp_path, tiny_dir, dataset, h, single):
    cfg = config(
        tmp_path / "run",
        tiny_dir,
        dataset,
        h,
        distributed="fsdp2",
        optim={"global_batch_size": 8},
        data={"num_workers": 1},
    )
    killed = h.launch(cfg, tmp_path, {KILL_ENV: "4"}, torchrun=2)  # rank 0 dies writing checkpoint 4
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode != 0 and "Signal 9" in out, out[-3000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == ["step_00000002"]

    out = h.finish(h.launch(cfg, tmp_path, torchrun=2))  # resumes sharded weights and optimizer state
    assert "resumed from" in out
    assert_same_run(tmp_path / "run", single, h)


@pytest.mark.slow  # two launches: about a minute on 2 shared cores
def test_ddp_with_the_contrastive_loss_matches_one_process(tmp_path, tiny_dir, dataset, h):
    """With rank-local negatives each micro-batch's InfoNCE (its rows are its negatives) is averaged over
    micro-batches and ranks, so 2 ranks x 1 micro-batch take the same steps as 1 process x 2 accumulated
    micro-batches (global negatives: tests/training/test_global_contrastive.py)."""
    extra = dict(model_overrides=["bridge.contrastive_dim=16"], contrastive_weight=0.5, contrastive_negatives="rank")
    one = config(
        tmp_path / "one",
        tiny_dir,
        dataset,
        h,
        optim={"global_batch_size": 8, "grad_accum": 2},
        data={"num_workers": 2},
        **extra,
    )
    h.finish(h.launch(one, tmp_path))
    two = config(
        tmp_path / "two",
        tiny_dir,
        dataset,
        h,
        distributed="ddp",
        optim={"global_batch_size": 8},
        data={"num_workers": 1},
        **extra,
    )
    h.finish(h.launch(two, tmp_path, torchrun=2))
    from lmm.training.monitor import read_metrics

    rows = {name: [r for r in read_metrics(tmp_path / name) if "loss" in r] for name in ("one", "two")}
    assert [r["loss/contrastive"] for r in rows["one"]] == pytest.approx(
        [r["loss/contrastive"] for r in rows["two"]], rel=1e-5
    )
    assert rows["one"][0]["loss/contrastive"] > 0
    assert h.step_losses(tmp_path / "two") == pytest.approx(h.step_losses(tmp_path / "one"), rel=1e-5)
