"""`lmm merge A B --alpha 0.5 --out C`: interpolate two models fine-tuned from the same start (UnIVAL)."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = """Merge two fine-tuned models by weight interpolation: C = (1 - alpha) * A + alpha * B.

A and B are save_pretrained directories (e.g. runs/NAME/final) trained from the same starting model;
their bridge and LoRA weights are interpolated. Incompatible models are refused.
"""


def register(app: typer.Typer) -> None:
    @app.command("merge", help=HELP)
    def merge_command(
        a: Path = typer.Argument(..., help="First model directory (alpha = 0)."),
        b: Path = typer.Argument(..., help="Second model directory (alpha = 1)."),
        alpha: float = typer.Option(0.5, "--alpha", help="Weight of B, between 0 and 1."),
        out: Path = typer.Option(..., "--out", help="Output model directory."),
    ) -> None:
        from lmm.config import ConfigError
        from lmm.merge import merge_models

        try:
            path = merge_models(a, b, alpha, out)
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"merged model: {path}")
