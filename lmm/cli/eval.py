"""`lmm eval`: parse the options, load the model, call `lmm.eval.harness.evaluate`, print the table."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import typer

HELP = """Few-shot benchmark evaluation (Flamingo / OpenFlamingo protocol).

Tasks: coco, flickr30k, vqav2, okvqa, textvqa, vizwiz, hatefulmemes, imagenet, easyvqa.

Files expected under --data-root per task: `python -m pydoc lmm.eval.tasks`.

Writes the aggregate to --out, per-sample predictions to OUT.predictions/ and finished shards to OUT.shards/ (a rerun with the same settings skips them). Scores are x100, as in the papers.
"""


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers such as 0,4,8, got {text!r}",
                                 param_hint="--shots") from None
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


def register(app: typer.Typer) -> None:
    @app.command("eval", help=HELP)
    def eval_command(
        model: str = typer.Option(..., "--model", help="A saved lmm model directory or a preset name."),
        tasks: str = typer.Option(..., "--tasks", help="Comma-separated tasks, e.g. coco,vqav2."),
        shots: str = typer.Option("0,4,8,16,32", "--shots", help="Comma-separated shot counts."),
        data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder holding the tasks' files."),
        limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N test samples."),
        out: Path = typer.Option(Path("results.json"), "--out", help="Aggregate results JSON."),
        trials: int = typer.Option(3, "--trials", help="Random-demo trials (mean and std reported)."),
        rices: bool = typer.Option(False, "--rices", help="Pick demos by image similarity (RICES), not at random."),
        batch_size: int = typer.Option(8, "--batch-size", help="Test samples per model call."),
        seed: int = typer.Option(0, "--seed", help="First trial's seed (also easy-vqa's subset shuffle)."),
        num_beams: int = typer.Option(3, "--num-beams", help="Beams for captioning / VQA generation."),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens",
                                                     help="Cap generated tokens (default: 20 captions, 5 VQA)."),
        zero_shot_text_demos: int = typer.Option(2, "--zero-shot-text-demos",
                                                 help="Text-only demos before a 0-shot query (0: none)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
        meteor: bool = typer.Option(True, "--meteor/--no-meteor", help="Compute METEOR for captioning (Java, ~2 GB)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    ) -> None:
        from lmm.config import ConfigError
        from lmm.eval.harness import EvalConfig, EvalConfigError, evaluate, print_summary
        from lmm.eval.metrics import JavaMissingError
        from lmm.eval.tasks import TaskDataError, parse_tasks

        user_errors = (EvalConfigError, TaskDataError, JavaMissingError, ConfigError)
        try:
            task_names = [t.name for t in parse_tasks(tasks)]
            cfg = EvalConfig(tasks=task_names, shots=parse_shots(shots),
                             data_root=None if data_root is None else str(data_root), limit=limit, trials=trials,
                             seed=seed, rices=rices, batch_size=batch_size, out=str(out), num_beams=num_beams,
                             zero_shot_text_demos=zero_shot_text_demos, max_new_tokens=max_new_tokens, meteor=meteor,
                             progress=progress)
            cfg.validate()
            from lmm.model import LMM

            lmm_model = LMM.from_pretrained(model, device=device)
            report = evaluate(lmm_model, cfg, model_id=model_identity(model))
        except user_errors as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        print_summary(report)
        typer.echo(f"results: {out}")
