"""Few-shot (in-context) prompting from scripts, OpenFlamingo style.

    from lmm.fewshot import build_fewshot_prompt, fewshot_generate, fewshot_classify
    demos = [(cat_img, "Output: a cat."), (dog_img, "Output: a dog.")]
    prompt, images = build_fewshot_prompt(demos, "Output:", query_image=query_img)
    # "<image>Output: a cat.<|endofchunk|><image>Output: a dog.<|endofchunk|><image>Output:"
    model.generate(prompt, images=images, max_new_tokens=10)

Each demonstration is the template filled with its text (its image where the template writes `<image>`); the
query is the template's part before `{text}` followed by the query text, left open for the model to continue.
A demo's or the query's media may be a video or an audio clip too (`lmm.inputs.Video(path)` / `Audio(path)`):
its marker becomes `<video>` / `<audio>`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lmm.inputs import VIDEO_MARKER, Audio, Video
from lmm.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

DEFAULT_TEMPLATE = IMAGE_TOKEN + "{text}" + END_OF_CHUNK_TOKEN

Demo = tuple[Any, str]  # (PIL image, file path or None for a text-only demo; text)


def _split_template(template: str) -> tuple[str, str]:
    if template.count("{text}") != 1:
        raise ValueError(f"a few-shot template needs exactly one '{{text}}' placeholder, got {template!r}")
    prefix, suffix = template.split("{text}")
    if (prefix + suffix).count(IMAGE_TOKEN) > 1:
        raise ValueError(
            f"a few-shot template may hold at most one {IMAGE_TOKEN} (one image per example), got {template!r}"
        )
    return prefix, suffix


def _with_image(piece: str, image, images: list) -> str:
    if image is None:
        return piece.replace(IMAGE_TOKEN, "")
    if IMAGE_TOKEN not in piece:
        raise ValueError(
            f"an example has an image but the template has no {IMAGE_TOKEN} marker; "
            f"add {IMAGE_TOKEN} to the template or pass image=None"
        )
    images.append(image)
    if isinstance(image, (Video, Audio)):  # the same slot, the clip's own marker
        return piece.replace(IMAGE_TOKEN, VIDEO_MARKER if isinstance(image, Video) else "<audio>")
    return piece


def build_fewshot_prompt(
    demos: Sequence[Demo], query_text: str, template: str = DEFAULT_TEMPLATE, query_image=None
) -> tuple[str, list]:
    """(prompt, images) for `model.generate`: demos rendered with `template`, then the open query.

    A demo or query whose image is None is text-only (its `<image>` marker is dropped)."""
    prefix, suffix = _split_template(template)
    images: list = []
    parts = []
    for i, demo in enumerate(demos):
        if not (isinstance(demo, (tuple, list)) and len(demo) == 2 and isinstance(demo[1], str)):
            raise ValueError(f"demo {i} must be an (image, text) pair, got {demo!r:.80}")
        image, text = demo
        parts.append(_with_image(prefix + text + suffix, image, images))
    if IMAGE_TOKEN in prefix and query_image is not None:
        parts.append(_with_image(prefix + query_text, query_image, images))
    else:
        if query_image is not None:
            _with_image(prefix, query_image, images)  # raises: image without a marker
        parts.append(prefix.replace(IMAGE_TOKEN, "") + query_text)
    return "".join(parts), images


def sample_demos(pool: Sequence[Demo], k: int, seed: int = 0) -> list[Demo]:
    """k demos drawn without replacement from `pool`; the same seed always gives the same demos."""
    if k > len(pool):
        raise ValueError(f"asked for {k} demos but the pool holds only {len(pool)}")
    return random.Random(seed).sample(list(pool), k)


def build_fewshot_batch(
    demos: Sequence[Demo] | Sequence[Sequence[Demo]],
    queries: Sequence[tuple[Any, str]],
    template: str = DEFAULT_TEMPLATE,
) -> tuple[list[str], list[list]]:
    """(prompts, image lists) for a batch of (query_image, query_text) queries.

    `demos` is either one demo list shared by every query or one demo list per query (e.g. from RICES)."""
    per_query = bool(demos) and all(
        isinstance(d, (list, tuple)) and all(isinstance(x, (list, tuple)) for x in d) for d in demos
    )
    if per_query and len(demos) != len(queries):
        raise ValueError(
            f"{len(queries)} queries but {len(demos)} demo lists; give one list per query or one shared list"
        )
    prompts, images = [], []
    for i, (q_image, q_text) in enumerate(queries):
        p, ims = build_fewshot_prompt(demos[i] if per_query else demos, q_text, template, q_image)
        prompts.append(p)
        images.append(ims)
    return prompts, images


def fewshot_generate(
    model, demos, queries: Sequence[tuple[Any, str]], template: str = DEFAULT_TEMPLATE, **gen_kwargs
) -> list[str]:
    """Answers to every query in one batched `model.generate` call (stops at `<|endofchunk|>` by default)."""
    prompts, images = build_fewshot_batch(demos, queries, template)
    return model.generate(prompts, images=images, **gen_kwargs)


def fewshot_classify(
    model,
    demos,
    queries: Sequence[tuple[Any, str]],
    classes: Sequence[str],
    template: str = DEFAULT_TEMPLATE,
    batch_size: int = 16,
):
    """Pick each query's class by log-likelihood (`model.score`): returns (labels, scores (N, K) tensor).

    Each class string is scored as the continuation of the query prompt (write it with its leading space,
    e.g. " cat", if the template's text reads "Output: cat")."""
    if not classes:
        raise ValueError("give at least one class")
    prompts, images = build_fewshot_batch(demos, queries, template)
    scores = model.score(prompts, images, list(classes), batch_size=batch_size)
    return [classes[i] for i in scores.argmax(-1).tolist()], scores
