"""`lmm eval`: parse the options, load the model, call `lmm.eval.harness.evaluate`, print the table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import typer

HELP = """Few-shot benchmark evaluation (Flamingo / OpenFlamingo protocol), and held-out conversation sets.

Tasks: coco, flickr30k, vqav2, okvqa, textvqa, vizwiz, hatefulmemes, imagenet, easyvqa; video: msrvtt_qa,
msvd_qa; audio (a model with an audio encoder): clotho, audiocaps, esc50.

Files expected under --data-root per task: `python -m pydoc lmm.eval.tasks` (video: lmm.eval.video_qa, audio:
lmm.eval.audio_tasks).

--data FILE --format conversation evaluates your own held-out set in the training format (LLaVA-style JSON): the
final assistant turn of each conversation is the answer, asked through the model's chat template; --metric
exact_match (generated answer) or choice (likeliest of the closed answer set: --candidates, else every distinct
answer of the file), with the blind baseline (the same model without images) beside it.

--prompt-style chat asks the benchmarks the way `model.chat` does (the model's chat template and system prompt;
few-shot demos as earlier user/assistant turns; no text-only demos at 0 shots); flamingo (the default) keeps the
Flamingo completion templates (`<image>Question:... Short answer:`). Held-out conversation sets are always chat.

Writes the aggregate to --out, per-sample predictions to OUT.predictions/ and finished shards to OUT.shards/
(a rerun with the same settings skips them). Scores are x100, as in the papers.
"""


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"expected comma-separated integers such as 0,4,8, got {text!r}", param_hint="--shots"
        ) from None
    if not shots or any(s < 0 for s in shots):
        raise typer.BadParameter(f"expected non-negative shot counts such as 0,4,8, got {text!r}", param_hint="--shots")
    return list(dict.fromkeys(shots))  # "0,4,4" runs 4 shots once


def model_identity(model: str) -> str:
    """The model's name plus, for a directory, the names, sizes and times of its files (a retrained
    model in the same folder must not reuse finished shards)."""
    path = Path(model)
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{path.resolve()}@{h.hexdigest()[:12]}"


def select_tasks(
    tasks: str | None, data: Path | None, fmt: str, metric: str, candidates: str | None, image_root: Path | None
) -> list:
    """The task objects for --tasks (registered names) and/or --data (a held-out conversation file)."""
    from lmm.eval.conversation import ConversationTask
    from lmm.eval.registry import parse_tasks
    from lmm.eval.task import EvalConfigError

    if not tasks and data is None:
        raise EvalConfigError("pass --tasks (e.g. --tasks coco,vqav2) or --data FILE --format conversation")
    out = parse_tasks(tasks) if tasks else []
    if data is not None:
        if fmt != "conversation":
            raise EvalConfigError(
                f"--format {fmt!r}: held-out sets are read in the conversation format (LLaVA-style "
                "JSON: the final assistant turn is the answer); pass --format conversation"
            )
        if not data.exists():
            raise EvalConfigError(f"--data {data}: file not found")
        cands = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
        out.append(
            ConversationTask.from_file(
                str(data), metric=metric, candidates=cands, image_root=None if image_root is None else str(image_root)
            )
        )
    return out


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    def eval_command(
        model: str = typer.Option(..., "--model", help="A saved lmm model directory or a preset name."),
        tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated tasks, e.g. coco,vqav2."),
        data: Path | None = typer.Option(None, "--data", help="A held-out conversation file (instead of --tasks)."),
        fmt: str = typer.Option("conversation", "--format", help="Format of --data (conversation)."),
        metric: str = typer.Option("exact_match", "--metric", help="--data: exact_match or choice."),
        candidates: str | None = typer.Option(None, "--candidates", help="--data: comma-separated closed answer set."),
        image_root: Path | None = typer.Option(None, "--image-root", help="--data: folder of relative image paths."),
        blind: bool | None = typer.Option(
            None, "--blind/--no-blind", help="Also the blind baseline (no images); default: on with --data."
        ),
        shots: str | None = typer.Option(
            None, "--shots", help="Comma-separated shot counts (default 0,4,8,16,32; 0 with --data)."
        ),
        data_root: Path | None = typer.Option(None, "--data-root", help="Folder holding the tasks' files."),
        limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N test samples."),
        out: Path = typer.Option(Path("results.json"), "--out", help="Aggregate results JSON."),
        trials: int = typer.Option(3, "--trials", help="Random-demo trials (mean and std reported)."),
        rices: bool = typer.Option(False, "--rices", help="Pick demos by image similarity (RICES), not at random."),
        batch_size: int = typer.Option(8, "--batch-size", help="Test samples per model call."),
        seed: int = typer.Option(0, "--seed", help="First trial's seed (also chat tasks' subset shuffle)."),
        num_beams: int = typer.Option(3, "--num-beams", help="Beams for captioning / VQA generation."),
        max_new_tokens: int | None = typer.Option(
            None, "--max-new-tokens", help="Cap generated tokens (default: 20 captions, 5 VQA)."
        ),
        zero_shot_text_demos: int = typer.Option(
            2, "--zero-shot-text-demos", help="Text-only demos before a 0-shot query (0: none)."
        ),
        prompt_style: str = typer.Option(
            "flamingo", "--prompt-style", help="Benchmarks: flamingo (completion templates) or chat (model.chat's)."
        ),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
        meteor: bool = typer.Option(True, "--meteor/--no-meteor", help="Compute METEOR for captioning (Java, ~2 GB)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        from lmm.config import ConfigError
        from lmm.eval.harness import EvalConfig, EvalConfigError, evaluate, print_summary
        from lmm.eval.metrics import JavaMissingError
        from lmm.eval.task import TaskDataError

        user_errors = (EvalConfigError, TaskDataError, JavaMissingError, ConfigError)
        try:
            task_list = select_tasks(tasks, data, fmt, metric, candidates, image_root)
            cfg = EvalConfig(
                tasks=task_list,
                shots=parse_shots(shots or ("0" if data else "0,4,8,16,32")),
                blind=bool(data) if blind is None else blind,
                data_root=None if data_root is None else str(data_root),
                limit=limit,
                trials=trials,
                seed=seed,
                rices=rices,
                batch_size=batch_size,
                out=str(out),
                num_beams=num_beams,
                zero_shot_text_demos=zero_shot_text_demos,
                max_new_tokens=max_new_tokens,
                meteor=meteor,
                progress=progress,
                prompt_style=prompt_style,
            )
            cfg.validate()
            from lmm.model import LMM

            lmm_model = LMM.from_pretrained(model, device=device)
            report = evaluate(lmm_model, cfg, model_id=model_identity(model))
        except user_errors as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        print_summary(report)
        typer.echo(f"results: {out}")
