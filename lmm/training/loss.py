"""The training objective over one optimizer step: next-token loss with per-dataset weights, averaged
per token or per task (4M), normalised over the GLOBAL batch (all micro-batches of all ranks).

Normalising by global counts, known before any forward, makes the gradient of one step identical
whether it is computed as 1 process x N micro-batches or N processes x 1 micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def target_mask_and_tasks(batch: dict, task_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, tasks): which next-token targets carry a loss (B, T-1), and the task id of each target."""
    keep = batch["labels"][:, 1:] != -100
    if task_ids is None:
        tasks = torch.zeros_like(keep, dtype=torch.long)
    else:
        tasks = task_ids[:, 1:] if task_ids.ndim == 2 else task_ids.view(-1, 1).expand_as(keep)
    return keep, tasks.long()


def count_targets(keep: torch.Tensor, tasks: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Labelled targets per task, as float64 (n_tasks,)."""
    sel = tasks[keep]
    if sel.numel() and int(sel.max()) >= n_tasks:
        raise ValueError(
            f"a batch has task id {int(sel.max())} but only {n_tasks} task names are known; give the "
            "batch source a `task_names` list covering every task id"
        )
    return torch.bincount(sel, minlength=n_tasks).to(torch.float64)


def task_coefficients(counts: torch.Tensor, weights: Sequence[float], mode: str) -> torch.Tensor:
    """Loss multiplier per task, from the global per-task counts: token -> w_t / N, task -> w_t / (N_t * tasks)."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    if mode == "token":
        return w / counts.sum().clamp(min=1)
    present = counts > 0
    return torch.where(present, w / (counts.clamp(min=1) * present.sum().clamp(min=1)), torch.zeros_like(w))


def step_loss(
    token_losses: torch.Tensor,
    out_labels: torch.Tensor,
    keep: torch.Tensor,
    tasks: torch.Tensor,
    coef: torch.Tensor,
    n_tasks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this micro-batch's share of the step loss, per-task summed raw losses (n_tasks,) for logging).

    `out_labels` are the labels the model scored (after `<image>` expansion for Q-Former/projector
    bridges); labelled targets keep their order, so the k-th scored loss is the k-th target of `keep`."""
    scored = token_losses[out_labels[:, 1:] != -100]
    task_sel = tasks[keep].to(scored.device)
    if scored.shape != task_sel.shape:
        raise RuntimeError(f"the model scored {scored.numel()} targets but the batch labels {task_sel.numel()}")
    loss = (scored.double() * coef.to(scored.device)[task_sel]).sum()
    per_task = torch.zeros(n_tasks, dtype=torch.float64, device=scored.device)
    per_task.index_add_(0, task_sel, scored.detach().double())
    return loss, per_task
