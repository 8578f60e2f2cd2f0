"""Fixture files in each task's official format, with real PNG/JPEG images drawn by PIL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (150, 40, 180),
    "orange": (250, 140, 20),
    "gray": (128, 128, 128),
    "teal": (20, 160, 160),
}


def draw(path: Path, color: str, shape: str = "circle", size: int = 48) -> Path:
    """A real image file: a coloured shape on white (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    box = (8, 8, size - 8, size - 8)
    if shape == "circle":
        d.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        d.rectangle(box, fill=COLORS[color])
    else:
        d.polygon([(size // 2, 6), (6, size - 6), (size - 6, size - 6)], fill=COLORS[color])
    im.save(path)
    return path


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


CAPTION_SPLITS = [
    ("train", "red", "circle"),
    ("train", "green", "square"),
    ("restval", "blue", "triangle"),
    ("val", "gray", "circle"),
    ("test", "yellow", "circle"),
    ("test", "purple", "square"),
    ("test", "orange", "triangle"),
]


def write_coco(root: Path) -> None:
    images = []
    for i, (split, color, shape) in enumerate(CAPTION_SPLITS):
        folder = "val2014" if split in ("val", "test", "restval") else "train2014"
        name = f"COCO_{folder}_{i + 1:012d}.jpg"
        draw(root / "coco" / folder / name, color, shape)
        images.append(
            {
                "filepath": folder,
                "filename": name,
                "imgid": i,
                "split": split,
                "cocoid": i + 1,
                "sentids": [10 * i, 10 * i + 1],
                "sentences": [
                    {
                        "raw": f"A {color} {shape} on a white background.",
                        "imgid": i,
                        "sentid": 10 * i,
                        "tokens": ["a", color, shape],
                    },
                    {"raw": f"a {shape} that is {color}", "imgid": i, "sentid": 10 * i + 1, "tokens": ["a", shape]},
                ],
            }
        )
    _dump(root / "coco" / "dataset_coco.json", {"images": images, "dataset": "coco"})


def write_flickr30k(root: Path) -> None:
    images = []
    for i, (split, color, shape) in enumerate(CAPTION_SPLITS):
        split = "train" if split == "restval" else split
        name = f"{1000 + i}.jpg"
        draw(root / "flickr30k" / "flickr30k-images" / name, color, shape)
        images.append(
            {
                "filename": name,
                "imgid": i,
                "split": split,
                "sentids": [i],
                "sentences": [{"raw": f"A {color} {shape}.", "imgid": i, "sentid": i, "tokens": [color]}],
            }
        )
    _dump(root / "flickr30k" / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})


VQA_ITEMS = {  # split -> [(image_id, color, question, answers)]
    "train2014": [
        (1, "red", "What color is the circle?", ["red"] * 10),
        (2, "green", "What color is the circle?", ["green"] * 9 + ["lime"]),
        (3, "blue", "How many circles?", ["1"] * 8 + ["one", "2"]),
    ],
    "val2014": [
        (11, "yellow", "What color is the circle?", ["yellow"] * 6 + ["gold"] * 4),
        (12, "purple", "Is it round?", ["yes"] * 10),
        (13, "orange", "What color is it?", ["orange"] * 2 + ["red"] * 8),
    ],
}


def write_coco_vqa(root: Path, task: str, q_name: str, a_name: str, image_base: Path) -> None:
    qid = 100
    for split, items in VQA_ITEMS.items():
        qs, anns = [], []
        for image_id, color, question, answers in items:
            qid += 1
            draw(image_base / split / f"COCO_{split}_{image_id:012d}.jpg", color)
            qs.append({"image_id": image_id, "question": question, "question_id": qid})
            anns.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": "what color",
                    "answer_type": "other",
                    "multiple_choice_answer": max(set(answers), key=answers.count),
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)
                    ],
                }
            )
        _dump(
            root / task / q_name.format(split=split),
            {"questions": qs, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split},
        )
        _dump(
            root / task / a_name.format(split=split),
            {"annotations": anns, "data_type": "mscoco", "data_subtype": split},
        )


