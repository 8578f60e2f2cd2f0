"""The `lmm` command: a thin typer app; each sub-command lives in its own module and only parses."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    help="lmm: Flamingo-style multimodal models (train, chat, serve, web, eval, data, merge, convert, export).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)`; a module that is absent (or whose optional extra is missing
# at import) simply does not add its command.
_COMMAND_MODULES = ("train", "chat", "serve", "web", "eval", "data", "merge", "convert", "export")
for _name in _COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"lmm.cli.{_name}")
    except ModuleNotFoundError as e:  # the command's module is not written / its extra not installed
        if e.name and e.name.startswith("lmm.cli."):
            continue
        raise
    _mod.register(app)


def main() -> None:
    """The `lmm` entry point: local files only (no hub), TF32 matmuls on CUDA, then the command."""
    from lmm.runtime import enable_tf32, offline

    offline()
    enable_tf32()
    app()
