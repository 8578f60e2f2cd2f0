"""The task interface of the evaluation harness: what a task holds, and what it must do for the loop.

A task owns everything that differs between benchmarks: where its data comes from, how a prompt is built,
how the model is asked (generation settings or candidate ranking), how answers are cleaned and scored, and
(optionally) a blind baseline. `lmm.eval.harness` runs any object with this interface and never names a task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class TaskDataError(ValueError):
    """A task's files are missing or not in the expected format; the message says what to fix."""


class EvalConfigError(ValueError):
    """A setting of the evaluation is invalid; the message names the option to change."""


@dataclass
class Sample:
    """One test or demonstration sample: `answers` are the reference captions, the human answers, or the class name.

    Conversation tasks also carry `messages` (the turns before the answer, contents with `<image>` markers) and
    `media` (one image per marker: paths, or raw values the data loader understands)."""

    id: str
    image: str
    question: str = ""
    answers: tuple[str, ...] = ()
    target: str = ""  # the answer used when this sample is a demonstration
    label: int | None = None  # class index (classification, HatefulMemes)
    messages: tuple = ()  # conversation tasks: the turns before the answer
    media: tuple = ()  # conversation tasks: the images of `messages`, in order


@dataclass
class TaskData:
    train: list[Sample]
    test: list[Sample]
    classes: tuple[str, ...] = ()
    files: list[str] = field(default_factory=list)  # what was read, for the results JSON


class EvalTask:
    """Base class of every task. Subclasses set `name` and `primary_metric` and implement `load`,
    `build_inputs`, `infer` and `score`; the rest has defaults.

    The harness calls, per task: `check()`, `load(data_root, seed)`, then per test batch
    `build_inputs(model, query, demos, text_only)` and `infer(model, prompts, images, data, cfg)`, then per
    trial `score(data, test, records, cfg)`; with `cfg.blind`, also `blind_baseline(model, test, data, cfg)`."""

    name: str = ""
    primary_metric: str = ""
    needs_data_root: bool = True  # reads its files from --data-root
    model_methods: tuple[str, ...] = ("generate",)  # what the model must offer
    text_only_zero_shot: bool = True  # 0-shot queries follow text-only demos (OpenFlamingo's trick)
    supports_rices: bool = True  # demos can be retrieved by image similarity (--rices)

    def check(self) -> None:
        """Fail before any model call when something the task needs later is missing (e.g. Java)."""

    def load(self, data_root: Path | None = None, seed: int = 0) -> TaskData:
        raise NotImplementedError

    def with_prompt_style(self, style: str) -> EvalTask:
        """This task asked in prompt style `style` ("flamingo" or "chat"); tasks with one fixed prompt format
        (the chat tasks) return themselves."""
        return self

    def zero_shot_demos(self, configured: int) -> int:
        """How many (text-only) demos precede a 0-shot query."""
        return configured if self.text_only_zero_shot else 0

    def build_inputs(self, model, query: Sample, demos: list[Sample], text_only: bool) -> tuple[str, list]:
        """(prompt, images in order: paths or PIL images) for one test sample and its demonstrations."""
        raise NotImplementedError

    def infer(self, model, prompts: list[str], images: list[list], data: TaskData, cfg) -> list[dict]:
        """One record per prompt (at least "prediction") from one batched model call."""
        raise NotImplementedError

    def score(self, data: TaskData, test: list[Sample], records: list[dict], cfg) -> tuple[dict, list, list]:
        """(metrics x100, notes, records with per-sample fields added) for one trial."""
        raise NotImplementedError

    def fingerprint(self, cfg) -> dict:
        """Everything besides the prompts' inputs that decides the records (resumed shards must match it)."""
        return {"task_type": type(self).__name__}

    def describe_subset(self, n: int, total: int, limit: int | None, seed: int) -> str:
        """How the `n` scored test samples were chosen out of `total`."""
        return f"all {total} test samples" if n >= total else f"the first {n} of {total} test samples"

    def blind_baseline(self, model, test: list[Sample], data: TaskData, cfg) -> dict | None:
        """Metrics of the same model asked without any media (None: the task has no blind baseline)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


LAYOUT_HELP = "`python -m pydoc lmm.eval.tasks`"


def load_image(path: str):
    """Open an image as RGB, with an error naming the file when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise TaskDataError(
            f"image not found: {path} (the annotation file names it; check --data-root and "
            f"the image folder layout: {LAYOUT_HELP})"
        ) from None
    except UnidentifiedImageError as e:
        raise TaskDataError(f"cannot read image {path}: {e}") from e
