"""Benchmark tasks: what each one reads from `--data-root`, in the datasets' official file formats.

Nothing is downloaded: point `--data-root` at a folder laid out as below (only the tasks you run
need to be present). The test split is what is scored; demonstrations come from the train split.

coco (COCO captions, Karpathy split; CIDEr, BLEU-4, METEOR)
    coco/dataset_coco.json                  Karpathy's file: {"images": [{"filepath", "filename",
                                            "split", "cocoid", "sentences": [{"raw"}]}]}
    coco/<filepath>/<filename>              e.g. coco/val2014/COCO_val2014_000000391895.jpg
    test = split "test"; demos = "train" + "restval".

flickr30k (Flickr30k, Karpathy split; same metrics)
    flickr30k/dataset_flickr30k.json        Karpathy's file: {"images": [{"filename", "split", "sentences"}]}
    flickr30k/flickr30k-images/<filename>   (also accepted: flickr30k_images/, images/)
    test = "test"; demos = "train".

vqav2 (VQAv2; official VQA accuracy)
    vqav2/v2_OpenEnded_mscoco_{train2014,val2014}_questions.json
        {"questions": [{"question_id", "image_id", "question"}]}
    vqav2/v2_mscoco_{train2014,val2014}_annotations.json
        {"annotations": [{"question_id", "answers": [{"answer"}], "multiple_choice_answer", ...}]}
    vqav2/{train2014,val2014}/COCO_{split}_{image_id:012d}.jpg     (or coco/{train2014,val2014}/...)
    test = val2014; demos = train2014.

okvqa (OK-VQA; official VQA accuracy)
    okvqa/OpenEnded_mscoco_{train2014,val2014}_questions.json, okvqa/mscoco_{train2014,val2014}_annotations.json
    images as for vqav2, under okvqa/{train2014,val2014}/ (or coco/{train2014,val2014}/).

textvqa (TextVQA 0.5.1; official VQA accuracy)
    textvqa/TextVQA_0.5.1_{train,val}.json  {"data": [{"question_id", "image_id", "question", "answers": [str x10]}]}
    textvqa/train_images/<image_id>.jpg     (the val questions' images live there too)
    test = val; demos = train.

vizwiz (VizWiz-VQA; official VQA accuracy)
    vizwiz/{train,val}.json                 [{"image", "question", "answers": [{"answer", "answer_confidence"}]}]
    vizwiz/{train,val}/<image>
    test = val; demos = train.

hatefulmemes (Hateful Memes; ROC-AUC from the answers' log-likelihoods)
    hateful_memes/train.jsonl               one {"id", "img": "img/01235.png", "label", "text"} per line
    hateful_memes/test_seen.jsonl           the test split (falls back to dev_seen.jsonl if absent)
    hateful_memes/img/<id>.png

imagenet (any ImageNet-style folder dataset; class by log-likelihood of the class names; top-1/top-5)
    imagenet/train/<class_dir>/<image>      demos
    imagenet/val/<class_dir>/<image>        test
    imagenet/classnames.json                optional {"<class_dir>": "class name"}; otherwise the folder
                                            name with "_" read as a space

easyvqa (the `easy_vqa` package's own data; nothing needed under --data-root): see `lmm.eval.easyvqa`.

Video QA (msrvtt_qa, msvd_qa): see `lmm.eval.video_qa`; audio (clotho, audiocaps, esc50): `lmm.eval.audio_tasks`.

The tasks that use these loaders (prompt templates, generation, metrics) are in `lmm.eval.benchmarks`; the
names `--tasks` accepts are in `lmm.eval.registry`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from . import prompts
from .task import Sample, TaskData, TaskDataError, load_image  # noqa: F401  (load_image: re-exported)

LAYOUT_HELP = "`python -m pydoc lmm.eval.tasks`"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# ---------------------------------------------------------------- helpers


def _need(path: Path, task: str, what: str) -> Path:
    if not path.exists():
        raise TaskDataError(
            f"{task}: {what} not found at {path}. Put the official file there or pass the "
            f"right --data-root (expected layout: {LAYOUT_HELP})."
        )
    return path


def _read_json(path: Path, task: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{task}: {path} is not valid JSON ({e})") from e


def _first_dir(task: str, candidates: list[Path]) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise TaskDataError(
        f"{task}: image folder not found; expected one of: {', '.join(map(str, candidates))} "
        f"(check --data-root; layout: {LAYOUT_HELP})"
    )


def _most_common(answers: list[str]) -> str:
    # Counter keeps first-seen order among ties, so the choice is deterministic.
    return Counter(answers).most_common(1)[0][0] if answers else ""


def _key(obj: dict, key: str, task: str, path: Path):
    try:
        return obj[key]
    except (KeyError, TypeError):
        raise TaskDataError(f"{task}: an entry of {path} lacks the field {key!r}; is this the official file?") from None


# ---------------------------------------------------------------- captioning (Karpathy JSON)


def _karpathy(task: str, json_path: Path, image_dir_for: Callable[[dict], Path], test_splits, train_splits) -> TaskData:
    data = _read_json(_need(json_path, task, "the Karpathy split JSON"), task)
    if "images" not in data:
        raise TaskDataError(f"{task}: {json_path} has no 'images' list; expected Karpathy's dataset_*.json")
    train, test = [], []
    for img in data["images"]:
        split = _key(img, "split", task, json_path)
        if split not in test_splits and split not in train_splits:
            continue
        refs = tuple(s["raw"].strip() for s in _key(img, "sentences", task, json_path))
        name = _key(img, "filename", task, json_path)
        sid = str(img.get("cocoid", img.get("imgid", name)))
        s = Sample(id=sid, image=str(image_dir_for(img) / name), answers=refs, target=refs[0] if refs else "")
        (test if split in test_splits else train).append(s)
    return TaskData(train=train, test=test, files=[str(json_path)])


def load_coco(root: Path) -> TaskData:
    base = root / "coco"
    return _karpathy(
        "coco",
        base / "dataset_coco.json",
        lambda img: base / img.get("filepath", ""),
        test_splits={"test"},
        train_splits={"train", "restval"},
    )


def load_flickr30k(root: Path) -> TaskData:
    base = root / "flickr30k"
    json_path = base / "dataset_flickr30k.json"
    _need(json_path, "flickr30k", "the Karpathy split JSON")
    images = _first_dir("flickr30k", [base / "flickr30k-images", base / "flickr30k_images", base / "images"])
    return _karpathy("flickr30k", json_path, lambda img: images, test_splits={"test"}, train_splits={"train"})


# ---------------------------------------------------------------- VQA formats


def _vqa_split(task: str, q_path: Path, a_path: Path, image_dir: Path, coco_split: str) -> list[Sample]:
    questions = _read_json(_need(q_path, task, "the questions JSON"), task)
    annotations = _read_json(_need(a_path, task, "the annotations JSON"), task)
    if "questions" not in questions or "annotations" not in annotations:
        raise TaskDataError(
            f"{task}: expected {{'questions': [...]}} in {q_path} and {{'annotations': [...]}} in {a_path}"
        )
    by_qid = {a["question_id"]: a for a in annotations["annotations"]}
    out = []
    for q in questions["questions"]:
        qid = _key(q, "question_id", task, q_path)
        ann = by_qid.get(qid)
        if ann is None:
            raise TaskDataError(f"{task}: question {qid} of {q_path} has no annotation in {a_path}")
        answers = tuple(a["answer"] for a in _key(ann, "answers", task, a_path))
        target = ann.get("multiple_choice_answer") or _most_common(list(answers))
        image = image_dir / f"COCO_{coco_split}_{int(q['image_id']):012d}.jpg"
        out.append(Sample(id=str(qid), image=str(image), question=q["question"], answers=answers, target=target))
    return out


def _coco_vqa(task: str, root: Path, q_name: str, a_name: str) -> TaskData:
    base = root / task
    splits = {}
    files = []
    for split in ("train2014", "val2014"):
        q_path, a_path = base / q_name.format(split=split), base / a_name.format(split=split)
        _need(q_path, task, "the questions JSON")
        _need(a_path, task, "the annotations JSON")
        image_dir = _first_dir(task, [base / split, root / "coco" / split])
        splits[split] = _vqa_split(task, q_path, a_path, image_dir, split)
        files += [str(q_path), str(a_path)]
    return TaskData(train=splits["train2014"], test=splits["val2014"], files=files)


def load_vqav2(root: Path) -> TaskData:
    return _coco_vqa("vqav2", root, "v2_OpenEnded_mscoco_{split}_questions.json", "v2_mscoco_{split}_annotations.json")


def load_okvqa(root: Path) -> TaskData:
    return _coco_vqa("okvqa", root, "OpenEnded_mscoco_{split}_questions.json", "mscoco_{split}_annotations.json")


def load_textvqa(root: Path) -> TaskData:
    base = root / "textvqa"
    images = _first_dir("textvqa", [base / "train_images", base / "images"])
    splits, files = {}, []
    for split in ("train", "val"):
        path = _need(base / f"TextVQA_0.5.1_{split}.json", "textvqa", f"the {split} JSON")
        data = _read_json(path, "textvqa")
        if "data" not in data:
            raise TaskDataError(f"textvqa: {path} has no 'data' list; expected the official TextVQA_0.5.1 JSON")
        samples = []
        for d in data["data"]:
            answers = tuple(_key(d, "answers", "textvqa", path))
            samples.append(
                Sample(
                    id=str(d["question_id"]),
                    image=str(images / f"{d['image_id']}.jpg"),
                    question=d["question"],
                    answers=answers,
                    target=_most_common(list(answers)),
                )
            )
        splits[split] = samples
        files.append(str(path))
    return TaskData(train=splits["train"], test=splits["val"], files=files)


def load_vizwiz(root: Path) -> TaskData:
    base = root / "vizwiz"
    splits, files = {}, []
    for split in ("train", "val"):
        path = _need(base / f"{split}.json", "vizwiz", f"the {split} annotations JSON")
        data = _read_json(path, "vizwiz")
        if not isinstance(data, list):
            raise TaskDataError(f"vizwiz: {path} should hold a list of questions (the official VizWiz-VQA format)")
        image_dir = _first_dir("vizwiz", [base / split])
        samples = []
        for d in data:
            name = _key(d, "image", "vizwiz", path)
            answers = tuple(a["answer"] for a in _key(d, "answers", "vizwiz", path))
            samples.append(
                Sample(
                    id=Path(name).stem,
                    image=str(image_dir / name),
                    question=d["question"],
                    answers=answers,
                    target=_most_common(list(answers)),
                )
            )
        splits[split] = samples
        files.append(str(path))
    return TaskData(train=splits["train"], test=splits["val"], files=files)


# ---------------------------------------------------------------- HatefulMemes


def _read_jsonl(path: Path, task: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{task}: line {i} of {path} is not JSON ({e})") from e
    return rows


def load_hatefulmemes(root: Path) -> TaskData:
    base = root / "hateful_memes"
    train_path = _need(base / "train.jsonl", "hatefulmemes", "train.jsonl")
    test_path = base / "test_seen.jsonl"
    if not test_path.exists():
        test_path = _need(base / "dev_seen.jsonl", "hatefulmemes", "test_seen.jsonl (or dev_seen.jsonl)")
    splits = {}
    for split, path in (("train", train_path), ("test", test_path)):
        samples = []
        for d in _read_jsonl(path, "hatefulmemes"):
            if "label" not in d:
                raise TaskDataError(
                    f"hatefulmemes: {path} has entries without 'label' (the unlabelled test "
                    f"release?); use a labelled split such as test_seen.jsonl or dev_seen.jsonl"
                )
            label = int(d["label"])
            samples.append(
                Sample(
                    id=str(d["id"]),
                    image=str(base / d["img"]),
                    question=d["text"],
                    target=prompts.HATEFUL_MEMES_CLASSES[label],
                    label=label,
                    answers=(prompts.HATEFUL_MEMES_CLASSES[label],),
                )
            )
        splits[split] = samples
    return TaskData(
        train=splits["train"],
        test=splits["test"],
        classes=prompts.HATEFUL_MEMES_CLASSES,
        files=[str(train_path), str(test_path)],
    )


# ---------------------------------------------------------------- ImageNet-style folders


def load_imagenet(root: Path) -> TaskData:
    base = root / "imagenet"
    train_dir = _need(base / "train", "imagenet", "the train/<class>/ folders")
    test_dir = _need(base / "val", "imagenet", "the val/<class>/ folders")
    class_dirs = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise TaskDataError(f"imagenet: no class folders in {train_dir}")
    names_path = base / "classnames.json"
    names = _read_json(names_path, "imagenet") if names_path.exists() else {}
    classes = tuple(names.get(d, d.replace("_", " ")) for d in class_dirs)
    index = {d: i for i, d in enumerate(class_dirs)}
    splits = {}
    for split, folder in (("train", train_dir), ("test", test_dir)):
        samples = []
        for d in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            if d not in index:
                raise TaskDataError(f"imagenet: class folder {folder / d} has no counterpart in {train_dir}")
            for img in sorted(folder.joinpath(d).iterdir()):
                if img.suffix.lower() in IMAGE_EXTS:
                    i = index[d]
                    samples.append(
                        Sample(id=f"{d}/{img.name}", image=str(img), answers=(classes[i],), target=classes[i], label=i)
                    )
        splits[split] = samples
    return TaskData(
        train=splits["train"],
        test=splits["test"],
        classes=classes,
        files=[str(train_dir), str(test_dir)] + ([str(names_path)] if names else []),
    )
