"""easy-vqa: the embedded demo benchmark, as a conversation task (exact-match accuracy of an instruction-tuned model).

The demo model is trained on LLaVA-style conversations ("<image>\\n{question}" -> "{answer}", written by the
data preparer `easyvqa`, see `lmm.data.easyvqa`), so it is asked the same way: one user turn with the image and
the question, rendered by the tokenizer's chat template through `LMM.render_chat`, exactly as `LMM.chat` does.
With shots > 0 the demonstrations are earlier user/assistant turns. The blind baseline asks the same questions
without the image, answering freely and picking the likeliest of the 13 answers.

`lmm eval --tasks easyvqa` and a training run with `eval.task: easyvqa` run this same task, so both report the
same number for the same model, `limit` and `seed`. Subset: the 9,673 test questions are shuffled with
`random.Random(seed)`; `limit=N` scores the first N of that order; no limit scores all of them.
"""

from __future__ import annotations

from lmm.tokens import IMAGE_TOKEN

from .conversation import ConversationTask
from .task import Sample, TaskData, TaskDataError


def load_easyvqa() -> TaskData:
    """The easy_vqa package's 38,575 train / 9,673 test questions over 64x64 PNGs (ids = question index)."""
    try:
        from lmm.data.easyvqa import answers, easyvqa_samples
    except ImportError as e:  # pragma: no cover - lmm.data is part of lmm
        raise TaskDataError(str(e)) from e
    try:
        splits = {
            split: [
                Sample(
                    id=str(i),
                    image=s["image"],
                    question=s["question"],
                    answers=(s["answer"],),
                    target=s["answer"],
                    messages=({"role": "user", "content": f"{IMAGE_TOKEN}\n{s['question']}"},),
                    media=(s["image"],),
                )
                for i, s in enumerate(easyvqa_samples(split))
            ]
            for split in ("train", "test")
        }
        classes = tuple(answers())
    except ImportError as e:
        raise TaskDataError(
            "easyvqa: the `easy-vqa` package is not installed; `pip install easy-vqa` (or `pip install lmm[demo]`)"
        ) from e
    return TaskData(train=splits["train"], test=splits["test"], classes=classes, files=["easy_vqa package data"])


EASYVQA = ConversationTask("easyvqa", load_easyvqa, metric="exact_match")
