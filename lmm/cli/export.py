"""`lmm export FORMAT SRC --out DIR`: an lmm model directory -> another framework's format (thin: parse, then call
lmm.convert.*). `llava`: an HF LlavaForConditionalGeneration folder (transformers, vLLM, TGI)."""

from __future__ import annotations

from pathlib import Path

import typer

from lmm.cli.convert import run_converter

export_app = typer.Typer(
    help="Export lmm models to other frameworks' formats.", no_args_is_help=True, add_completion=False
)


@export_app.callback()
def _group() -> None:
    """Export lmm models to other frameworks' formats."""


@export_app.command("llava")
def llava_command(
    src: Path = typer.Argument(
        ..., help="An lmm model directory on the projector bridge with an HF CLIP/SigLIP tower."
    ),
    out: Path = typer.Option(..., "--out", help="New HF folder (LlavaForConditionalGeneration + processor)."),
) -> None:
    """lmm (projector bridge) -> HF LlavaForConditionalGeneration folder."""
    from lmm.convert.export_llava import export_llava

    run_converter("HF LLaVA folder", export_llava, src, out)


@export_app.command("openflamingo")
def openflamingo_command(
    src: Path = typer.Argument(..., help="An lmm flamingo model directory with OpenFlamingo's shapes."),
    out: Path = typer.Option(..., "--out", help="New folder: checkpoint.pt, lm/, vision.pt, openflamingo.json."),
    drop_time_embeddings: bool = typer.Option(
        False, "--drop-time-embeddings", help="Drop learned media-time/frame embeddings (changes the outputs)."
    ),
) -> None:
    """lmm (flamingo bridge) -> files open_flamingo's create_model_and_transforms + load_state_dict accept."""
    from lmm.convert.export_openflamingo import export_openflamingo

    run_converter(
        "OpenFlamingo files (arguments in openflamingo.json)", export_openflamingo, src, out, drop_time_embeddings
    )


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
