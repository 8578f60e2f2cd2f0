"""The few-shot benchmarks of the Flamingo / OpenFlamingo protocol as tasks: a prompt template per task
(`lmm.eval.prompts`), generation (captioning, VQA) or log-likelihood ranking (HatefulMemes, classification),
and the reference metrics (`lmm.eval.metrics`). Their files are read by the loaders of `lmm.eval.tasks`.

Each task has two prompt styles (`with_prompt_style`): `flamingo` (the completion templates) and `chat` (the
model's chat template and system prompt, as `model.chat` renders a conversation; demos are earlier turns).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from . import metrics, prompts
from .task import EvalConfigError, EvalTask, Sample, TaskData
from .tasks import (
    load_coco,
    load_flickr30k,
    load_hatefulmemes,
    load_imagenet,
    load_okvqa,
    load_textvqa,
    load_vizwiz,
    load_vqav2,
)

SCORE_CHUNK = 128  # candidates scored per model call (classification over many classes)


class TemplateTask(EvalTask):
    """A task whose prompt is demonstrations filled into a Flamingo template, then the open query."""

    prompt_style = "flamingo"

    def __init__(
        self,
        name: str,
        template: prompts.PromptTemplate,
        loader: Callable[[Path], TaskData],
        primary_metric: str,
        chat_question: str = "{question}",
    ):
        self.name, self.template, self.loader, self.primary_metric = name, template, loader, primary_metric
        self.chat_question = chat_question  # prompt style `chat`: the user turn's text

    def with_prompt_style(self, style: str) -> TemplateTask:
        """This task asked in `style` (prompts.PROMPT_STYLES): a copy when the style differs. Style `chat`
        renders through `model.render_chat` and draws no text-only demonstrations at zero shots."""
        if style not in prompts.PROMPT_STYLES:
            raise EvalConfigError(f"prompt style must be one of {', '.join(prompts.PROMPT_STYLES)}, got {style!r}")
        if style == self.prompt_style:
            return self
        task = copy.copy(self)
        task.prompt_style = style
        task.text_only_zero_shot = style == "flamingo"
        base = tuple(m for m in type(self).model_methods if m != "render_chat")
        task.model_methods = base + (("render_chat",) if style == "chat" else ())
        return task

    def load(self, data_root: Path | None = None, seed: int = 0) -> TaskData:
        if data_root is None:
            raise EvalConfigError(
                f"{self.name} reads its files from --data-root; pass --data-root PATH "
                f"(layout: `python -m pydoc lmm.eval.tasks`)"
            )
        root = Path(data_root)
        if not root.is_dir():
            raise EvalConfigError(f"--data-root {root} is not a folder")
        return self.loader(root)

    def build_inputs(self, model, query: Sample, demos: list[Sample], text_only: bool) -> tuple[str, list]:
        pairs = [(d.target, d.question) for d in demos]
        images = ([] if text_only else [d.image for d in demos]) + [query.image]
        if self.prompt_style == "chat":
            messages = prompts.chat_messages(self.chat_question, pairs, query.question, text_only_demos=text_only)
            prompt, part_images = model.render_chat(messages)  # markers in string contents: no part images
            return prompt, list(part_images) + images
        prompt = prompts.build_prompt(self.template, pairs, query.question, text_only_demos=text_only)
        return prompt, images

    def fingerprint(self, cfg) -> dict:
        out = {"task_type": type(self).__name__, "template": self.template.text}
        if self.prompt_style != "flamingo":
            out.update(prompt_style=self.prompt_style, chat_question=self.chat_question)
        return out


class GenerationTask(TemplateTask):
    """Answers are generated (OpenFlamingo's beams and lengths) and cut by the task's post-processing rule."""

    kind = ""  # key into prompts.GENERATION

    def generation(self, cfg) -> dict:
        base = dict(prompts.GENERATION[self.kind], num_beams=cfg.num_beams)
        if self.prompt_style == "chat":  # as model.chat: stop at the end of turn, the template wrote BOS
            base.update(stop_at_end_of_chunk=False, add_special_tokens=False)
        if cfg.max_new_tokens is not None:
            base["max_new_tokens"] = cfg.max_new_tokens
        return base

    def postprocess(self, text: str) -> str:
        raise NotImplementedError

    def infer(self, model, prompts_: list[str], images: list[list], data: TaskData, cfg) -> list[dict]:
        outs = model.generate(prompts_, images, **self.generation(cfg))
        if len(outs) != len(prompts_):
            raise RuntimeError(f"model.generate returned {len(outs)} texts for {len(prompts_)} prompts")
        clean = (lambda o: o.strip()) if self.prompt_style == "chat" else self.postprocess
        return [{"prediction": clean(o), "raw": o} for o in outs]

    def fingerprint(self, cfg) -> dict:
        return dict(super().fingerprint(cfg), generation=self.generation(cfg))


class CaptionTask(GenerationTask):
    """COCO / Flickr30k captioning: CIDEr, BLEU-4, METEOR (pycocoevalcap, Java)."""

    kind = "caption"

    def check(self) -> None:
        metrics.require_java()  # fail before hours of generation, not after

    def postprocess(self, text: str) -> str:
        return prompts.postprocess_caption(text)

    def score(self, data, test, records, cfg):
        by_id = {s.id: s for s in test}
        m = metrics.caption_metrics(
            {r["id"]: r["prediction"] for r in records},
            {r["id"]: list(by_id[r["id"]].answers) for r in records},
            meteor=cfg.meteor,
        )
        out = {k: (None if m[k] is None else 100.0 * m[k]) for k in ("cider", "bleu4", "meteor")}
        for r in records:
            r["references"] = list(by_id[r["id"]].answers)
            r["cider"] = m["per_sample_cider"][r["id"]]
        return out, list(m["notes"]), records


class VQATask(GenerationTask):
    """VQAv2-style open answers: the official VQA accuracy."""

    kind = "vqa"

    def postprocess(self, text: str) -> str:
        return prompts.postprocess_vqa(text)

    def score(self, data, test, records, cfg):
        by_id = {s.id: s for s in test}
        m = metrics.vqa_metrics(
            {r["id"]: r["prediction"] for r in records}, {r["id"]: by_id[r["id"]].answers for r in records}
        )
        for r in records:
            r["answers"] = list(by_id[r["id"]].answers)
            r["vqa_accuracy"] = m["per_sample"][r["id"]]
        return {"vqa_accuracy": 100.0 * m["vqa_accuracy"]}, [], records


class RankingTask(TemplateTask):
    """The answer is the class whose text (the template filled in) the model finds likeliest."""

    model_methods = ("score",)

    def infer(self, model, prompts_: list[str], images: list[list], data: TaskData, cfg) -> list[dict]:
        if self.prompt_style == "chat":  # the answer is the assistant turn: class name + end of turn
            suffix = prompts.chat_answer_suffix(model)
            texts, candidates = list(prompts_), [c + suffix for c in data.classes]
        else:
            ranked = [prompts.ranking_inputs(t, data.classes) for t in prompts_]
            texts, candidates = [p for p, _ in ranked], ranked[0][1]
            if any(c != candidates for _, c in ranked):
                raise ValueError("ranking prompts of one batch must end alike (the template's text before {answer})")
        cols = [
            torch.as_tensor(model.score(texts, images, candidates[i : i + SCORE_CHUNK])).float().cpu()
            for i in range(0, len(candidates), SCORE_CHUNK)
        ]
        scores = torch.cat(cols, dim=1)
        if tuple(scores.shape) != (len(texts), len(candidates)):
            raise RuntimeError(
                f"model.score returned shape {tuple(scores.shape)}, expected {(len(texts), len(candidates))}"
            )
        return [self.record(row, data) for row in scores]

    def record(self, row: torch.Tensor, data: TaskData) -> dict:
        raise NotImplementedError


class HatefulMemesTask(RankingTask):
    """HatefulMemes: ROC-AUC of p("yes") from the two answers' log-likelihoods, and accuracy."""

    def record(self, row, data):
        return {"logprobs": row.tolist(), "prediction": data.classes[int(row.argmax())]}

    def score(self, data, test, records, cfg):
        by_id = {s.id: s for s in test}
        labels = [by_id[r["id"]].label for r in records]
        p_yes = [float(torch.softmax(torch.tensor(r["logprobs"]), 0)[1]) for r in records]
        m = metrics.roc_auc(labels, p_yes)
        for r, y, p in zip(records, labels, p_yes):
            r["label"], r["p_hateful"] = y, p
        acc = sum(int(r["prediction"] == data.classes[y]) for r, y in zip(records, labels)) / len(records)
        return (
            {"roc_auc": None if m["roc_auc"] is None else 100.0 * m["roc_auc"], "accuracy": 100.0 * acc},
            list(m["notes"]),
            records,
        )


class ClassificationTask(RankingTask):
    """ImageNet-style classification over the class names: top-1 / top-5 accuracy."""

    def record(self, row, data):
        top = torch.sort(-row, stable=True).indices[:5].tolist()
        return {"top5": top, "top5_logprobs": [float(row[i]) for i in top], "prediction": data.classes[top[0]]}

    def score(self, data, test, records, cfg):
        by_id = {s.id: s for s in test}
        labels = [by_id[r["id"]].label for r in records]
        m = metrics.topk_accuracy(labels, [r["top5"] for r in records])
        for r, y in zip(records, labels):
            r["label"] = data.classes[y]
        return {k: 100.0 * v for k, v in m.items()}, [], records


BENCHMARKS: tuple[EvalTask, ...] = (
    CaptionTask("coco", prompts.CAPTION, load_coco, "cider", prompts.CHAT_QUESTIONS["caption"]),
    CaptionTask("flickr30k", prompts.CAPTION, load_flickr30k, "cider", prompts.CHAT_QUESTIONS["caption"]),
    VQATask("vqav2", prompts.VQA, load_vqav2, "vqa_accuracy", prompts.CHAT_QUESTIONS["vqa"]),
    VQATask("okvqa", prompts.VQA, load_okvqa, "vqa_accuracy", prompts.CHAT_QUESTIONS["vqa"]),
    VQATask("textvqa", prompts.VQA, load_textvqa, "vqa_accuracy", prompts.CHAT_QUESTIONS["vqa"]),
    VQATask("vizwiz", prompts.VQA, load_vizwiz, "vqa_accuracy", prompts.CHAT_QUESTIONS["vqa"]),
    HatefulMemesTask(
        "hatefulmemes", prompts.HATEFUL_MEMES, load_hatefulmemes, "roc_auc", prompts.CHAT_QUESTIONS["hateful_memes"]
    ),
    ClassificationTask(
        "imagenet", prompts.CLASSIFICATION, load_imagenet, "top1_accuracy", prompts.CHAT_QUESTIONS["classification"]
    ),
)