def write_textvqa(root: Path) -> None:
    for split, items in (("train", VQA_ITEMS["train2014"]), ("val", VQA_ITEMS["val2014"])):
        data = []
        for image_id, color, question, answers in items:
            name = f"{split}{image_id:04x}"
            draw(root / "textvqa" / "train_images" / f"{name}.jpg", color)
            data.append(
                {
                    "question": question,
                    "image_id": name,
                    "image_classes": ["Shape"],
                    "flickr_original_url": "",
                    "flickr_300k_url": "",
                    "image_width": 48,
                    "image_height": 48,
                    "answers": answers,
                    "question_tokens": question.split(),
                    "question_id": 1000 + image_id,
                    "set_name": split,
                }
            )
        _dump(
            root / "textvqa" / f"TextVQA_0.5.1_{split}.json",
            {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
        )


def write_vizwiz(root: Path) -> None:
    for split, items in (("train", VQA_ITEMS["train2014"]), ("val", VQA_ITEMS["val2014"])):
        data = []
        for image_id, color, question, answers in items:
            name = f"VizWiz_{split}_{image_id:08d}.jpg"
            draw(root / "vizwiz" / split / name, color)
            data.append(
                {
                    "image": name,
                    "question": question,
                    "answerable": 1,
                    "answer_type": "other",
                    "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers],
                }
            )
        _dump(root / "vizwiz" / f"{split}.json", data)


def write_hatefulmemes(root: Path) -> None:
    rows = {
        "train.jsonl": [
            (1, "red", 0, "have a nice day"),
            (2, "blue", 1, "something mean"),
            (3, "green", 0, "cats are great"),
        ],
        "test_seen.jsonl": [
            (11, "yellow", 1, "another mean one"),
            (12, "purple", 0, "sunny weather"),
            (13, "orange", 1, "not nice at all"),
            (14, "gray", 0, "good morning"),
        ],
    }
    for fname, items in rows.items():
        lines = []
        for i, color, label, text in items:
            draw(root / "hateful_memes" / "img" / f"{i:05d}.png", color, "square")
            lines.append(json.dumps({"id": i, "img": f"img/{i:05d}.png", "label": label, "text": text}))
        (root / "hateful_memes" / fname).write_text("\n".join(lines) + "\n")


IMAGENET_CLASSES = {
    "n01_red_thing": ("red", "circle"),
    "n02_blue_thing": ("blue", "square"),
    "n03_green_thing": ("green", "triangle"),
}


def write_imagenet(root: Path) -> None:
    for d, (color, shape) in IMAGENET_CLASSES.items():
        for split, n in (("train", 2), ("val", 1)):
            for k in range(n):
                draw(root / "imagenet" / split / d / f"{d}_{k}.JPEG", color, shape)
    _dump(root / "imagenet" / "classnames.json", {"n01_red_thing": "red ball", "n02_blue_thing": "blue box"})


def write_all(root: Path) -> Path:
    write_coco(root)
    write_flickr30k(root)
    write_coco_vqa(
        root,
        "vqav2",
        "v2_OpenEnded_mscoco_{split}_questions.json",
        "v2_mscoco_{split}_annotations.json",
        root / "vqav2",
    )
    # OK-VQA's images are found in the shared coco/ folder (the documented fallback)
    write_coco_vqa(
        root, "okvqa", "OpenEnded_mscoco_{split}_questions.json", "mscoco_{split}_annotations.json", root / "coco"
    )
    write_textvqa(root)
    write_vizwiz(root)
    write_hatefulmemes(root)
    write_imagenet(root)
    return root


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run ~4x faster on one thread (no OpenMP spin-waits)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def palette() -> dict:
    """Colour name -> RGB used by the fixture images."""
    return dict(COLORS)


@pytest.fixture(scope="session")
def draw_image():
    """The image-drawing helper, for tests that need more pictures."""
    return draw


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return write_all(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random LMM saved with save_pretrained (non-zero gates so images matter)."""
    from lmm.testing import tiny_lmm

    path = tmp_path_factory.mktemp("tiny_lmm")
    tiny_lmm(gates=0.5).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from lmm.model import LMM

    return LMM.from_pretrained(tiny_model_dir, device="cpu")
