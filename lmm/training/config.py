"""The typed run configuration of `train.py` / `lmm train`, and its start-up validation.

    cfg = load_train_config("configs/instruct_lora.yaml", ["optim.lr=1e-4", "schedule.max_steps=200"])
    cfg.validate()          # misspellings, missing data paths, impossible batch settings: ConfigError

Validation runs before any model or data loads, so a bad config fails within a second.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lmm.config import ConfigError, LMMConfig, YamlConfig, apply_overrides, from_dict, load_yaml, require_bitsandbytes
from lmm.data.config import DataConfig

RESOLVED_CONFIG = "config.yaml"


@dataclass
class OptimConfig:
    """AdamW over the trainable parameters only (bridge, new token rows, LoRA)."""

    lr: float = 1e-4
    weight_decay: float = 0.01  # not applied to biases, norms, gates and other 1-D parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    gate_lr_mult: float = 10.0  # tanh gates of the cross-attention blocks learn this much faster
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step
    global_batch_size: int | None = None  # if set: data.batch_size = global / (world_size x grad_accum)
    fused: bool = True  # fused AdamW kernel (CUDA and CPU)
    eight_bit: bool = False  # bitsandbytes AdamW8bit (CUDA only)


@dataclass
class ScheduleConfig:
    max_steps: int = 1000  # optimizer steps
    warmup_steps: int = 100  # linear warmup from 0
    kind: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    min_lr_ratio: float = 0.0  # cosine/linear decay to lr x this


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between checkpoints (0: none until the end)
    keep_last: int = 3  # complete checkpoints kept (older ones are deleted)
    resume: str | None = "auto"  # auto: latest complete checkpoint in run_dir, a path, or null: start fresh
    at_end: bool = True  # also checkpoint the final step


@dataclass
class LoggingConfig:
    log_every: int = 10  # steps between printed log lines (the metrics file gets every step)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "lmm"
    progress: bool = True  # progress bar on rank 0
    plot: bool = True  # loss-curve PNG at the end


@dataclass
class EvalDatasetConfig:
    """A held-out set in a training format, asked through the model's chat template (lmm.eval.conversation)."""

    path: str = ""
    format: Literal["conversation"] = "conversation"  # LLaVA-style JSON: the final assistant turn is the answer
    name: str | None = None  # in logs and metrics (default: the file's name without extension)
    metric: Literal["exact_match", "choice"] = "exact_match"  # generated answer, or likeliest of the candidates
    candidates: list[str] | None = None  # the closed answer set (choice: default every distinct answer)
    image_root: str | None = None  # folder that relative image paths are resolved against

    def display_name(self) -> str:
        return self.name or Path(self.path).stem


@dataclass
class EvalConfig:
    """When and on what the trainer evaluates: the `evaluate(model) -> dict` hook it was given, else one built
    from `task` and `datasets` (see lmm.training.evaluation)."""

    every: int = 0  # steps between evaluations (0: only at the end)
    at_end: bool = True
    at_start: bool = False
    task: str | None = None  # a registered evaluation task by name (lmm.eval.registry), e.g. the demo's
    datasets: list[EvalDatasetConfig] = field(default_factory=list)  # held-out sets, each with its metric
    limit: int | None = 1000  # test samples per task / set (a seeded random subset; null: all)
    batch_size: int = 64
    blind_baseline: bool = True  # also ask the same questions without the images (the same model)


