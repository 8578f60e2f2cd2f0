"""The tasks `lmm eval --tasks` and a training config's `eval.task` can name: the few-shot benchmarks (images:
`lmm.eval.benchmarks`; video and audio: `lmm.eval.media_tasks`) and the easy-vqa demo, by name (with a few
aliases). A task object not listed here can be passed to the harness as is.
"""

from __future__ import annotations

from .benchmarks import BENCHMARKS
from .easyvqa import EASYVQA
from .media_tasks import MEDIA_TASKS
from .task import EvalTask, TaskDataError

TASKS: dict[str, EvalTask] = {t.name: t for t in (*BENCHMARKS, *MEDIA_TASKS, EASYVQA)}
ALIASES = {
    "flickr": "flickr30k",
    "ok-vqa": "okvqa",
    "ok_vqa": "okvqa",
    "vqa": "vqav2",
    "vqa2": "vqav2",
    "hateful_memes": "hatefulmemes",
    "hm": "hatefulmemes",
    "easy-vqa": "easyvqa",
    "easy_vqa": "easyvqa",
    "classification": "imagenet",
    "msrvtt": "msrvtt_qa",
    "msrvtt-qa": "msrvtt_qa",
    "msvd": "msvd_qa",
    "msvd-qa": "msvd_qa",
    "esc-50": "esc50",
    "clotho_captioning": "clotho",
    "audio-caps": "audiocaps",
    "audio_caps": "audiocaps",
    "esc_50": "esc50",
}


def get_task(name: str) -> EvalTask:
    """The registered task called `name` (case and aliases forgiven); TaskDataError suggests the closest name."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        import difflib

        near = difflib.get_close_matches(key, list(TASKS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise TaskDataError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def parse_tasks(spec) -> list[EvalTask]:
    """Tasks from a comma-separated string of names, or a list of names and/or task objects."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, EvalTask):
            out.append(item)
        elif str(item).strip():
            out.append(get_task(str(item)))
    if not out:
        raise TaskDataError(f"--tasks is empty; choose from: {', '.join(TASKS)}")
    return out
