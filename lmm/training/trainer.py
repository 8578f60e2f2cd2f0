"""The training loop: `Trainer(model, cfg, batches, evaluate=None).fit()`.

`batches` is any batch source: an iterable of batch dicts (the `LMM.forward` contract: input_ids,
attention_mask, labels, pixel_values or vision_features, optional segment_ids / position_ids /
frame_mask / task_ids, and media_inputs / media_frame_mask dicts for other modalities such as audio)
that also has `state_dict()` and `load_state_dict(state)` (JSON-able state
after the batches handed out so far). Optional attributes: `task_names` and `loss_weights` (per task
id), `bad_sample_counts()` and `report()` (printed at the end). `lmm.data.build_loader` returns one.

One optimizer step = `optim.grad_accum` micro-batches per rank; the loss is normalised over the
global batch, so N ranks x 1 micro-batch and 1 rank x N micro-batches take the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from lmm.config import ConfigError
from lmm.training import checkpoint as ckpt
from lmm.training.calibrate import standardize_xattn_norms
from lmm.training.config import RESOLVED_CONFIG, TrainConfig
from lmm.training.distributed import (
    DistEnv,
    init_distributed,
    load_optimizer_state,
    load_trainable_state,
    optimizer_state,
    trainable_state,
    unwrap,
    wrap_model,
)
from lmm.training.loss import count_targets, step_loss, target_mask_and_tasks, task_coefficients
from lmm.training.model_prep import compile_model, freeze_new_token_rows, saveable
from lmm.training.monitor import Monitor
from lmm.training.optim import build_optimizer, build_scheduler


class NonFiniteLossError(RuntimeError):
    """Raised when `max_nan_steps` consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainResult:
    output_dir: Path | None  # the final save_pretrained directory
    step: int  # optimizer steps completed
    losses: list[float] = field(default_factory=list)  # per step of this process's run (after any resume)
    eval: dict = field(default_factory=dict)  # the last evaluation's metrics
    stopped_early: str | None = None  # why the run ended before max_steps (data ran out)