@dataclass
class TrainConfig(YamlConfig):
    """One training run: which model, which data, how to optimise, where to write."""

    name: str = "run"
    model: LMMConfig | None = None  # build from a model config (random bridge) ...
    preset: str | None = None  # ... or start from a preset name / a save_pretrained directory
    model_overrides: list[str] = field(default_factory=list)  # dotted LMMConfig overrides for the preset (lora.r=8)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str | None = None  # default: runs/<name>
    output_dir: str | None = None  # the final save_pretrained directory (default: <run_dir>/final)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    distributed: Literal["none", "ddp", "fsdp2"] = "none"  # launch with torchrun for more than one process
    device: str | None = None  # default: cuda:<local_rank> if available, else cpu
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (exact resume tests)
    max_nan_steps: int = 5  # this many consecutive non-finite losses stop the run
    loss_average: Literal["token", "task"] = "token"  # mean over tokens, or mean of per-dataset means (4M)
    freeze_new_token_rows: bool = False  # keep the <image>/<|endofchunk|> embedding rows frozen (cheaper backward)
    # precompute vision features once per image and the LM's hidden states below the lowest cross-attention layer
    # once per distinct text (conversation / pair data, flamingo bridge, frozen LM and new-token rows; one process)
    frozen_cache: bool = False
    frozen_cache_max_gib: float | None = None  # memory bound of that cache (default: half of the machine's RAM)
    balance_answers: bool = False  # frozen_cache: draw every answer of a question equally often (no text prior)
    calibrate_xattn_norms: bool = False  # fresh runs: standardise the xattn blocks' LayerNorms on the first batch
    # weight of the image-text contrastive loss (InfoNCE, FLAVA/BLIP-2) beside the next-token loss; needs a model
    # with bridge.contrastive_dim > 0
    contrastive_weight: float = 0.0
    # its negatives: "global" = the micro-batch rows of every rank (CLIP/FLAVA: 8 ranks x 32 rows = 256 candidates,
    # gradients flow back across ranks); "rank" = this rank's micro-batch only (the same in one process)
    contrastive_negatives: Literal["global", "rank"] = "global"
    # weight of the image-text matching loss (ITM, FLAVA/BLIP-2: matched or not, on the fused last token, with
    # hard negatives from the contrastive similarities when there is a contrastive head); needs bridge.itm=true
    itm_weight: float = 0.0

    # ------------------------------------------------------------------ paths

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else self.resolved_run_dir() / "final"

    # ------------------------------------------------------------------ (de)serialisation

    # ------------------------------------------------------------------ validation

    def validate(self, world_size: int | None = None) -> TrainConfig:
        """Every start-up check (model choice, training settings, data paths); ConfigError names the problem.

        world_size defaults to $WORLD_SIZE (torchrun) or 1. Resolves data.batch_size from
        optim.global_batch_size when that is set."""
        self.validate_model()
        self.validate_training(world_size)
        self.validate_data()
        self.validate_eval()
        return self

    def validate_model(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise ConfigError(
                "give exactly one of `model:` (a model config) or `preset:` (a preset name or a "
                "save_pretrained directory)"
            )
        if self.model_overrides and self.preset is None:
            raise ConfigError("model_overrides apply to a preset; with `model:` edit the model section instead")
        if self.preset is not None:
            from lmm.presets import PRESETS

            if self.preset not in PRESETS and not (Path(self.preset) / "lmm_config.json").is_file():
                raise ConfigError(
                    f"preset {self.preset!r} is neither a preset name ({', '.join(PRESETS)}) nor a "
                    "save_pretrained model directory (with lmm_config.json)"
                )
            try:  # misspelled override keys fail now, not after the preset has loaded
                from_dict(LMMConfig, apply_overrides(LMMConfig().to_dict(), list(self.model_overrides)))
            except ConfigError as e:
                raise ConfigError(f"model_overrides: {e}") from None
        if self.contrastive_weight < 0:
            raise ConfigError(f"contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.contrastive_weight > 0 and self.model is not None and self.model.bridge.contrastive_dim <= 0:
            raise ConfigError(
                "contrastive_weight > 0 needs a contrastive head: set model.bridge.contrastive_dim (e.g. 256)"
            )
        if self.itm_weight < 0:
            raise ConfigError(f"itm_weight must be >= 0, got {self.itm_weight}")
        if self.itm_weight > 0 and self.model is not None and not self.model.bridge.itm:
            raise ConfigError("itm_weight > 0 needs an image-text matching head: set model.bridge.itm=true")
        for name, weight in (("contrastive_weight", self.contrastive_weight), ("itm_weight", self.itm_weight)):
            if weight > 0 and self.data.packing:
                raise ConfigError(
                    f"{name} compares whole rows (image with caption); packed rows hold several samples: set "
                    "data.packing=false"
                )
            if weight > 0 and self.frozen_cache:
                raise ConfigError(f"{name} needs the full forward (and a text-only pass); set frozen_cache: false")
        if self.model is not None and self.model.language.load_in_4bit:
            require_bitsandbytes(
                "model.language.load_in_4bit (QLoRA)",
                "set model.language.load_in_4bit=false to train in full precision",
            )
        if any("load_in_4bit=true" in o.replace(" ", "").lower() for o in self.model_overrides):
            require_bitsandbytes("language.load_in_4bit (QLoRA)", "drop that model override to train in full precision")

    def validate_training(self, world_size: int | None = None) -> None:
        """Optimiser, schedule, checkpoint, logging and launch settings (what a Trainer needs)."""
        ws = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        self._validate_optim(ws)
        for name, weight in (("contrastive_weight", self.contrastive_weight), ("itm_weight", self.itm_weight)):
            if weight > 0 and self.data.batch_size < 2:
                raise ConfigError(
                    f"{name} needs at least 2 rows per micro-batch (the other rows are the negatives), got "
                    f"data.batch_size={self.data.batch_size}; raise it or lower grad_accum"
                )
        s = self.schedule
        if s.max_steps < 1:
            raise ConfigError(f"schedule.max_steps must be >= 1, got {s.max_steps}")
        if s.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        if s.warmup_steps > s.max_steps:  # e.g. a max_steps=3 smoke test with the default warm-up
            print(
                f"warning: schedule.warmup_steps ({s.warmup_steps}) is larger than schedule.max_steps "
                f"({s.max_steps}); warm-up clamped to {s.max_steps} steps",
                file=sys.stderr,
                flush=True,
            )
            s.warmup_steps = s.max_steps
        if not 0.0 <= s.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        c = self.checkpoint
        if c.every < 0 or c.keep_last < 1:
            raise ConfigError(
                f"checkpoint.every must be >= 0 and checkpoint.keep_last >= 1 "
                f"(got every={c.every}, keep_last={c.keep_last})"
            )
        if c.resume not in (None, "auto") and not Path(c.resume).is_dir():
            raise ConfigError(
                f"checkpoint.resume: checkpoint folder not found: {c.resume} "
                "(use `auto` for the latest one in the run folder, or null to start fresh)"
            )
        if self.logging.log_every < 1:
            raise ConfigError(f"logging.log_every must be >= 1, got {self.logging.log_every}")
        if self.eval.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.eval.every}")
        if self.max_nan_steps < 1:
            raise ConfigError(f"max_nan_steps must be >= 1, got {self.max_nan_steps}")
        if self.frozen_cache and (ws > 1 or self.distributed != "none"):
            raise ConfigError("frozen_cache runs in one process; set frozen_cache: false for distributed training")
        if self.frozen_cache and not self.freeze_new_token_rows:
            raise ConfigError(
                "frozen_cache caches the LM's hidden states below the bridge, which read the trainable "
                "<image>/<|endofchunk|> embedding rows; set freeze_new_token_rows: true (or "
                "frozen_cache: false)"
            )
        if self.frozen_cache_max_gib is not None and self.frozen_cache_max_gib <= 0:
            raise ConfigError(f"frozen_cache_max_gib must be > 0, got {self.frozen_cache_max_gib}")
        if self.balance_answers and not self.frozen_cache:
            raise ConfigError(
                "balance_answers works with the frozen-cache batches; set frozen_cache: true or balance_answers: false"
            )
        if self.calibrate_xattn_norms and self.distributed == "fsdp2":
            raise ConfigError(
                "calibrate_xattn_norms runs on unsharded weights; use distributed=ddp or set "
                "calibrate_xattn_norms: false"
            )
        if ws > 1 and self.distributed == "none":
            raise ConfigError(
                f"launched with {ws} processes but distributed=none; set distributed=ddp or distributed=fsdp2"
            )
        if self.precision == "bf16" and not _cuda():
            raise ConfigError("precision=bf16 needs a GPU (bf16 on this CPU is ~30x slower); use precision=auto")

    def _validate_optim(self, ws: int) -> None:
        o = self.optim
        if o.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
        if o.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
        if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if o.grad_clip < 0 or o.gate_lr_mult <= 0:
            raise ConfigError(
                f"optim.grad_clip must be >= 0 and optim.gate_lr_mult > 0 (got {o.grad_clip}, {o.gate_lr_mult})"
            )
        if o.eight_bit:
            require_bitsandbytes("optim.eight_bit (AdamW8bit)", "set optim.eight_bit=false")
        if o.global_batch_size is not None:
            per_step = ws * o.grad_accum
            if o.global_batch_size < 1 or o.global_batch_size % per_step:
                raise ConfigError(
                    f"optim.global_batch_size={o.global_batch_size} is not divisible by world_size "
                    f"({ws}) x optim.grad_accum ({o.grad_accum}) = {per_step}; pick a multiple of "
                    f"{per_step}"
                )
            self.data.batch_size = o.global_batch_size // per_step

    def validate_data(self) -> None:
        """Datasets are configured and their files exist, or will be written by their preparer (nothing is read
        yet); with frozen_cache, the data is of a kind the cache can hold."""
        from lmm.data.errors import DataError
        from lmm.data.prepare import get_preparer
        from lmm.data.sources import expand_paths

        stages = self.data.resolved_stages()
        for st in stages:
            for d in st.datasets:
                if d.prepare:
                    try:
                        get_preparer(d.prepare)
                    except ConfigError as e:
                        raise ConfigError(f"data: dataset {d.display_name()!r}: {e}") from None
                    if not os.path.exists(os.path.expanduser(d.path)):
                        continue  # written by the preparer when the run starts
                try:
                    found = expand_paths(d.path)
                except DataError as e:
                    raise ConfigError(f"data: dataset {d.display_name()!r}: {e}") from None
                if not found:
                    raise ConfigError(f"data: dataset {d.display_name()!r}: nothing matches path {d.path!r}")
                if d.image_root and not os.path.isdir(os.path.expanduser(d.image_root)):
                    raise ConfigError(
                        f"data: dataset {d.display_name()!r}: image_root folder not found: {d.image_root}"
                    )
        if self.data.epochs is not None and self.data.epochs < 1:
            raise ConfigError(f"data.epochs must be >= 1 or null (endless), got {self.data.epochs}")
        if self.frozen_cache:
            from lmm.training.frozen_cache import check_data_config

            check_data_config(self.data)

    def validate_eval(self) -> None:
        """The evaluation task is registered and the held-out sets exist, with distinct names."""
        e = self.eval
        if e.limit is not None and e.limit < 1:
            raise ConfigError(f"eval.limit must be >= 1 or null (all), got {e.limit}")
        if e.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {e.batch_size}")
        names = []
        if e.task is not None:
            from lmm.eval.registry import get_task
            from lmm.eval.task import TaskDataError

            try:
                names.append(get_task(e.task).name)
            except TaskDataError as err:
                raise ConfigError(f"eval.task: {err}") from None
        for i, d in enumerate(e.datasets):
            if not d.path or not os.path.exists(os.path.expanduser(d.path)):
                raise ConfigError(f"eval.datasets[{i}]: file not found: {d.path!r}")
            if d.image_root and not os.path.isdir(os.path.expanduser(d.image_root)):
                raise ConfigError(f"eval.datasets[{i}]: image_root folder not found: {d.image_root}")
            if d.display_name() in names:
                raise ConfigError(f"eval.datasets[{i}]: the name {d.display_name()!r} is taken; set `name:`")
            names.append(d.display_name())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def load_train_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file plus dotted `key=value` overrides (unknown keys raise ConfigError)."""
    return load_yaml(TrainConfig, path, overrides)
