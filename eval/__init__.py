"""lmm.eval: few-shot benchmark evaluation (Flamingo / OpenFlamingo protocol) with reference-exact metrics,
and chat-style evaluation of held-out conversation sets (exact match / choice, with a blind baseline).

Python entry points:
    from lmm.eval import EvalConfig, evaluate, evaluate_task, print_summary
    report = evaluate(model, EvalConfig(tasks=["coco", "vqav2"], shots=[0, 4], data_root="/data", limit=100,
                                        out="results.json"))
    print_summary(report)
    evaluate_task(model, "easyvqa", limit=1000)["metrics"]["accuracy"]
    evaluate_task(model, ConversationTask.from_file("heldout.json", metric="choice"), blind=True)

Command line: `lmm eval --model DIR --tasks coco,vqav2 --shots 0,4,8 --data-root PATH [--limit N] [--out results.json]`,
`lmm eval --model DIR --data heldout.json --format conversation [--metric exact_match|choice]`.

Modules: `task` (the interface every task implements), `tasks` (benchmark datasets and their file layouts),
`benchmarks` (the Flamingo-protocol tasks), `media_tasks` (video QA, audio captioning and classification; their
files: `video_qa`, `audio_tasks`), `conversation` (chat tasks over conversation data), `easyvqa` (the
demo benchmark), `registry` (task names), `prompts` (every template), `metrics` and `vqa_normalize` (scorers),
`rices` (demo retrieval), `harness` (the loop), `results` (shards, JSON, summary table).
"""

from __future__ import annotations

_EXPORTS = {
    "EvalConfig": "harness",
    "evaluate": "harness",
    "evaluate_task": "harness",
    "print_summary": "harness",
    "EvalConfigError": "task",
    "EvalTask": "task",
    "TaskDataError": "task",
    "Sample": "task",
    "TaskData": "task",
    "TASKS": "registry",
    "get_task": "registry",
    "ConversationTask": "conversation",
    "vqa_accuracy": "vqa_normalize",
    "normalize_answer": "vqa_normalize",
    "caption_metrics": "metrics",
    "RICES": "rices",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):  # lazy, so that `lmm --help` does not import torch through here
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
