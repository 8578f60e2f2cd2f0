"""`lmm data inspect`: print what the loader will make of a dataset (thin: parse, then call lmm.data.inspect)."""

from __future__ import annotations

import os
from typing import Optional

import typer


def _config(target: str, fmt: str, image_root: Optional[str], overrides: list[str]):
    from lmm.data.config import DataConfig

    if target.endswith((".yaml", ".yml")):
        return DataConfig.from_yaml(target, overrides)
    if target.startswith("easyvqa"):  # easyvqa[:split[:task]]
        parts = target.split(":")
        ds = {"source": "easyvqa", "path": parts[1] if len(parts) > 1 else "train",
              "easyvqa_task": parts[2] if len(parts) > 2 else "vqa"}
    else:
        ds = {"path": target, "format": fmt, "image_root": image_root}
    from lmm.config import apply_overrides

    return DataConfig.from_dict(apply_overrides({"datasets": [ds]}, overrides))


def _tokenizer(path: Optional[str], gguf_file: Optional[str]):
    from lmm.tokens import add_media_tokens

    if path is None:
        from lmm.testing import tiny_tokenizer

        tok = tiny_tokenizer()  # byte-level: renders any text faithfully, token counts differ from a real LM
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file) if gguf_file else AutoTokenizer.from_pretrained(path)
    add_media_tokens(tok)
    return tok


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Inspect training data.", no_args_is_help=True)

    @data_app.command("inspect")
    def inspect(
        target: str = typer.Argument(..., help="data file / glob / brace pattern / folder, a data YAML config, "
                                               "or easyvqa[:split[:vqa|caption|fewshot]]"),
        tokenizer: Optional[str] = typer.Option(None, help="HF tokenizer folder (default: a tiny byte-level one)"),
        gguf_file: Optional[str] = typer.Option(None, help="GGUF file inside --tokenizer"),
        fmt: str = typer.Option("auto", "--format", help="auto, pair, mmc4, obelics, conversation, video"),
        image_root: Optional[str] = typer.Option(None, help="folder for relative image paths"),
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

        try:
            cfg = _config(target, fmt, image_root, override)
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
            raise typer.Exit(2)

    app.add_typer(data_app, name="data")