class Trainer:
    """Trains `model`'s trainable parameters on `batches` as `cfg` says; rank-aware under torchrun.

    model: an `LMM` (unwrapped); batches: a batch source (see the module docstring);
    evaluate: optional `evaluate(model) -> dict` called on rank 0 with the model in eval mode."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        batches,
        evaluate: Callable | None = None,
        env: DistEnv | None = None,
    ):
        for attr in ("state_dict", "load_state_dict", "__iter__"):
            if not hasattr(batches, attr):
                raise TypeError(
                    f"the batch source must be iterable and have state_dict()/load_state_dict() "
                    f"(missing {attr}); lmm.data.build_loader returns one"
                )
        self.env = env or init_distributed(cfg.distributed, cfg.device)
        cfg.validate_training(self.env.world_size)
        self.cfg, self.batches, self.evaluate = cfg, batches, evaluate
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self.run_dir = cfg.resolved_run_dir()
        self.task_names = list(getattr(batches, "task_names", None) or ["train"])
        weights = getattr(batches, "loss_weights", None)
        self.loss_weights = list(weights) if weights else [1.0] * len(self.task_names)
        if len(self.loss_weights) != len(self.task_names):
            raise ConfigError(f"{len(self.loss_weights)} loss weights for {len(self.task_names)} tasks")

        if cfg.contrastive_weight > 0 and getattr(unwrap(model), "contrastive", None) is None:
            raise ConfigError(
                "contrastive_weight > 0 needs a model with a contrastive head: add the model override "
                "bridge.contrastive_dim=256 (or set it in the model config)"
            )
        if cfg.itm_weight > 0 and getattr(unwrap(model), "itm", None) is None:
            raise ConfigError(
                "itm_weight > 0 needs a model with an image-text matching head: add the model override "
                "bridge.itm=true (or set it in the model config)"
            )
        if unwrap(model).device != self.env.device:
            model.to(self.env.device)
        self.lmm = model
        if cfg.freeze_new_token_rows:
            freeze_new_token_rows(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        self.model = wrap_model(model, self.env)
        if cfg.compile:
            compile_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, cfg.optim, self.env.device, sharded=self.env.mode == "fsdp2")
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.step = 0
        self.nan_streak = 0
        torch.manual_seed(cfg.seed + self.env.rank)
        self.resumed_from = self._maybe_resume()
        if self.env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.run_dir / RESOLVED_CONFIG)
        self.env.barrier()

    # ------------------------------------------------------------------ resume

    def _maybe_resume(self) -> Path | None:
        r = self.cfg.checkpoint.resume
        if not r:
            return None
        path, state = (Path(r), ckpt.load_checkpoint(r, self.env.rank)) if r != "auto" else self._newest_loadable()
        if path is None:
            return None
        meta = state["meta"]
        if meta.get("world_size", 1) != self.env.world_size:
            raise ConfigError(
                f"{path} was written by {meta.get('world_size')} processes; resume it with the same "
                f"number (now {self.env.world_size}) or set checkpoint.resume=null"
            )
        load_trainable_state(self.model, self.env, state["weights"])
        load_optimizer_state(self.model, self.optimizer, self.env, state["optim"]["optimizer"])
        self.scheduler.load_state_dict(state["optim"]["scheduler"])
        self.batches.load_state_dict(json.loads(state["rank"]["data"]))
        ckpt.set_rng_state(state["rank"]["rng"])
        self.step = int(meta["step"])
        self.nan_streak = int(meta.get("nan_streak", 0))
        if self.env.is_main:
            print(f"resumed from {path} (step {self.step})", flush=True)
        return path

    def _newest_loadable(self) -> tuple[Path | None, dict | None]:
        """The newest complete checkpoint that reads back; a damaged newer one (a disk error, a truncated file)
        is reported and the previous one is used instead."""
        for path in reversed(ckpt.complete_checkpoints(self.run_dir)):
            try:
                return path, ckpt.load_checkpoint(path, self.env.rank)
            except Exception as e:  # any damage: safetensors/torch.load/json errors, missing files
                if self.env.is_main:
                    print(
                        f"checkpoint {path.name} cannot be read ({type(e).__name__}: {e}); trying the one before",
                        flush=True,
                    )
        return None, None

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (every rank must call this)."""
        weights = trainable_state(self.model, self.env)
        optim = {
            "optimizer": optimizer_state(self.model, self.optimizer, self.env),
            "scheduler": self.scheduler.state_dict(),
        }
        rank_state = {"rng": ckpt.rng_state(), "data": json.dumps(self.batches.state_dict())}
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            rank=self.env.rank,
            world_size=self.env.world_size,
            barrier=self.env.barrier,
            weights=weights,
            optim_state=optim,
            rank_state=rank_state,
            config_yaml=yaml.safe_dump(self.cfg.to_dict(), sort_keys=False),
            meta={"nan_streak": self.nan_streak, "time": time.time()},
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ------------------------------------------------------------------ one step

    def _to_device(self, batch: dict) -> tuple[dict, torch.Tensor | None]:
        batch = dict(batch)
        task_ids = batch.pop("task_ids", None)
        dev = self.env.device

        def move(v):  # media_inputs / media_frame_mask are {modality: tensor}
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v

        return {k: move(v) for k, v in batch.items()}, task_ids

    def _next_micro_batches(self, it) -> list | None:
        micro = []
        for _ in range(self.cfg.optim.grad_accum):
            try:
                micro.append(next(it))
            except StopIteration:
                break
        complete = torch.tensor([1.0 if len(micro) == self.cfg.optim.grad_accum else 0.0], device=self.env.device)
        if self.env.world_size > 1:
            torch.distributed.all_reduce(complete, op=torch.distributed.ReduceOp.MIN)
        return micro if complete.item() > 0 else None

    def _autocast(self):
        dev = self.env.device
        use_bf16 = self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and dev.type == "cuda")
        if use_bf16:
            return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_context(self, last: bool):
        if self.env.mode == "ddp" and not last:
            return self.model.no_sync()
        if self.env.mode == "fsdp2":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def train_step(self, micro: list[dict]) -> dict:
        """Forward/backward over the micro-batches, then clip and step (or skip on a non-finite loss)."""
        n_tasks = len(self.task_names)
        prepared, counts, tokens = [], torch.zeros(n_tasks, dtype=torch.float64), 0
        for raw in micro:
            batch, task_ids = self._to_device(raw)
            keep, tasks = target_mask_and_tasks({"labels": batch["labels"].cpu()}, task_ids)
            counts += count_targets(keep, tasks, n_tasks)
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
            prepared.append((batch, keep, tasks))
        stats = torch.cat([counts, torch.tensor([float(tokens)], dtype=torch.float64)]).to(self.env.device)
        self.env.all_reduce_sum(stats)
        global_counts, global_tokens = stats[:n_tasks].cpu(), int(stats[n_tasks].item())
        coef = task_coefficients(global_counts, self.loss_weights, self.cfg.loss_average)

        if self.step == 0 and self.resumed_from is None and self.cfg.calibrate_xattn_norms:
            n = standardize_xattn_norms(self.lmm, prepared[0][0], self.env.all_reduce_sum)
            if self.env.is_main:
                print(
                    f"calibrate_xattn_norms: standardised the input norms of {n} cross-attention blocks on the "
                    "first batch",
                    flush=True,
                )
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(3 + n_tasks, dtype=torch.float64, device=self.env.device)
        # of a per-micro-batch mean (contrastive, ITM); a global contrastive loss is already scaled so that its
        # mean over ranks is the global batch's loss
        share = 1.0 / (len(prepared) * self.env.world_size)
        objectives = dict(
            contrastive=self.cfg.contrastive_weight > 0,
            gather_negatives=self.cfg.contrastive_negatives == "global",
            itm=self.cfg.itm_weight > 0,
        )
        for i, (batch, keep, tasks) in enumerate(prepared):
            with self._sync_context(i == len(prepared) - 1), self._autocast():
                out = self.model(**batch, return_logits=False, **objectives)
                loss, per_task = step_loss(out.token_losses, out.labels, keep, tasks, coef, n_tasks)
                if self.cfg.contrastive_weight > 0:
                    contrastive = out.contrastive_loss.double() * share
                    loss = loss + self.cfg.contrastive_weight * contrastive
                    total[1] += contrastive.detach()
                if self.cfg.itm_weight > 0:
                    matching = out.itm_loss.double() * share
                    loss = loss + self.cfg.itm_weight * matching
                    total[2] += matching.detach()
            # DDP / FSDP average gradients over ranks; the loss is already a share of the global sum
            (loss * self.env.world_size).backward()
            total[0] += loss.detach()
            total[3:] += per_task
        self.env.all_reduce_sum(total)
        loss_value = float(total[0])
        task_losses = {
            name: float(total[3 + t] / global_counts[t])
            for t, name in enumerate(self.task_names)
            if global_counts[t] > 0
        }
        if self.cfg.contrastive_weight > 0:  # logged beside the per-dataset next-token losses
            task_losses["contrastive"] = float(total[1])
        if self.cfg.itm_weight > 0:
            task_losses["itm"] = float(total[2])

        grad_norm = None
        finite = math.isfinite(loss_value)
        if finite:
            clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.nan_streak = 0
        else:
            self.nan_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_mult", 1.0)
        self.scheduler.step()
        self.step += 1
        return {
            "loss": loss_value,
            "lr": lr,
            "tokens": global_tokens,
            "task_losses": task_losses,
            "grad_norm": grad_norm,
            "skipped": not finite,
        }

    # ------------------------------------------------------------------ evaluation / saving

    def run_evaluation(self) -> dict:
        """Call the evaluate hook on rank 0 (model in eval mode, RNG state untouched); {} without a hook."""
        if self.evaluate is None:
            return {}
        if self.env.mode == "fsdp2":
            if self.env.is_main:
                print(
                    "note: the evaluate hook is skipped under fsdp2 (weights are sharded); evaluate the saved "
                    "model instead",
                    flush=True,
                )
            return {}
        metrics: dict = {}
        if self.env.is_main:
            rng = ckpt.rng_state()
            self.lmm.eval()
            try:
                with torch.no_grad():
                    metrics = dict(self.evaluate(self.lmm) or {})
            finally:
                self.lmm.train()
                ckpt.set_rng_state(rng)
        self.env.barrier()
        return metrics

    def save_pretrained(self, path: str | Path) -> Path:
        """The final model as a `save_pretrained` directory (gathered from shards under FSDP2)."""
        path = Path(path)
        shards = []
        if self.env.mode == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            shards = [m for m in self.lmm.modules() if isinstance(m, FSDPModule)]
            for m in shards:
                m.unshard()
        try:
            if self.env.is_main:
                with saveable(self.lmm):
                    self.lmm.save_pretrained(path)
        finally:
            for m in shards:
                m.reshard()
        self.env.barrier()
        return path

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        total = cfg.schedule.max_steps
        monitor = Monitor(self.run_dir, cfg, total, self.step, env.is_main, self.task_names)
        result = TrainResult(output_dir=None, step=self.step)
        n_train = sum(p.numel() for p in self.lmm.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.lmm.parameters())
        monitor.write(f"trainable parameters: {n_train:,} of {n_all:,} ({100.0 * n_train / max(n_all, 1):.2f}%)")
        if self.resumed_from is not None:
            monitor.write(f"resumed from {self.resumed_from} at step {self.step}")
        last_ckpt = self.step if self.resumed_from is not None else -1
        evaluated_at = -1
        try:
            if cfg.eval.at_start and self.evaluate is not None:
                result.eval = self.run_evaluation()
                monitor.evaluation(self.step, result.eval)
                evaluated_at = self.step
            it = iter(self.batches)
            while self.step < total:
                micro = self._next_micro_batches(it)
                if micro is None:
                    result.stopped_early = f"the data ran out after {self.step} of {total} steps"
                    monitor.write(
                        f"note: {result.stopped_early} (data.epochs={cfg.data.epochs}); saving what was trained"
                    )
                    break
                s = self.train_step(micro)
                result.losses.append(s["loss"])
                monitor.step(self.step, s["loss"], s["lr"], s["tokens"], s["task_losses"], s["grad_norm"], s["skipped"])
                if s["skipped"]:
                    monitor.write(
                        f"warning: step {self.step}: non-finite loss or gradient ({s['loss']}); step "
                        f"skipped ({self.nan_streak} in a row, the run stops at {cfg.max_nan_steps})"
                    )
                    if self.nan_streak >= cfg.max_nan_steps:
                        raise NonFiniteLossError(
                            f"stopped at step {self.step}: {self.nan_streak} consecutive steps had a non-finite "
                            f"loss or gradient. Lower optim.lr, check the data (see {self.run_dir}/metrics.jsonl), "
                            f"or raise max_nan_steps; resume from the last checkpoint with checkpoint.resume=auto"
                        )
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                    last_ckpt = self.step
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.evaluate is not None:
                    result.eval = self.run_evaluation()
                    monitor.evaluation(self.step, result.eval)
                    evaluated_at = self.step
            if cfg.checkpoint.at_end and last_ckpt != self.step:
                self.save_checkpoint()
            if cfg.eval.at_end and self.evaluate is not None and evaluated_at != self.step:  # also: resumed when done
                result.eval = self.run_evaluation()
                monitor.evaluation(self.step, result.eval)
            result.output_dir = self.save_pretrained(cfg.resolved_output_dir())
            monitor.write(f"saved the model to {result.output_dir} (LMM.from_pretrained / lmm chat open it)")
            report = getattr(self.batches, "report", None)
            if callable(report):
                print(f"bad samples (rank {env.rank}): {report()}", flush=True)
        finally:
            monitor.close()
        result.step = self.step
        return result
