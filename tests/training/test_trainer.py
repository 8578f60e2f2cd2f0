"""The Trainer loop on prebuilt batch sources: what trains, how the loss is averaged, non-finite
losses, gradient accumulation, frozen new-token rows, the evaluate hook and the run folder."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import yaml

from lmm.model import LMM
from lmm.testing import ListSource
from lmm.testing import tiny_train_config as make_cfg
from lmm.training import NonFiniteLossError, TrainConfig, Trainer
from lmm.training.optim import is_gate


def fit(tiny_dir, cfg, batches, **kw):
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    trainer = Trainer(model, cfg, ListSource(batches, **kw))
    return model, trainer, trainer.fit()


def test_only_trainable_params_train_and_enter_the_optimizer(tmp_path, tiny_dir, feature_batches):
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, make_cfg(tmp_path), ListSource(feature_batches))
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.parameters() if p.requires_grad}
    gates = [g for g in trainer.optimizer.param_groups if g["group"] == "gates"]
    assert len(gates) == 1 and all(is_gate(n) for n in gates[0]["names"]) and len(gates[0]["names"]) == 4
    assert gates[0]["lr"] == pytest.approx(10 * trainer.optimizer.param_groups[0]["lr"])
    trainer.fit()
    state_ids = {id(p) for p in trainer.optimizer.state}
    assert state_ids and state_ids <= opt_params
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trainable ones moved, frozen ones did not
    assert all(float(b.attn_gate.detach().abs()) > 0 for b in model.xattn_blocks())  # gates opened


def test_grad_accumulation_takes_the_same_step_as_one_big_batch(tmp_path, tiny_dir, feature_batches):
    big = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(feature_batches[0::2], feature_batches[1::2])]
    m1, _, r1 = fit(tiny_dir, make_cfg(tmp_path / "a", schedule={"max_steps": 3}), big[:3])
    m2, _, r2 = fit(
        tiny_dir, make_cfg(tmp_path / "b", schedule={"max_steps": 3}, optim={"grad_accum": 2}), feature_batches[:6]
    )
    assert r1.losses == pytest.approx(r2.losses, rel=1e-5)
    for (n, p), (_, q) in zip(m1.trainable_state_dict().items(), m2.trainable_state_dict().items()):
        # Adam divides by sqrt(v): near-zero gradients magnify summation-order noise; 5e-5 is 1% of one step
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5, msg=n)


def test_per_task_averaging_and_loss_weights(tmp_path, tiny_dir, feature_batches):
    """loss_average=task: the step loss is the weighted mean of per-task mean token losses."""
    batches = copy.deepcopy(feature_batches[:1])
    batches[0]["task_ids"][:1] = 1  # row 0 belongs to task 1, rows 1-3 to task 0
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    b = {k: v for k, v in batches[0].items() if k != "task_ids"}
    with torch.no_grad():
        tl = model(**b, return_logits=False).token_losses
    keep = b["labels"][:, 1:] != -100
    mean1, mean0 = tl[:1][keep[:1]].mean(), tl[1:][keep[1:]].mean()
    cfg = make_cfg(tmp_path, loss_average="task", schedule={"max_steps": 1})
    _, _, res = fit(tiny_dir, cfg, batches, task_names=["vqa", "caption"], loss_weights=[1.0, 3.0])
    assert res.losses[0] == pytest.approx(float((1.0 * mean0 + 3.0 * mean1) / 2), rel=1e-5)
    _, _, tok = fit(
        tiny_dir, make_cfg(tmp_path / "tok", schedule={"max_steps": 1}), batches, task_names=["vqa", "caption"]
    )
    assert tok.losses[0] == pytest.approx(float(tl[keep].mean()), rel=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss/vqa"] == pytest.approx(float(mean0), rel=1e-5)
    assert rows[0]["loss/caption"] == pytest.approx(float(mean1), rel=1e-5)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, tiny_dir, feature_batches, capsys):
    batches = copy.deepcopy(feature_batches[:8])
    batches[1]["vision_features"][0, 0, 0, 0, 0] = float("nan")
    model, trainer, res = fit(tiny_dir, make_cfg(tmp_path / "skip", max_nan_steps=2), batches[:3])
    assert math.isnan(res.losses[1]) and all(math.isfinite(x) for x in (res.losses[0], res.losses[2]))
    assert res.step == 3 and all(torch.isfinite(p).all() for p in model.trainable_parameters())
    assert "step 2: non-finite loss" in capsys.readouterr().out

    for b in batches[3:6]:
        b["vision_features"][0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="stopped at step 5: 2 consecutive steps"):
        fit(tiny_dir, make_cfg(tmp_path / "stop", max_nan_steps=2, schedule={"max_steps": 8}), batches)


def test_frozen_new_token_rows_cut_the_backward_below_the_first_xattn_layer(tmp_path, tiny_dir, feature_batches):
    from lmm.fusion import find_layer_list

    seen = {}

    def hook(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen["grad"] = h.requires_grad

    for freeze in (False, True):
        model = LMM.from_pretrained(tiny_dir, device="cpu")
        rows = [model.embed.extra.detach().clone(), model.head.extra.detach().clone()]
        handle = find_layer_list(model.lm)[0].register_forward_pre_hook(hook, with_kwargs=True)
        cfg = make_cfg(tmp_path / str(freeze), freeze_new_token_rows=freeze, schedule={"max_steps": 2})
        res = Trainer(model, cfg, ListSource(feature_batches)).fit()
        handle.remove()
        assert seen["grad"] is not freeze  # layer 0's input needs a gradient only when the rows train
        assert torch.equal(model.embed.extra, rows[0]) is freeze
        saved = LMM.from_pretrained(res.output_dir, device="cpu")  # the rows are saved either way
        assert torch.equal(saved.embed.extra, model.embed.extra)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, tiny_dir, feature_batches):
    _, _, plain = fit(tiny_dir, make_cfg(tmp_path / "a"), feature_batches)
    _, _, ckpt = fit(tiny_dir, make_cfg(tmp_path / "b", gradient_checkpointing=True), feature_batches)
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)


def test_evaluate_hook_run_folder_and_artifacts(tmp_path, tiny_dir, feature_batches):
    calls = []

    def evaluate(model):
        calls.append(model.training)
        torch.rand(3)  # consumes RNG: the trainer must restore it
        return {"accuracy": 0.5 + 0.1 * len(calls)}

    cfg = make_cfg(
        tmp_path,
        schedule={"max_steps": 6},
        eval={"every": 3},
        checkpoint={"every": 2, "keep_last": 2},
        logging={"tensorboard": True, "plot": True},
    )
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    res = Trainer(model, cfg, ListSource(feature_batches), evaluate=evaluate).fit()
    assert calls == [False, False] and res.eval == {"accuracy": pytest.approx(0.7)}
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval" in r] == [3, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert (run / "loss.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text())) == cfg
    reloaded = LMM.from_pretrained(res.output_dir, device="cpu")
    for (n, p), (_, q) in zip(model.trainable_state_dict().items(), reloaded.trainable_state_dict().items()):
        assert torch.equal(p, q), n


def test_relaunching_a_finished_run_evaluates_again_without_training(tmp_path, tiny_dir, feature_batches):
    """`resume: auto` on a run that already reached max_steps trains nothing, but still evaluates and saves (the
    demo command run twice must print its accuracy both times)."""
    calls = []
    cfg = make_cfg(tmp_path, schedule={"max_steps": 3}, eval={"every": 3}, checkpoint={"every": 3})
    first = Trainer(
        LMM.from_pretrained(tiny_dir, device="cpu"),
        cfg,
        ListSource(feature_batches),
        evaluate=lambda m: calls.append(1) or {"acc": 1.0},
    ).fit()
    again = Trainer(
        LMM.from_pretrained(tiny_dir, device="cpu"),
        cfg,
        ListSource(feature_batches),
        evaluate=lambda m: calls.append(2) or {"acc": 2.0},
    ).fit()
    assert calls == [1, 2] and again.eval == {"acc": 2.0}
    assert again.losses == [] and first.step == again.step == 3


def test_a_short_data_source_ends_the_run_early_and_still_saves(tmp_path, tiny_dir, feature_batches):
    _, _, res = fit(tiny_dir, make_cfg(tmp_path, schedule={"max_steps": 50}), feature_batches[:3])
    assert res.step == 3 and "ran out after 3 of 50" in res.stopped_early
    assert (res.output_dir / "trainable.safetensors").is_file()


class WithoutPrefix:
    """The same batch source with the cached frozen prefix removed (the model runs every layer)."""

    def __init__(self, source):
        self.source = source

    def __iter__(self):
        for b in self.source:
            yield {k: v for k, v in b.items() if k not in ("prefix_hidden", "prefix_layer")}

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def test_cached_frozen_prefix_source_trains_exactly_like_the_full_forward(tmp_path, tiny_dir, dataset):
    """The demo's batch source (frozen features + replayed top layers) through the Trainer, step after step."""
    from lmm.training.frozen_cache import CachedConversationBatches, ConversationSample

    rows = [json.loads(x) for x in open(dataset)]
    samples = [
        ConversationSample(
            image=r["image"],
            messages=[
                {"role": "user", "content": r["conversations"][0]["value"]},
                {"role": "assistant", "content": r["conversations"][1]["value"]},
            ],
        )
        for r in rows
    ]
    losses = []
    for i, wrap in enumerate((lambda s: s, WithoutPrefix)):
        model = LMM.from_pretrained(tiny_dir, device="cpu")
        source = wrap(CachedConversationBatches(model, samples, batch_size=8, seed=0))
        cfg = make_cfg(tmp_path / str(i), freeze_new_token_rows=True, schedule={"max_steps": 5})
        losses.append(Trainer(model, cfg, source).fit().losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert losses[0][-1] < losses[0][0]
