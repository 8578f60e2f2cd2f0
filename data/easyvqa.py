"""The embedded demo data: easy-vqa (pip package `easy-vqa`, 64x64 PNG shapes, 13 answers).

Three views of the same images, all plain records that the normal parsers read:
  vqa      one LLaVA-style conversation per question: "<image>\\n{question}" -> "{answer}"
  caption  one pair per image, caption derived from its questions: "a blue circle"
  fewshot  OBELICS-style interleaved documents: `shots` solved questions, then the query
`prepare(DIR)` (the data preparer "easyvqa": `lmm data prepare easyvqa --out DIR`, or `prepare: easyvqa` on a
dataset entry) writes the vqa and caption views as ordinary JSON files that `format: conversation` / `pair`
read; the images stay the PNGs the package ships.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("green", "red", "gray", "teal", "black", "yellow", "brown", "blue")
SPLITS = ("train", "test")


def _load(split: str):
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the easy-vqa demo data needs `pip install easy-vqa` (or `pip install lmm[demo]`)") from None
    if split not in SPLITS:
        raise ValueError(f"easy-vqa split must be one of {SPLITS}, got {split!r}")
    questions, answers, image_ids = (
        easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions()
    )
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    return questions, answers, image_ids, paths


def easyvqa_samples(split: str = "train") -> Iterator[dict]:
    """Every question of a split as {"key", "image" (PNG path), "question", "answer"}, in package order."""
    questions, answers, image_ids, paths = _load(split)
    for i, (q, a, img) in enumerate(zip(questions, answers, image_ids)):
        yield {"key": f"easyvqa-{split}-{i}", "image": paths[img], "question": q, "answer": a}


def answers() -> list[str]:
    """The 13 possible answers (for closed-vocabulary scoring)."""
    import easy_vqa

    return list(easy_vqa.get_answers())


def vqa_record(sample: dict) -> dict:
    """An easy-vqa sample as a LLaVA-style conversation record."""
    return {
        "id": sample["key"],
        "image": sample["image"],
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample['question']}"},
            {"from": "gpt", "value": sample["answer"]},
        ],
    }


def captions(split: str = "train") -> dict[str, str]:
    """image path -> "a {color} {shape}" from what its questions reveal (images revealing neither are left out)."""
    found: dict[str, dict] = {}
    for s in easyvqa_samples(split):
        info = found.setdefault(s["image"], {})
        q, a = s["question"], s["answer"]
        words = q.rstrip("?").split()
        if a in ("yes", "no"):  # "is no red shape present?" -> no: red is present
            negated = " not " in q or q.startswith("is no ")
            if (a == "yes") == negated:
                continue  # says what is absent
        else:
            words.append(a)  # "what color is the circle?" -> "red": a red circle
        for w in words:
            if w in SHAPES:
                info["shape"] = w
            elif w in COLORS:
                info["color"] = w
    out = {}
    for path, info in found.items():
        if info:
            out[path] = f"a {info.get('color', '')} {info.get('shape', 'shape')}".replace("  ", " ")
    return out


def easyvqa_records(split: str = "train", task: str = "vqa", shots: int = 4, seed: int = 0) -> list[dict]:
    """The records of one view (`vqa`, `caption` or `fewshot`) of a split; see the module docstring."""
    if task == "vqa":
        return [vqa_record(s) for s in easyvqa_samples(split)]
    if task == "caption":
        return [{"image": path, "caption": text} for path, text in sorted(captions(split).items())]
    if task == "fewshot":
        samples = list(easyvqa_samples(split))
        rng = np.random.default_rng(seed)
        records = []
        for i, query in enumerate(samples):
            picks = rng.choice(len(samples) - 1, size=shots, replace=False)
            shots_ = [samples[j + (j >= i)] for j in picks]  # never the query itself
            texts, images = [], []
            for s in shots_ + [query]:
                images += [s["image"], None]
                texts += [None, f"Question: {s['question']} Answer: {s['answer']}"]
            records.append({"texts": texts, "images": images})
        return records
    raise ValueError(f"easyvqa task must be vqa, caption or fewshot, got {task!r}")


def prepare(out_dir) -> list[str]:
    """Write {train,test}.json (the vqa view: LLaVA-style conversations, one per question, in package order) and
    {train,test}_caption.json (the caption view) into `out_dir`; returns the paths. Atomic per file."""
    import json
    import os

    written = []
    for split in SPLITS:
        for view, name in (("vqa", f"{split}.json"), ("caption", f"{split}_caption.json")):
            path = os.path.join(out_dir, name)
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(easyvqa_records(split, view), f)
            os.replace(tmp, path)
            written.append(path)
    return written
