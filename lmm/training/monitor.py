"""Watching a run (rank 0 only): progress bar, log lines, metrics file, TensorBoard / wandb, loss plot.

`metrics.jsonl` in the run folder gets one JSON line per optimizer step (and one per evaluation);
a resumed run truncates it to the resume step first, so it always describes one clean history.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS = "metrics.jsonl"
PLOT = "loss.png"


class Monitor:
    def __init__(self, run_dir: Path, cfg, total_steps: int, start_step: int, enabled: bool, task_names: list[str]):
        self.run_dir, self.cfg, self.enabled = Path(run_dir), cfg, enabled
        self.total, self.start, self.task_names = total_steps, start_step, task_names
        self.t0 = time.time()
        self.tokens = 0
        self.bar = self.tb = self.wandb = None
        self.metrics_file = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics(start_step)
        self.metrics_file = open(self.run_dir / METRICS, "a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "note: tensorboard is not installed (pip install tensorboard); TensorBoard logging is off",
                    file=sys.stderr,
                )
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.name,
                dir=str(self.run_dir),
                config=cfg.to_dict(),
                resume="allow",
            )
        if cfg.logging.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=cfg.name, unit="step", dynamic_ncols=True, mininterval=1.0
            )

    def _truncate_metrics(self, step: int) -> None:
        path = self.run_dir / METRICS
        if not path.is_file():
            return
        keep = [json.dumps(m) for m in _parse_lines(path.read_text()) if m["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(
        self, step: int, loss: float, lr: float, tokens: int, task_losses: dict, grad_norm: float | None, skipped: bool
    ) -> None:
        """Record optimizer step `step` (1-based)."""
        if not self.enabled:
            return
        self.tokens += tokens
        elapsed = max(time.time() - self.t0, 1e-9)
        tok_s = self.tokens / elapsed
        rec = {
            "step": step,
            "loss": loss,
            "lr": lr,
            "tokens": tokens,
            "tokens_per_s": round(tok_s, 1),
            "time": round(elapsed, 3),
            "skipped": skipped,
            **{f"loss/{k}": v for k, v in task_losses.items()},
        }
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        self.metrics_file.write(json.dumps(rec) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            if math.isfinite(loss):
                self.tb.add_scalar("train/loss", loss, step)
            self.tb.add_scalar("train/lr", lr, step)
            self.tb.add_scalar("train/tokens_per_s", tok_s, step)
            if grad_norm is not None and math.isfinite(grad_norm):
                self.tb.add_scalar("train/grad_norm", grad_norm, step)
            for k, v in task_losses.items():
                self.tb.add_scalar(f"train/loss_{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.update(1)
        if step % self.cfg.logging.log_every == 0 or step == self.total:
            eta = (self.total - step) * elapsed / max(1, step - self.start)
            self.write(
                f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.3e}  tokens/s {tok_s:,.0f}  eta {_fmt_time(eta)}"
            )

    def evaluation(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps({"step": step, "eval": metrics}) + "\n")
        self.metrics_file.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                if self.tb is not None:
                    self.tb.add_scalar(f"eval/{k}", v, step)
                if self.wandb is not None:
                    self.wandb.log({f"eval/{k}": v}, step=step)
        self.write(f"eval at step {step}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.cfg.logging.plot:
            plot_losses(self.run_dir)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return _parse_lines(path.read_text()) if path.is_file() else []


def _parse_lines(text: str) -> list[dict]:
    """The metric records of a metrics.jsonl; a line torn by a crash mid-write (or any unreadable one) is dropped."""
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def plot_losses(run_dir: str | Path) -> Path | None:
    """Write <run_dir>/loss.png: the training loss (and per-task losses) against the step."""
    rows = [r for r in read_metrics(run_dir) if "loss" in r and math.isfinite(r["loss"])]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss", linewidth=1.2)
    tasks = sorted({k for r in rows for k in r if k.startswith("loss/")})
    if len(tasks) > 1:
        for k in tasks:
            pts = [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k[5:], linewidth=0.8, alpha=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
