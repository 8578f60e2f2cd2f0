"""Video and audio benchmarks as few-shot tasks: the image benchmarks' templates, asked with each sample's video
at a `<video>` marker (frames sampled as in training, `config.video_frames`) or its clip at the audio encoder's
marker (`<audio>`), demos from the train split, and the blind baseline (the same prompt without demos and media).

msrvtt_qa, msvd_qa  open-ended video QA: VQA's template, accuracy = exact match after the VQA answer normalisation
                    (`vqa_normalize.normalize_answer`) of prediction and answer (one answer per question)
clotho, audiocaps   audio captioning: COCO's template and metrics (CIDEr, BLEU-4, METEOR via pycocoevalcap)
esc50               audio classification: log-likelihood ranking of the 50 class names after CLAP's prompt
                    "This is a sound of"; accuracy (top-1) and top-5 accuracy

The files each task reads from `--data-root`: `python -m pydoc lmm.eval.video_qa` and `lmm.eval.audio_tasks`.
Both prompt styles work (`--prompt-style chat`: the media marker opens each user turn). RICES is not offered:
it retrieves demos by image features.
"""

from __future__ import annotations

from lmm.inputs import VIDEO_MARKER, Audio, Video
from lmm.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

from . import prompts
from .audio_tasks import load_audiocaps, load_clotho, load_esc50
from .benchmarks import CaptionTask, ClassificationTask, VQATask
from .task import EvalConfigError, Sample, TaskDataError
from .video_qa import load_msrvtt_qa, load_msvd_qa
from .vqa_normalize import normalize_answer

# CLAP's zero-shot prompt (Elizalde et al. 2022), as a Flamingo template
AUDIO_CLASSIFICATION = prompts.PromptTemplate(f"{IMAGE_TOKEN}This is a sound of {{answer}}{END_OF_CHUNK_TOKEN}")
CHAT_QUESTIONS = {
    "audio_caption": "Describe the sound in one short sentence.",
    "audio_classification": "What sound is this? Answer with its name.",
}


class MediaTask:
    """Mixin for a `TemplateTask` whose samples' `image` is a video (`media = "video"`) or audio file ("audio"):
    the template's `<image>` becomes this task's marker and each file goes in a `Video` / `Audio` wrapper."""

    media = "video"
    supports_rices = False

    def marker(self, model) -> str:
        if self.media == "video":
            return VIDEO_MARKER
        encoders = getattr(model, "encoders", None) or {}
        if "audio" not in encoders:
            raise EvalConfigError(
                f"{self.name} asks about audio clips but the model has no audio encoder (config encoders.audio); "
                f"evaluate a model trained with one"
            )
        return encoders["audio"].token

    def wrap(self, path: str):
        return Video(path) if self.media == "video" else Audio(path)

    def prompt(self, model, query: Sample, demos: list[Sample], text_only: bool, marker: str) -> str:
        """The prompt with `marker` where the media go; marker "" (the blind baseline) leaves them out."""
        pairs = [(d.target, d.question) for d in demos]
        if self.prompt_style == "chat":
            messages = prompts.chat_messages(self.chat_question, pairs, query.question, text_only_demos=text_only)
            old = IMAGE_TOKEN if marker else IMAGE_TOKEN + "\n"
            return model.render_chat([dict(m, content=m["content"].replace(old, marker)) for m in messages])[0]
        text = prompts.build_prompt(self.template, pairs, query.question, text_only_demos=text_only)
        return text.replace(IMAGE_TOKEN, marker)

    def build_inputs(self, model, query: Sample, demos: list[Sample], text_only: bool) -> tuple[str, list]:
        media = ([] if text_only else [d.image for d in demos]) + [query.image]
        return self.prompt(model, query, demos, text_only, self.marker(model)), [self.wrap(m) for m in media]

    def infer(self, model, prompts_: list[str], images: list[list], data, cfg) -> list[dict]:
        try:
            return super().infer(model, prompts_, images, data, cfg)
        except ValueError as e:  # a file that cannot be decoded (corrupt, empty, too long): say which one
            bad = first_bad_item(model, images)
            if bad is None:
                raise
            raise TaskDataError(f"{self.name}: cannot use {bad[0]}: {bad[1]} (replace or remove the file)") from e

    def fingerprint(self, cfg) -> dict:
        return dict(super().fingerprint(cfg), media=self.media)

    def blind_baseline(self, model, test: list[Sample], data, cfg) -> dict:
        """This task's metrics for the same model asked each query alone, without demos and without the media.
        Each distinct prompt is asked once (without media the answer depends on the text alone)."""
        texts = [self.prompt(model, s, [], False, "") for s in test]
        distinct = list(dict.fromkeys(texts))
        outs: dict[str, dict] = {}
        for i in range(0, len(distinct), cfg.batch_size):
            chunk = distinct[i : i + cfg.batch_size]
            outs.update(zip(chunk, self.infer(model, chunk, [[] for _ in chunk], data, cfg)))
        records = [dict(outs[t], id=s.id) for t, s in zip(texts, test)]
        return self.score(data, test, records, cfg)[0]


def first_bad_item(model, media_lists: list[list]) -> tuple[str, str] | None:
    """(file, why) of the first video / audio item that the model's input path cannot decode, else None."""
    from lmm.inputs import audio_items, video_frames

    for items in media_lists:
        for item in items:
            try:
                if isinstance(item, Video):
                    video_frames(model, item)
                elif isinstance(item, Audio):
                    audio_items(model, "audio", item)
            except ValueError as e:
                return str(item.value), str(e)
    return None


class VideoQATask(MediaTask, VQATask):
    """Open-ended video QA (one reference answer): accuracy of normalised exact match."""

    def score(self, data, test, records, cfg):
        by_id = {s.id: s for s in test}
        for r in records:
            r["answer"] = by_id[r["id"]].answers[0]
            r["correct"] = normalize_answer(r["prediction"]) == normalize_answer(r["answer"])
        correct = sum(r["correct"] for r in records)
        return {"accuracy": 100.0 * correct / len(records), "correct": correct}, [], records


class AudioCaptionTask(MediaTask, CaptionTask):
    """Audio captioning with COCO's metrics; the loader's notes (skipped clips) join the results' notes."""

    media = "audio"

    def score(self, data, test, records, cfg):
        metrics, notes, records = super().score(data, test, records, cfg)
        return metrics, list(notes) + list(getattr(data, "notes", [])), records


class AudioClassificationTask(MediaTask, ClassificationTask):
    """Audio classification over the class names: accuracy (top-1) and top-5 accuracy."""

    media = "audio"

    def score(self, data, test, records, cfg):
        metrics, notes, records = super().score(data, test, records, cfg)
        return {"accuracy": metrics.pop("top1_accuracy"), **metrics}, notes, records


MEDIA_TASKS = (
    VideoQATask("msrvtt_qa", prompts.VQA, load_msrvtt_qa, "accuracy", prompts.CHAT_QUESTIONS["vqa"]),
    VideoQATask("msvd_qa", prompts.VQA, load_msvd_qa, "accuracy", prompts.CHAT_QUESTIONS["vqa"]),
    AudioCaptionTask("clotho", prompts.CAPTION, load_clotho, "cider", CHAT_QUESTIONS["audio_caption"]),
    AudioCaptionTask("audiocaps", prompts.CAPTION, load_audiocaps, "cider", CHAT_QUESTIONS["audio_caption"]),
    AudioClassificationTask(
        "esc50", AUDIO_CLASSIFICATION, load_esc50, "accuracy", CHAT_QUESTIONS["audio_classification"]
    ),
)
