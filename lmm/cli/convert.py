"""`lmm convert SOURCE ...`: models made elsewhere -> folders lmm loads (thin: parse, then call lmm.convert.*).
Each source is one sub-command of the `convert` group below."""

from __future__ import annotations

from pathlib import Path

import typer

convert_app = typer.Typer(
    help="Convert models made elsewhere into folders lmm loads.", no_args_is_help=True, add_completion=False
)


@convert_app.callback()
def _group() -> None:
    """Convert models made elsewhere into folders lmm loads."""


def run_converter(label: str, convert, *args) -> None:
    """Call a converter or exporter: a ConfigError (a bad checkpoint, folder or option) is a clear command-line error
    (exit 2); success prints the folder written."""
    from lmm.config import ConfigError

    try:
        path = convert(*args)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{label}: {path}")


@convert_app.command("whisper-ct2")
def whisper_ct2_command(
    model: Path = typer.Option(..., "--model", help="CTranslate2 Whisper folder (model.bin, config.json, ...)."),
    out: Path = typer.Option(..., "--out", help="New HF Whisper folder to write (must not exist or be empty)."),
) -> None:
    """CTranslate2 Whisper -> HF Whisper folder (use it as encoders.audio: {kind: whisper, options: {path: OUT}})."""
    from lmm.convert.whisper_ct2 import convert_whisper_ct2

    run_converter("HF Whisper folder", convert_whisper_ct2, model, out)


@convert_app.command("openflamingo")
def openflamingo_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="OpenFlamingo checkpoint.pt (or .safetensors)."),
    vision: str = typer.Option(
        ..., "--vision", help="open_clip NAME[:WEIGHTS] (e.g. ViT-L-14-quickgelu:clip.pt), NAME may be a config .json."
    ),
    lm: Path = typer.Option(..., "--lm", help="HF folder of the language model it was trained on."),
    cross_attn_every: int = typer.Option(None, "--cross-attn-every", help="Checked against the checkpoint."),
    tokenizer: Path = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: --lm)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Frozen weights as saved: fp32, bf16 or fp16."),
    out: Path = typer.Option(..., "--out", help="New lmm model directory (must not exist or be empty)."),
) -> None:
    """OpenFlamingo checkpoint -> lmm model directory with OpenFlamingo's outputs."""
    from lmm.convert.openflamingo import convert_openflamingo

    run_converter("lmm model", convert_openflamingo, checkpoint, vision, lm, out, cross_attn_every, tokenizer, dtype)


@convert_app.command("llava")
def llava_command(
    model: Path = typer.Option(..., "--model", help="HF LlavaForConditionalGeneration folder (LLaVA-1.5 layout)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Frozen weights as saved: fp32, bf16 or fp16."),
    out: Path = typer.Option(..., "--out", help="New lmm model directory (must not exist or be empty)."),
) -> None:
    """LLaVA (HF folder) -> lmm model directory on the projector bridge, with LLaVA's outputs."""
    from lmm.convert.llava import convert_llava

    run_converter("lmm model", convert_llava, model, out, dtype)


@convert_app.command("idefics")
def idefics_command(
    model: Path = typer.Option(..., "--model", help="HF IdeficsForVisionText2Text folder (IDEFICS 9B/80B, instruct)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Frozen weights as saved: fp32, bf16 or fp16."),
    out: Path = typer.Option(..., "--out", help="New lmm model directory (must not exist or be empty)."),
) -> None:
    """IDEFICS (HF folder) -> lmm model directory on the flamingo bridge, with IDEFICS's outputs."""
    from lmm.convert.idefics import convert_idefics

    run_converter("lmm model", convert_idefics, model, out, dtype)


def register(app: typer.Typer) -> None:
    app.add_typer(convert_app, name="convert")
