"""`train(cfg)`: validate, start the process group, build the model and the data loader, run a Trainer.

The single entry point behind `python train.py --config FILE [key=value ...]` and `lmm train`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmm.config import ConfigError, LMMConfig, apply_overrides, from_dict
from lmm.training.config import TrainConfig, load_train_config
from lmm.training.distributed import init_distributed, shutdown
from lmm.training.trainer import Trainer, TrainResult


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, device: torch.device):
    """The model a run starts from: `model:` config, or `preset:` (name or saved dir) with `model_overrides`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from lmm import presets
    from lmm.model import CONFIG_FILE, FROZEN_FILE, LMM, WEIGHTS_FILE, upgrade_names

    if cfg.model is not None:
        from lmm.blip2 import init_qformer

        model = LMM.from_config(cfg.model, device=device)
        init_qformer(model)  # BLIP-2 stage 2: the stage-1 Q-Former (a resumed run then loads its checkpoint)
        return model
    name = cfg.preset
    if not cfg.model_overrides:
        return presets.load(name, device=device)
    if name in presets.PRESETS and not (Path(name) / CONFIG_FILE).is_file():
        model_cfg = from_dict(LMMConfig, apply_overrides(presets.preset_config(name).to_dict(), cfg.model_overrides))
        return LMM.from_config(model_cfg, device=device)
    path = Path(name)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"preset {name!r} is neither a preset name nor a saved model directory")
    base_dict = json.loads((path / CONFIG_FILE).read_text())
    model_cfg = from_dict(LMMConfig, apply_overrides(base_dict, cfg.model_overrides))
    # Build the overridden model from its own frozen sources (e.g. a 4-bit LM for QLoRA) and load only what the
    # directory saved over it: the trained bridge, plus the frozen weights where the LM came from a config.
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer") if (path / "tokenizer").is_dir() else None
    model = LMM.from_config(model_cfg, tokenizer=tokenizer, device=device)
    saved = upgrade_names(load_file(path / WEIGHTS_FILE))
    if (path / FROZEN_FILE).is_file():  # frozen weights that came from no path (random-init towers)
        frozen = upgrade_names(load_file(path / FROZEN_FILE))
        if model_cfg.language.load_in_4bit:
            if model_cfg.language.path is None:
                raise ConfigError(
                    f"{path} holds its own randomly initialised LM; a 4-bit LM loads from a folder: "
                    "drop language.load_in_4bit=true or set language.path"
                )
            # the LM's weights are language.path's, quantised on load; its bf16 copies here cannot go into 4 bits
            frozen = {k: v for k, v in frozen.items() if not k.startswith("lm.")}
        saved.update(frozen)
    copy_matching_weights(saved, model)
    return model


def loader_media(model) -> dict:
    """`build_loader`'s media arguments for a model: {modality: preprocess} of its encoders other than the image
    tower, and the sample rate audio is decoded to (its audio encoder's)."""
    audio = model.encoders["audio"] if "audio" in model.encoders else None
    return {
        "media_processors": {m: e.preprocess for m, e in model.encoders.items() if m != "image"},
        "sampling_rate": getattr(audio, "sampling_rate", None),
    }


def copy_matching_weights(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> list[str]:
    """Copy every named tensor of `src` into the same-named tensor of `dst` (LoRA's `base_layer.` renaming
    understood); returns the names of `dst` that received nothing (e.g. new LoRA weights)."""
    from lmm.model import unique_state

    dst_state = unique_state(dst)
    filled = set()
    with torch.no_grad():
        for name, t in src.items():
            target = name if name in dst_state else _lora_name(name)
            if target not in dst_state:
                continue
            if _grown_token_rows(target, t, dst_state[target]):  # a new modality's marker: rows appended
                dst_state[target][: t.shape[0]].copy_(t.to(dst_state[target].dtype))
                filled.add(target)
                continue
            if target.endswith(("new_ids", "media_ids")) and t.ndim == 1 and t.shape[0] < dst_state[target].shape[0]:
                if not torch.equal(dst_state[target][: t.shape[0]].cpu(), t):  # the saved rows' tokens come first
                    raise ConfigError(f"cannot start from this model: its media token ids {t.tolist()} moved")
                filled.add(target)
                continue
            if dst_state[target].shape != t.shape:
                raise ConfigError(
                    f"cannot start from this model: {name} has shape {tuple(t.shape)} but the "
                    f"overridden config needs {tuple(dst_state[target].shape)}"
                )
            dst_state[target].copy_(t.to(dst_state[target].dtype))
            filled.add(target)
    return sorted(set(dst_state) - filled)


def _grown_token_rows(name: str, src: torch.Tensor, dst: torch.Tensor) -> bool:
    """The new-token rows (`embed.extra` / `head.extra`: `<image>`, `<|endofchunk|>`, then one per other encoder in
    config order) of a model that gains an encoder: the saved rows are the first ones, the new marker's row is new
    (UnIVAL-style stages: a stage adds a modality to a trained model)."""
    return (
        name in ("embed.extra", "head.extra")
        and src.ndim == 2
        and dst.ndim == 2
        and src.shape[1] == dst.shape[1]
        and src.shape[0] < dst.shape[0]
    )


def _lora_name(name: str) -> str:
    """`...q_proj.weight` -> `...q_proj.base_layer.weight` (where peft moved the frozen weight)."""
    head, _, leaf = name.rpartition(".")
    return f"{head}.base_layer.{leaf}"


def train(cfg: TrainConfig, evaluate: Callable | None = None) -> TrainResult:
    """Run training as `cfg` says (validated first, before anything loads). Call under torchrun for
    several processes (cfg.distributed = ddp or fsdp2)."""
    from lmm.data import build_loader, prepare_datasets

    cfg.validate()
    env = init_distributed(cfg.distributed, cfg.device)
    try:
        seed_everything(cfg.seed)  # the same initial weights on every rank
        if env.is_main:
            prepare_datasets(cfg.data)  # datasets that name a preparer and are not written yet
        env.barrier()
        model = build_model(cfg, env.device)
        model.config.video_frames = cfg.data.num_frames  # saved with the model: inference samples videos alike
        if cfg.frozen_cache:
            from lmm.training.frozen_cache import frozen_cache_source

            loader = frozen_cache_source(cfg, model, log=lambda m: print(m, flush=True))
        else:
            loader = build_loader(
                cfg.data,
                model.tokenizer,
                model.image_processor,
                rank=env.rank,
                world_size=env.world_size,
                pin_memory=env.device.type == "cuda",
                system_prompt=model.config.system_prompt,  # render conversations as model.chat does
                **loader_media(model),  # audio ...: the model's own encoders' preprocessing and sample rate
            )
        if evaluate is None:
            from lmm.training.evaluation import build_evaluator

            evaluate = build_evaluator(cfg, log=lambda m: print(m, flush=True))
        return Trainer(model, cfg, loader, evaluate, env=env).fit()
    finally:
        shutdown(env)


def train_from_args(config: str | None, overrides: list[str]) -> TrainResult:
    """`train.py --config FILE key=value ...` (also `lmm train`)."""
    return train(load_train_config(config, overrides))
