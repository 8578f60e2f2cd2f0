"""calibrate_xattn_norms: the cross-attention blocks' LayerNorms hand on standardised inputs, the model's outputs
do not change (gates are 0), only fresh runs calibrate, and misuse is a ConfigError."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmm.config import ConfigError
from lmm.model import LMM
from lmm.testing import ListSource
from lmm.testing import tiny_train_config as make_cfg
from lmm.training import TrainConfig, Trainer
from lmm.training.calibrate import standardize_xattn_norms


def _block_inputs(model, batch):
    seen = []
    hooks = [b.norm.register_forward_hook(lambda m, a, out: seen.append(out.detach())) for b in model.xattn_blocks()]
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k not in ("labels", "task_ids")})
    for h in hooks:
        h.remove()
    return seen, out.logits


def test_normalised_block_inputs_are_standardised_and_logits_unchanged(tiny_dir, feature_batches):
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    batch = {k: v for k, v in feature_batches[0].items() if k != "task_ids"}
    before, logits_before = _block_inputs(model, batch)
    # a plain LayerNorm leaves per-dimension offsets and scales (what massive activations exaggerate)
    valid = batch["attention_mask"].bool()
    assert max(float(x[valid].mean(0).abs().max()) for x in before) > 0.3
    assert standardize_xattn_norms(model, batch) == len(model.xattn_blocks())
    after, logits_after = _block_inputs(model, batch)
    torch.testing.assert_close(logits_after, logits_before)  # gates at 0: the LM's outputs are untouched
    for x, x0 in zip(after, before):
        z = x[valid]
        torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[-1]), atol=1e-4, rtol=0)
        std = z.std(0, unbiased=False)
        wide = F.layer_norm(x0[valid], x0.shape[-1:]).std(0, unbiased=False) > 0.05  # not clamped to min_std
        torch.testing.assert_close(std[wide], torch.ones(int(wide.sum())), atol=1e-3, rtol=0)
    for b in model.xattn_blocks():  # the dense sub-block's norm gets the same start
        assert torch.equal(b.ff[0].weight, b.norm.weight) and torch.equal(b.ff[0].bias, b.norm.bias)


def test_a_trained_bridge_is_refused(tiny_dir, feature_batches):
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    with torch.no_grad():
        model.xattn_blocks()[0].attn_gate.fill_(0.5)
    with pytest.raises(ConfigError, match="already trained"):
        standardize_xattn_norms(model, feature_batches[0])


def test_fresh_runs_calibrate_on_the_first_batch_and_resumed_runs_do_not(tmp_path, tiny_dir, feature_batches, capsys):
    cfg = make_cfg(tmp_path, calibrate_xattn_norms=True, schedule={"max_steps": 1}, optim={"lr": 1e-12})
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    ref = LMM.from_pretrained(tiny_dir, device="cpu")
    standardize_xattn_norms(ref, {k: v for k, v in feature_batches[0].items() if k != "task_ids"})
    Trainer(model, cfg, ListSource(feature_batches)).fit()
    for got, want in zip(model.xattn_blocks(), ref.xattn_blocks()):  # lr ~0: what remains is the calibration
        torch.testing.assert_close(got.norm.weight, want.norm.weight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.ff[0].bias, want.ff[0].bias, atol=1e-6, rtol=1e-6)
    assert "calibrate_xattn_norms: standardised" in capsys.readouterr().out
    # a run resumed from a checkpoint continues from its trained norms; it does not calibrate again
    d = make_cfg(
        tmp_path / "r", calibrate_xattn_norms=True, schedule={"max_steps": 2}, checkpoint={"every": 1}
    ).to_dict()
    Trainer(LMM.from_pretrained(tiny_dir, device="cpu"), TrainConfig.from_dict(d), ListSource(feature_batches)).fit()
    assert "calibrate_xattn_norms: standardised" in capsys.readouterr().out
    d["checkpoint"]["resume"], d["schedule"]["max_steps"] = "auto", 3
    resumed = Trainer(
        LMM.from_pretrained(tiny_dir, device="cpu"), TrainConfig.from_dict(d), ListSource(feature_batches)
    )
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 3 and "calibrate_xattn_norms" not in capsys.readouterr().out


def test_fsdp2_with_calibration_is_a_config_error():
    with pytest.raises(ConfigError, match="calibrate_xattn_norms"):
        TrainConfig.from_dict({"name": "x", "calibrate_xattn_norms": True, "distributed": "fsdp2"}).validate_training(2)
