"""Conversation tasks: questions asked the way an instruction-tuned model is used, scored by exact match or by
choice over a closed answer set, with a blind baseline (the same model, no media).

A sample is a conversation whose final assistant turn is the reference answer. The prompt is the turns before
it (plus any demonstrations as solved turns), rendered by `model.render_chat`: the model's chat template and
default system prompt, exactly what `model.chat` feeds `model.generate`. Answers are generated greedily and
compared after `metrics.normalize_exact` (metric `exact_match`), or picked as the likeliest of the candidates
(metric `choice`). `ConversationTask.from_file` reads held-out sets in the training format (LLaVA-style JSON).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import torch

from lmm.tokens import IMAGE_TOKEN

from .metrics import exact_match_accuracy, normalize_exact
from .task import EvalConfigError, EvalTask, Sample, TaskData, TaskDataError

METRICS = ("exact_match", "choice")
# How an answer is generated: greedy, short, stopping at the chat template's end-of-turn / EOS (as model.chat).
GENERATION = {"max_new_tokens": 8, "num_beams": 1, "stop_at_end_of_chunk": False, "add_special_tokens": False}
SCORE_CHUNK = 128  # candidates per model.score call
SCORE_BATCH = 128  # rows per forward when scoring the blind prompts (they carry no images)


MARKERS = (IMAGE_TOKEN, "<video>", "<audio>")


def without_media(messages) -> list[dict]:
    """The same turns with every media marker (`<image>`, `<video>`, `<audio>`, and the newline LLaVA data
    writes after it) removed."""
    out = []
    for m in messages:
        content = m["content"]
        for marker in MARKERS:
            content = content.replace(marker + "\n", "").replace(marker, "")
        out.append(dict(m, content=content))
    return out


class ConversationTask(EvalTask):
    """Chat-formatted question answering over conversation samples (see the module docstring).

    loader: () -> TaskData (test samples with `messages`, `media` and `target`; `classes` = the closed answer
    set, if the data has one). candidates: the closed answer set for `choice` and the blind choice baseline
    (default: the data's classes; for `choice` without either, every distinct answer of the set)."""

    primary_metric = "accuracy"
    needs_data_root = False
    text_only_zero_shot = False  # a chat model gets no text-only demonstrations

    def __init__(
        self,
        name: str,
        loader: Callable[[], TaskData],
        metric: str = "exact_match",
        candidates: list[str] | None = None,
    ):
        if metric not in METRICS:
            raise EvalConfigError(f"{name}: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        self.name, self.loader, self.metric = name, loader, metric
        self.candidates = list(candidates) if candidates else None
        self.model_methods = ("render_chat", "generate") if metric == "exact_match" else ("render_chat", "score")

    @classmethod
    def from_file(
        cls,
        path: str,
        name: str | None = None,
        metric: str = "exact_match",
        candidates: list[str] | None = None,
        image_root: str | None = None,
    ) -> ConversationTask:
        """A task over a conversation file (LLaVA-style JSON/JSONL, parquet ... anything `format: conversation`
        reads); the final assistant turn of each conversation is its reference answer."""
        return cls(name or Path(path).stem, lambda: read_conversation_file(path, image_root), metric, candidates)

    # ------------------------------------------------------------------ data

    def load(self, data_root: Path | None = None, seed: int = 0) -> TaskData:
        data = self.loader()
        if self.candidates:
            data.classes = tuple(self.candidates)
        elif self.metric == "choice" and not data.classes:
            data.classes = tuple(dict.fromkeys(s.target for s in data.test))
        if self.metric == "choice":
            missing = sorted({s.target for s in data.test} - set(data.classes))
            if missing:
                raise TaskDataError(
                    f"{self.name}: answers outside the candidate set: {missing[:5]}; add them to "
                    f"the candidates or use metric exact_match"
                )
        random.Random(seed).shuffle(data.test)  # a limit of N then takes a seeded random subset
        return data

    def describe_subset(self, n: int, total: int, limit: int | None, seed: int) -> str:
        if n >= total:
            return f"all {total:,} test questions"
        return f"{n} test questions: the first {n} after shuffling with random.Random({seed})"

    # ------------------------------------------------------------------ asking the model

    def messages(self, query: Sample, demos: list[Sample]) -> tuple[list[dict], list]:
        """The conversation to render (demos as solved turns, then the query) and its media in order."""
        messages, media = [], []
        for d in demos:
            messages += [*d.messages, {"role": "assistant", "content": d.target}]
            media += list(d.media)
        return messages + list(query.messages), media + list(query.media)

    def build_inputs(self, model, query: Sample, demos: list[Sample], text_only: bool) -> tuple[str, list]:
        messages, media = self.messages(query, demos)
        prompt, part_images = model.render_chat(messages)  # markers in string contents: no part images
        return prompt, list(part_images) + [_image(m) for m in media]

    def generation(self, cfg) -> dict:
        base = dict(GENERATION)
        if getattr(cfg, "max_new_tokens", None) is not None:
            base["max_new_tokens"] = cfg.max_new_tokens
        return base

    def infer(self, model, prompts: list[str], images: list[list], data: TaskData, cfg) -> list[dict]:
        if self.metric == "exact_match":
            outs = model.generate(prompts, images, **self.generation(cfg))
            if len(outs) != len(prompts):
                raise RuntimeError(f"model.generate returned {len(outs)} texts for {len(prompts)} prompts")
            return [{"prediction": o.strip(), "raw": o} for o in outs]
        scores = _score(model, prompts, images, list(data.classes))
        return [{"prediction": data.classes[int(row.argmax())], "logprobs": row.tolist()} for row in scores]

    def fingerprint(self, cfg) -> dict:
        out = {"task_type": type(self).__name__, "metric": self.metric, "shuffle_seed": cfg.seed}
        if self.metric == "exact_match":
            out["generation"] = self.generation(cfg)
        else:
            out["candidates"] = self.candidates
        return out

    # ------------------------------------------------------------------ scoring

    def score(self, data: TaskData, test: list[Sample], records: list[dict], cfg):
        by_id = {s.id: s for s in test}
        answers = [by_id[r["id"]].target for r in records]
        if self.metric == "exact_match":
            m = exact_match_accuracy([r["prediction"] for r in records], answers)
            for r, a in zip(records, answers):
                r["answer"], r["correct"] = a, normalize_exact(r["prediction"]) == normalize_exact(a)
            return {"accuracy": 100.0 * m["accuracy"], "correct": m["correct"]}, [], records
        correct = 0
        for r, a in zip(records, answers):
            r["answer"], r["correct"] = a, r["prediction"] == a
            correct += r["correct"]
        return {"accuracy": 100.0 * correct / len(records), "correct": correct}, [], records

    def blind_baseline(self, model, test: list[Sample], data: TaskData, cfg) -> dict:
        """The same questions without their media: {"accuracy": this task's metric, and for exact match with a
        closed answer set also "choice_accuracy": the likeliest candidate}. Each distinct prompt is asked once
        (without media a greedy answer depends on the text alone)."""
        prompts = [model.render_chat(without_media(s.messages))[0] for s in test]
        distinct = sorted(set(prompts))
        out: dict = {}
        if self.metric == "exact_match":
            answers: dict[str, str] = {}
            for i in range(0, len(distinct), cfg.batch_size):
                chunk = distinct[i : i + cfg.batch_size]
                answers.update(zip(chunk, model.generate(chunk, [[] for _ in chunk], **self.generation(cfg))))
            correct = sum(normalize_exact(answers[p]) == normalize_exact(s.target) for p, s in zip(prompts, test))
            out["accuracy"] = 100.0 * correct / len(test)
        if data.classes:
            classes = list(data.classes)
            scores = _score(model, distinct, [[] for _ in distinct], classes, SCORE_BATCH)
            pick = {p: classes[int(i)] for p, i in zip(distinct, scores.argmax(1))}
            acc = 100.0 * sum(pick[p] == s.target for p, s in zip(prompts, test)) / len(test)
            out["accuracy" if self.metric == "choice" else "choice_accuracy"] = acc
            out["candidates"] = len(classes)
        return out


def _score(model, prompts: list[str], images: list[list], candidates: list[str], batch_size: int | None = None):
    kw = {} if batch_size is None else {"batch_size": batch_size}
    cols = [
        torch.as_tensor(model.score(prompts, images, candidates[i : i + SCORE_CHUNK], **kw)).float().cpu()
        for i in range(0, len(candidates), SCORE_CHUNK)
    ]
    scores = torch.cat(cols, dim=1)
    if tuple(scores.shape) != (len(prompts), len(candidates)):
        raise RuntimeError(
            f"model.score returned shape {tuple(scores.shape)}, expected {(len(prompts), len(candidates))}"
        )
    return scores


def _image(value):
    """A path stays a path (the harness opens it), a video or audio clip stays wrapped (`model.generate` decodes
    it at its marker); other media values (bytes, HF dicts) are decoded here as images."""
    from lmm.inputs import Audio, Video

    if isinstance(value, (str, Audio, Video)):
        return value
    from lmm.data.media import decode_image

    return decode_image(value)


def _wrapped(ref):
    """A conversation's media value as `model.generate` takes it in a mixed list: images as they are, videos and
    audio clips in their `lmm.inputs` wrapper."""
    from lmm.inputs import Audio, Video

    return {"video": Video, "audio": Audio}.get(ref.kind, lambda v: v)(ref.value)


def read_conversation_file(path: str, image_root: str | None = None) -> TaskData:
    """Every conversation of a file as a test sample: the turns before the final assistant turn are the question,
    that turn is the answer; a sample's id is its record's position in the file. Unusable records (no final
    answer, image count mismatch ...) are skipped; a TaskDataError with their counts when nothing is left."""
    from lmm.data.errors import DataError
    from lmm.data.ordered import read_samples

    samples, skipped = [], {}
    try:
        for index, (_, sample, bad) in enumerate(read_samples(path, "conversation", image_root=image_root)):
            if bad is None:
                turns = sample.messages
                if len(turns) >= 2 and turns[-1]["role"] == "assistant" and turns[-2]["role"] == "user":
                    media = tuple(_wrapped(m) for m in sample.media)  # paths come resolved against image_root
                    samples.append(
                        Sample(
                            id=str(index),
                            image=media[0] if media and isinstance(media[0], str) else "",
                            question=turns[-2]["content"],
                            answers=(turns[-1]["content"],),
                            target=turns[-1]["content"],
                            messages=tuple(turns[:-1]),
                            media=media,
                        )
                    )
                    continue
                bad = "no_final_answer"
            skipped[bad] = skipped.get(bad, 0) + 1
    except DataError as e:
        raise TaskDataError(f"{path}: {e}") from None
    if not samples:
        raise TaskDataError(
            f"{path}: no usable conversation (a user turn followed by a final assistant answer); "
            f"skipped: {skipped or 'no records'}"
        )
    return TaskData(train=[], test=samples, files=[str(path)])
