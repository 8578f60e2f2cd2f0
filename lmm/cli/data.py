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
        fmt: str = typer.Option("auto", "--format", help="auto, pair, mmc4, obelics, conversation, video, audio"),
        image_root: str | None = typer.Option(None, help="folder for relative image/video/audio paths"),
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

    @data_app.command("label")
    def label(
        model: str = typer.Option(..., help="a save_pretrained model directory or a preset name (lmm-tiny)"),
        input: str = typer.Option(..., "--input", help="tar shards (file / glob / {0..9} / folder) or an image folder"),
        output: str = typer.Option(..., "--output", help="folder for the labelled shards (a relaunch resumes it)"),
        prompt: str | None = typer.Option(None, help="what to ask of every sample (vqa: a {question} template)"),
        task: str | None = typer.Option(None, help="caption or vqa (a built-in prompt) instead of --prompt"),
        questions: str | None = typer.Option(None, help="vqa: file with one question per line (or a JSON list)"),
        chat: bool = typer.Option(False, help="ask through the model's chat template"),
        system: str | None = typer.Option(None, help="--chat: the system message (default: the model's own)"),
        field: str = typer.Option("label", help="added members: FIELD.txt (text) and FIELD.json (scores, prompt)"),
        model_id: str | None = typer.Option(None, help="model id recorded in each sample (default: its name)"),
        media: str = typer.Option("image", help="image, video or audio: what each sample holds for its marker"),
        image_key: str | None = typer.Option(None, help="member holding the media (default: jpg/png | mp4 | wav ...)"),
        batch_size: int = typer.Option(32, help="prompt rows per left-padded batch"),
        max_new_tokens: int = typer.Option(32),
        min_score: float | None = typer.Option(None, help="drop answers whose mean token log-prob is lower"),
        similarity: bool = typer.Option(False, help="also score image-text similarity (contrastive head)"),
        clip_model: str | None = typer.Option(None, help="or score it with open_clip: a name or a model-config .json"),
        clip_checkpoint: str | None = typer.Option(None, help="the open_clip weights file for --clip-model"),
        min_similarity: float | None = typer.Option(None, help="drop answers with a lower similarity"),
        dedup: bool = typer.Option(False, help="drop samples whose output repeats an earlier one in the shard"),
        shard_size: int = typer.Option(1000, help="samples per output shard for an image-folder input"),
        progress: bool = typer.Option(True, help="progress bar (rank 0) with samples/s and ETA"),
        device: str | None = typer.Option(None, help="default: cuda:LOCAL_RANK if available, else cpu"),
    ):
        """Pseudo-label every sample with a model and write filtered webdataset shards (resumable; under torchrun
        each rank takes every WORLD_SIZE-th shard)."""
        import json

        from lmm.config import ConfigError
        from lmm.data.errors import DataError
        from lmm.label import LabelConfig, run_label

        opts = dict(locals())
        try:
            result = run_label(LabelConfig(**{k: v for k, v in opts.items() if k in LabelConfig.__dataclass_fields__}))
        except (ConfigError, DataError, ValueError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "summary"}))
        if result["summary"] is not None:
            typer.echo(json.dumps({k: v for k, v in result["summary"].items() if k != "settings"}))

    app.add_typer(data_app, name="data")
