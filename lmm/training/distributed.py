"""Process groups and model wrapping for torchrun / accelerate launches (DDP, FSDP2); gloo on CPU.

    env = init_distributed("ddp", device=None)   # reads RANK / WORLD_SIZE / LOCAL_RANK set by the launcher
    wrapped = wrap_model(model, env)             # DDP or fully_shard; trainable/frozen mixing handled
    state = trainable_state(wrapped, env)        # full trainable weights on rank 0 (any mode)

Frozen weights never enter the optimizer: the optimizer is built over `requires_grad` parameters of
the wrapped model, so under FSDP2 it holds only the trainable shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmm.config import ConfigError


@dataclass
class DistEnv:
    mode: str  # none | ddp | fsdp2
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (in place; returns it)."""
        if self.active and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_distributed(mode: str, device: str | None = None) -> DistEnv:
    """Read the launcher's environment and start the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and mode == "none":
        raise ConfigError(f"launched with {world} processes but distributed=none; set distributed=ddp or fsdp2")
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if mode != "none" and "MASTER_ADDR" not in os.environ:
        # one process without a launcher: a single-member group so that the same code path runs
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    if mode != "none" and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(mode, rank, world, local, dev)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP over the trainable parameters, or FSDP2 (`fully_shard`) per trainable block then the root."""
    if env.mode == "none":
        return model
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        # frozen parameters are not reduced by DDP; unused ones (a text-only batch) are allowed
        return DDP(model, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)
    if env.mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in _shard_units(model):
            fully_shard(block)
        fully_shard(model)  # the root keeps the rest (embeddings, head, new token rows, final norm)
        return model
    raise ConfigError(f"distributed must be none, ddp or fsdp2; got {env.mode!r}")


def _shard_units(model: nn.Module) -> list[nn.Module]:
    """Modules sharded on their own, inner ones first: every cross-attention block, every decoder layer,
    each modality's encoder and resampler; so that only one layer's frozen weights are gathered at a time."""
    units: list[nn.Module] = []
    if hasattr(model, "xattn_blocks"):
        units += list(model.xattn_blocks())
    if hasattr(model, "lm"):
        from lmm.fusion import find_layer_list

        units += list(find_layer_list(model.lm))
    for name in ("encoders", "resamplers"):  # one unit per modality's encoder and resampler
        units += list(getattr(model, name, {}).values())
    return units


def unwrap(model: nn.Module) -> nn.Module:
    """The LMM inside a DDP wrapper (FSDP2 shards in place, so the object is the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Full trainable weights by parameter name (on rank 0; other ranks may get an empty dict)."""
    inner = unwrap(model)
    if env.mode != "fsdp2":
        return {k: v.detach().cpu().clone() for k, v in inner.trainable_state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = set(_trainable_names(inner))
    full = get_model_state_dict(model, options=_state_options(ignore_frozen_params=True))
    return {k: v for k, v in full.items() if k in names}


def _trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def load_trainable_state(model: nn.Module, env: DistEnv, weights: dict[str, torch.Tensor]) -> None:
    """Load full trainable weights (every rank passes the same dict)."""
    inner = unwrap(model)
    expected = set(_trainable_names(inner))
    if set(weights) != expected:
        raise ValueError(
            f"checkpoint weights do not match the model's trainable parameters: missing "
            f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}"
        )
    if env.mode != "fsdp2":
        from lmm.model import copy_exact

        copy_exact(dict(inner.named_parameters()), weights)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, weights, options=_state_options(strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    """Full optimizer state keyed by parameter names (on rank 0 under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_state_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_state_options())
