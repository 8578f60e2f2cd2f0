"""The trainer's evaluation hook built from a run config: the registered task `eval.task` (e.g. the demo's
easy-vqa) and the held-out sets `eval.datasets`, each scored by its own metric through `lmm.eval`, with the blind
baseline (the same model without media) beside it. `lmm eval` reports the same numbers for the same settings.
"""

from __future__ import annotations

from collections.abc import Callable


def eval_tasks(cfg) -> list:
    """The task objects a run evaluates, in order: `eval.task`, then `eval.datasets`."""
    from lmm.eval.conversation import ConversationTask
    from lmm.eval.registry import get_task

    tasks = [get_task(cfg.eval.task)] if cfg.eval.task else []
    for d in cfg.eval.datasets:
        tasks.append(
            ConversationTask.from_file(
                d.path, name=d.display_name(), metric=d.metric, candidates=d.candidates, image_root=d.image_root
            )
        )
    return tasks


def build_evaluator(cfg, log: Callable[[str], None] = print) -> Callable | None:
    """evaluate(model) -> {"<task>/accuracy", "<task>/blind_accuracy", "<task>/blind_choice_accuracy", "<task>/n"}
    (percentages) for the run's tasks, or None when the config names none."""
    tasks = eval_tasks(cfg)
    if not tasks:
        return None
    e = cfg.eval

    def evaluate(model) -> dict:
        from lmm.eval.harness import evaluate_task

        out: dict = {}
        for task in tasks:
            r = evaluate_task(
                model, task, limit=e.limit, seed=cfg.seed, batch_size=e.batch_size, blind=e.blind_baseline
            )
            metric = r["primary_metric"]
            out[f"{task.name}/{metric}"] = r["metrics"][metric]
            out[f"{task.name}/n"] = r["n"]
            line = f"{task.name}: {metric} {r['metrics'][metric]:.1f}% on {r['subset']}"
            blind = r["blind"] or {}
            for key, value in blind.items():
                if isinstance(value, float):
                    out[f"{task.name}/blind_{key}"] = value
            if blind:
                parts = []
                if metric in blind:
                    parts.append(f"{blind[metric]:.1f}% ({getattr(task, 'metric', metric).replace('_', ' ')})")
                if "choice_accuracy" in blind:
                    parts.append(
                        f"{blind['choice_accuracy']:.1f}% picking the likeliest of the {blind['candidates']} answers"
                    )
                line += "; blind baseline (same model, no media): " + ", ".join(parts)
            log(line)
        return out

    return evaluate
