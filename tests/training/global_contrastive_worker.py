"""One rank of tests/training/test_global_contrastive.py, run under torchrun (gloo): the global contrastive loss
and its gradients on this rank's rows, written to <out>/rank<r>.safetensors for the test to compare with one
process holding the whole batch. Usage: torchrun --nproc_per_node=2 global_contrastive_worker.py OUT PART
(PART: grads = the loss function and the model's loss and gradients; trainer = trainer steps)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_global_contrastive import (  # noqa: E402
    ROW_SPLITS,
    TRAINER_RUNS,
    embedding_case,
    lora_model,
    model_batch,
    train_config,
    trainer_batches,
)

from lmm.losses import contrastive_loss  # noqa: E402


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def main(out: Path, part: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if part == "grads":
        save_file(gradients(rank, world), str(out / f"rank{rank}.safetensors"))
    else:
        trainer_steps(out, rank, world)
    dist.barrier()
    dist.destroy_process_group()


def gradients(rank: int, world: int) -> dict[str, torch.Tensor]:
    result: dict[str, torch.Tensor] = {}

    # 1. the loss function on leaf embeddings, rows split unevenly (one split leaves rank 1 without rows)
    for name, split in ROW_SPLITS.items():
        image, text, scale = embedding_case()
        lo, hi = sum(split[:rank]), sum(split[: rank + 1])
        img, txt = image[lo:hi].detach().requires_grad_(), text[lo:hi].detach().requires_grad_()
        loss = contrastive_loss(img, txt, scale, gather=True)
        loss.backward()
        # what DDP optimises: the mean over ranks; its gradient for this rank's rows is grad / world
        result[f"{name}.loss"] = mean_over_ranks(loss).reshape(1)
        result[f"{name}.scale_grad"] = mean_over_ranks(scale.grad)
        result[f"{name}.image_grad"] = (img.grad / world).contiguous()
        result[f"{name}.text_grad"] = (txt.grad / world).contiguous()

    # 2. the model's contrastive loss (LoRA: gradients reach the text side too), averaged as DDP averages
    model = lora_model()
    batch = model_batch(model, rank, world)
    loss = model(**batch, return_logits=False, contrastive=True, gather_negatives=True).contrastive_loss
    loss.backward()
    result["model.loss"] = mean_over_ranks(loss).reshape(1)
    for n, p in model.named_parameters():
        if p.grad is not None:
            result[f"model.grad.{n}"] = mean_over_ranks(p.grad)

    return result


def trainer_steps(out: Path, rank: int, world: int) -> None:
    # the trainer under DDP and FSDP2: two steps on this rank's part of each global batch; then with ITM too
    from lmm.testing import ListSource
    from lmm.training import Trainer
    from lmm.training.monitor import read_metrics

    runs = {}
    for name, mode, itm in TRAINER_RUNS:
        cfg = train_config(out / name, distributed=mode, itm_weight=0.3 if itm else 0.0)
        model = lora_model(itm=True) if itm else lora_model()
        losses = Trainer(model, cfg, ListSource(trainer_batches(model, rank, world))).fit().losses
        runs[name] = {"losses": losses, "rows": [r for r in read_metrics(out / name / "run") if "loss" in r]}
    if rank == 0:
        (out / "trainer.json").write_text(json.dumps(runs))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
