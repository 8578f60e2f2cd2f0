"""`lmm train --config FILE [key=value ...]` (the same as `python train.py ...`): parse, then call
`lmm.training.train`. Launch several processes with `torchrun --nproc_per_node N train.py ...`."""

from __future__ import annotations

import os

import typer

HELP = """Train a model as the YAML config says; dotted key=value pairs override it.

Examples: `lmm train --config configs/instruct_lora.yaml schedule.max_steps=200 optim.lr=2e-4`;
on several processes: `torchrun --nproc_per_node 2 train.py --config CONFIG distributed=ddp` (or fsdp2).

The resolved config, checkpoints, metrics.jsonl, TensorBoard logs and loss.png go to run_dir
(runs/NAME by default), the final model to run_dir/final. Starting the same run again continues
from its latest complete checkpoint (checkpoint.resume=auto).

A dataset that names a preparer (`prepare: easyvqa`) is written first if its path is missing;
`eval.task` (a registered task) and `eval.datasets` (held-out conversation files, each with its
metric) are evaluated at eval.every and at the end, beside a blind baseline.
"""


def run(config: str | None, overrides: list[str]) -> None:
    """Load, validate and train; user errors exit with a one-line message instead of a traceback."""
    from lmm.config import ConfigError
    from lmm.data.errors import DataError
    from lmm.training.config import load_train_config
    from lmm.training.run import train
    from lmm.training.trainer import NonFiniteLossError

    try:
        result = train(load_train_config(config, overrides))
    except (ConfigError, DataError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except NonFiniteLossError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if result.output_dir is not None and os.environ.get("RANK", "0") == "0":
        typer.echo(f"model: {result.output_dir}")


def register(app: typer.Typer) -> None:
    @app.command("train", help=HELP, context_settings={"allow_extra_args": False})
    def train_command(
        config: str | None = typer.Option(None, "--config", "-c", help="Run config YAML (see configs/)."),
        overrides: list[str] | None = typer.Argument(None, help="Dotted overrides, e.g. optim.lr=1e-4"),
    ) -> None:
        run(config, list(overrides or []))


def main() -> None:
    """`python train.py ...`: the train command as a stand-alone program."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app()
