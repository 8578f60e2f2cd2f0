"""`lmm data inspect`: print what the loader will make of a dataset (thin: parse, then call lmm.data.inspect);
`lmm data prepare NAME --out DIR`: write a named dataset's files (lmm.data.prepare)."""

from __future__ import annotations

import os

import typer


def _config(target: str, fmt: str, image_root: str | None, overrides: list[str]):
    from lmm.data.config import DataConfig

    if target.endswith((".yaml", ".yml")):
        return DataConfig.from_yaml(target, overrides)
    ds = {"path": target, "format": fmt, "image_root": image_root}
    from lmm.config import apply_overrides

    return DataConfig.from_dict(apply_overrides({"datasets": [ds]}, overrides))


def _tokenizer(path: str | None, gguf_file: str | None):
    from lmm.tokens import add_media_tokens

    if path is None:
        from lmm.data.byte_tokenizer import byte_tokenizer

        tok = byte_tokenizer()  # renders any text faithfully; token counts are bytes, not a real LM's
    else:
        from transformers import AutoTokenizer

        tok = (
            AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
            if gguf_file
            else AutoTokenizer.from_pretrained(path)
        )
    add_media_tokens(tok)
    return tok


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Inspect and prepare training data.", no_args_is_help=True)

    @data_app.command("inspect")
    def inspect(
        target: str = typer.Argument(
            ...,
            help="data file / glob / brace pattern / folder, or a data YAML config (its datasets' preparers run first)",
        ),
        tokenizer: str | None = typer.Option(None, help="HF tokenizer folder (default: a tiny byte-level one)"),
        gguf_file: str | None = typer.Option(None, help="GGUF file inside --tokenizer"),
        fmt: str = typer.Option("auto", "--format", help="auto, pair, mmc4, obelics, conversation, video"),
        image_root: str | None = typer.Option(None, help="folder for relative image paths"),
        samples: int = typer.Option(3, help="samples to print per dataset"),
        limit: int = typer.Option(200, help="records to read per dataset for the counts"),
        override: list[str] = typer.Option([], "--set", help="dotted config override, e.g. max_tokens=256"),
    ):
        """Counts, a few rendered samples (with <image> markers and loss spans), token lengths, bad samples."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        from lmm.config import ConfigError
        from lmm.data.errors import DataError
        from lmm.data.inspect import format_inspection, inspect_dataset
        from lmm.data.prepare import prepare_datasets

        try:
            cfg = _config(target, fmt, image_root, override)
            prepare_datasets(cfg)
            tok = _tokenizer(tokenizer, gguf_file)
            seen = set()
            for stage in cfg.resolved_stages():
                for d in stage.datasets:
                    if d.display_name() in seen:
                        continue
                    seen.add(d.display_name())
                    typer.echo(format_inspection(inspect_dataset(d, cfg, tok, limit, samples)))
        except (ConfigError, DataError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    @data_app.command("prepare")
    def prepare(
        name: str = typer.Argument(..., help="a data preparer (lmm.data.prepare.PREPARERS), e.g. easyvqa"),
        out: str = typer.Option(..., "--out", help="folder to write the files into (created)"),
    ):
        """Write a named dataset as ordinary training files (e.g. easy-vqa as LLaVA-style conversation JSON)."""
        from lmm.config import ConfigError
        from lmm.data.prepare import run_preparer

        try:
            for path in run_preparer(name, out):
                typer.echo(str(path))
        except ConfigError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    app.add_typer(data_app, name="data")
