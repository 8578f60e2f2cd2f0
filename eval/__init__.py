"""lmm.eval: few-shot benchmark evaluation (Flamingo / OpenFlamingo protocol) with reference-exact metrics.

Python entry points:
    from lmm.eval import EvalConfig, evaluate, evaluate_easy_vqa, print_summary
    report = evaluate(model, EvalConfig(tasks=["coco", "vqav2"], shots=[0, 4], data_root="/data", limit=100,
                                        out="results.json"))
    print_summary(report)
    evaluate_easy_vqa(model, limit=1000)["accuracy"]

Command line: `lmm eval --model DIR --tasks coco,vqav2 --shots 0,4,8 --data-root PATH [--limit N] [--out results.json]`.

Modules: `tasks` (datasets and their file layouts), `prompts` (every template), `metrics` and
`vqa_normalize` (scorers), `rices` (demo retrieval), `harness` (the loop), `results` (shards, JSON,
summary table), `easyvqa` (the demo benchmark).
"""

from __future__ import annotations

_EXPORTS = {
    "EvalConfig": "harness", "EvalConfigError": "harness", "evaluate": "harness", "print_summary": "harness",
    "evaluate_easy_vqa": "easyvqa", "TASKS": "tasks", "TaskDataError": "tasks",
    "vqa_accuracy": "vqa_normalize", "normalize_answer": "vqa_normalize",
    "caption_metrics": "metrics", "RICES": "rices",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy, so that `lmm --help` does not import torch through here
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
