"""Every few-shot prompt template of the benchmark, in one place.

Each template is one demonstration written out in full (the Flamingo / OpenFlamingo formats). The
text before `{answer}` is the query prompt the model continues; a demonstration is the whole
template filled in. A few-shot prompt is the demonstrations concatenated, then the query:

    <image>Output:A dog on a couch.<|endofchunk|><image>Output:

Zero-shot follows OpenFlamingo: two demonstrations are still drawn, but their `<image>` tokens are
removed (text-only demonstrations), so the model sees the format without any other image.

Chat tasks (easy-vqa, held-out conversation sets) are not here: their models are instruction-tuned,
and their prompt is the model's own chat format (see `lmm.eval.conversation`).

Prompt style `chat` (`lmm eval --prompt-style chat`) asks the same benchmarks the way `model.chat` does: each
query is a user turn (`<image>` + newline + the task's chat question), demonstrations are earlier user /
assistant turns, and the conversation is rendered by `model.render_chat` (the model's chat template and system
prompt). `CHAT_QUESTIONS` holds the user text per template; `chat_messages` builds the turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmm.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

ANSWER_SLOT = "{answer}"


@dataclass(frozen=True)
class PromptTemplate:
    """One demonstration with `{answer}` (and optionally `{question}`) placeholders."""

    text: str

    def __post_init__(self):
        if ANSWER_SLOT not in self.text or not self.text.endswith(ANSWER_SLOT + END_OF_CHUNK_TOKEN):
            raise ValueError(f"a prompt template must end with '{ANSWER_SLOT}{END_OF_CHUNK_TOKEN}': {self.text!r}")
        if IMAGE_TOKEN not in self.text:
            raise ValueError(f"a prompt template needs an {IMAGE_TOKEN} token: {self.text!r}")

    def demo(self, answer: str, question: str = "") -> str:
        return self.query(question) + answer + END_OF_CHUNK_TOKEN

    def query(self, question: str = "") -> str:
        prefix = self.text[: self.text.index(ANSWER_SLOT)]
        return prefix.replace("{question}", question)


CAPTION = PromptTemplate(f"{IMAGE_TOKEN}Output:{{answer}}{END_OF_CHUNK_TOKEN}")
VQA = PromptTemplate(f"{IMAGE_TOKEN}Question:{{question}} Short answer:{{answer}}{END_OF_CHUNK_TOKEN}")
HATEFUL_MEMES = PromptTemplate(
    f"{IMAGE_TOKEN}is an image with: '{{question}}' written on it. Is it hateful? Answer:{{answer}}{END_OF_CHUNK_TOKEN}"
)
CLASSIFICATION = PromptTemplate(f"{IMAGE_TOKEN}A photo of a {{answer}}{END_OF_CHUNK_TOKEN}")

PROMPT_STYLES = ("flamingo", "chat")

# Prompt style `chat`: the user turn's text per task kind ({question}: the sample's question / meme text).
CHAT_QUESTIONS = {
    "caption": "Describe the image in one short sentence.",
    "vqa": "{question}",
    "hateful_memes": "The image has '{question}' written on it. Is it hateful? Answer yes or no.",
    "classification": "What is in this image? Answer with its name.",
}

# HatefulMemes answers, by label (0 = not hateful, 1 = hateful).
HATEFUL_MEMES_CLASSES = ("no", "yes")

# Generation settings per kind of task (OpenFlamingo's defaults; beams to 1 for a cheaper CPU run).
GENERATION = {
    "caption": {"max_new_tokens": 20},
    "vqa": {"max_new_tokens": 5},
}

# Zero-shot: how many text-only demonstrations precede the query (OpenFlamingo uses 2; 0 disables).
ZERO_SHOT_TEXT_DEMOS = 2


def build_prompt(
    template: PromptTemplate, demos: list[tuple[str, str]], query_question: str = "", text_only_demos: bool = False
) -> str:
    """Concatenate demonstrations (answer, question) and the query; strip demo images if text-only."""
    context = "".join(template.demo(answer=a, question=q) for a, q in demos)
    if text_only_demos:
        context = context.replace(IMAGE_TOKEN, "")
    return context + template.query(query_question)


def chat_messages(
    question: str, demos: list[tuple[str, str]], query_question: str = "", text_only_demos: bool = False
) -> list[dict]:
    """Prompt style `chat`: demonstrations (answer, question) as solved user / assistant turns, then the query as
    the last user turn; `question` is the task's chat question (`CHAT_QUESTIONS`). Every user turn starts with
    `<image>` and a newline (LLaVA's layout, as easy-vqa's conversations), except text-only demonstrations."""
    messages: list[dict] = []
    for answer, q in demos:
        media = "" if text_only_demos else IMAGE_TOKEN + "\n"
        messages += [
            {"role": "user", "content": media + question.replace("{question}", q)},
            {"role": "assistant", "content": answer},
        ]
    return messages + [{"role": "user", "content": IMAGE_TOKEN + "\n" + question.replace("{question}", query_question)}]


def chat_answer_suffix(model) -> str:
    """The text the model's chat template writes after an assistant answer (e.g. "<|im_end|>\n"): prompt style
    `chat` appends it to every ranking candidate, so that a class name that is a prefix of another cannot win by
    stopping early."""
    from lmm.chat import render_messages

    marker = "\x00ANSWER\x00"
    text, _ = render_messages(
        model.tokenizer,
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
        add_generation_prompt=False,
        system_prompt=getattr(model.config, "system_prompt", None),
    )
    suffix = text.split(marker, 1)[1] if marker in text else ""
    return suffix.rstrip("\n") or (getattr(model.tokenizer, "eos_token", None) or "")


def postprocess_caption(text: str) -> str:
    """Cut a generated caption at a following "Output" prompt word (OpenFlamingo's rule)."""
    return text.split("Output", 1)[0].replace(END_OF_CHUNK_TOKEN, "").strip()


def postprocess_vqa(text: str) -> str:
    """Cut a generated answer at a following "Question"/"Answer"/"Short" prompt word, then at the
    first ", " (OpenFlamingo's rule); the VQA scorer normalises the rest."""
    text = re.split("Question|Answer|Short", text.replace(END_OF_CHUNK_TOKEN, ""), maxsplit=1)[0]
    return re.split(", ", text, maxsplit=1)[0].strip()


def ranking_inputs(prompt: str, classes) -> tuple[str, list[str]]:
    """(prompt, candidates) for log-likelihood ranking. A space that ends the prompt ("A photo of a ")
    moves to the front of each candidate (" red ball"), so the class name is tokenised as it would be
    inside running text; every candidate ends with the end-of-chunk token, so a class name that is a
    prefix of another ("dog" / "dog sled") cannot win by stopping early."""
    stripped = prompt.rstrip(" ")
    lead = prompt[len(stripped) :]
    return stripped, [lead + c + END_OF_CHUNK_TOKEN for c in classes]
