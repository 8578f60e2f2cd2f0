"""Clotho, AudioCaps and ESC-50, read from their official release files under `--data-root`.

clotho (Clotho v2 audio captioning, Drossos et al. 2020: the Zenodo release's CSVs and extracted audio archives)
    clotho/clotho_captions_evaluation.csv   file_name,caption_1,caption_2,caption_3,caption_4,caption_5
    clotho/clotho_captions_development.csv  the same columns (demos)
    clotho/evaluation/<file_name>           clotho_audio_evaluation.7z extracted
    clotho/development/<file_name>          clotho_audio_development.7z extracted
    test = evaluation (every caption_* column is a reference); demos = development (caption_1 is the answer).

audiocaps (AudioCaps, Kim et al. 2019: the CSVs of github.com/cdjkim/audiocaps/dataset)
    audiocaps/{train,test}.csv              audiocap_id,youtube_id,start_time,caption (one row per caption)
    audiocaps/audio/**/<clip>               the clips you downloaded, anywhere under audio/ (e.g. audio/test/),
                                            named <youtube_id>.<ext>, Y<youtube_id>.<ext>,
                                            <youtube_id>_<start_time>.<ext> or <audiocap_id>.<ext>
                                            (ext: wav, flac, mp3, ogg, opus, m4a, aac, webm)
    test = test.csv, one sample per youtube_id with all its captions (5) as references; demos = train.csv, one
    per youtube_id with its first caption. AudioCaps ships no audio and YouTube removes videos, so clips
    without a file are skipped and counted in the results' notes.

esc50 (ESC-50 environmental sound classification, Piczak 2015: the GitHub release karolpiczak/ESC-50)
    esc50/meta/esc50.csv                    filename,fold,target,category,esc10,src_file,take
    esc50/audio/<filename>                  the 2,000 5-second clips
    test = fold 5; demos = folds 1-4; the classes are the categories in target order, "_" read as a space
    ("chirping_birds" -> "chirping birds"). A missing clip is a TaskDataError naming it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from .task import Sample, TaskData, TaskDataError
from .tasks import _key, _need

LAYOUT_HELP = "`python -m pydoc lmm.eval.audio_tasks`"
ESC50_TEST_FOLD = 5


@dataclass
class NotedTaskData(TaskData):
    """TaskData with notes for the results JSON (e.g. how many clips were skipped)."""

    notes: list[str] = field(default_factory=list)


def read_csv(path: Path, task: str, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a CSV with a header holding at least `columns`; a clear TaskDataError otherwise."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in columns if c not in (reader.fieldnames or [])]
            if lacking:
                raise TaskDataError(
                    f"{task}: {path} has no column(s) {', '.join(lacking)} (header: {reader.fieldnames}); "
                    f"is this the official file? (layout: {LAYOUT_HELP})"
                )
            return list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise TaskDataError(f"{task}: cannot read {path} as CSV ({e})") from e


def _require_files(task: str, samples: list[Sample]) -> list[Sample]:
    missing = [s.image for s in samples if not Path(s.image).is_file()]
    if missing:
        raise TaskDataError(
            f"{task}: {len(missing)} audio file(s) not found, e.g. {', '.join(missing[:3])} (layout: {LAYOUT_HELP})"
        )
    return samples


# ---------------------------------------------------------------- Clotho


def load_clotho(root: Path) -> TaskData:
    base = root / "clotho"
    splits, files = {}, []
    for split in ("development", "evaluation"):
        path = _need(base / f"clotho_captions_{split}.csv", "clotho", f"clotho_captions_{split}.csv")
        samples = []
        for row in read_csv(path, "clotho", ("file_name", "caption_1")):
            caps = tuple(
                row[k].strip() for k in sorted(row, key=str) if str(k).startswith("caption_") and (row[k] or "").strip()
            )
            if not caps:
                raise TaskDataError(f"clotho: {row['file_name']} has no caption in {path}")
            name = row["file_name"]
            samples.append(Sample(id=name, image=str(base / split / name), answers=caps, target=caps[0]))
        splits[split] = _require_files("clotho", samples)
        files.append(str(path))
    return TaskData(train=splits["development"], test=splits["evaluation"], files=files)


# ---------------------------------------------------------------- AudioCaps


def _audio_index(folder: Path) -> dict[str, Path]:
    """{file stem: path} of every audio file under `folder` (the first in sorted order wins)."""
    from lmm.data.audio import AUDIO_EXTENSIONS

    index: dict[str, Path] = {}
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS and p.is_file():
                index.setdefault(p.stem, p)
    return index


def _start(value: str) -> str:
    """AudioCaps' start_time ("30" or "30.0") as the integer text clip names use."""
    try:
        return str(int(float(value)))
    except ValueError:
        return value


def load_audiocaps(root: Path) -> TaskData:
    base = root / "audiocaps"
    index = _audio_index(base / "audio")
    splits, files, notes = {}, [], []
    for split in ("train", "test"):
        path = _need(base / f"{split}.csv", "audiocaps", f"{split}.csv")
        clips: dict[str, dict] = {}  # youtube_id -> {"path", "captions"} in file order
        skipped = set()
        for row in read_csv(path, "audiocaps", ("audiocap_id", "youtube_id", "start_time", "caption")):
            yid = row["youtube_id"]
            if yid in skipped:
                continue
            if yid not in clips:
                stems = (yid, f"Y{yid}", f"{yid}_{_start(row['start_time'])}", row["audiocap_id"])
                found = next((index[s] for s in stems if s in index), None)
                if found is None:
                    skipped.add(yid)
                    continue
                clips[yid] = {"path": found, "captions": []}
            clips[yid]["captions"].append(row["caption"].strip())
        splits[split] = [
            Sample(id=yid, image=str(c["path"]), answers=tuple(c["captions"]), target=c["captions"][0])
            for yid, c in clips.items()
        ]
        if skipped:
            notes.append(
                f"{len(skipped)} of {len(skipped) + len(clips)} {split} clips have no audio file under "
                f"{base / 'audio'} and were skipped"
            )
        files.append(str(path))
    if not splits["test"]:
        raise TaskDataError(
            f"audiocaps: no test clip of {files[1]} has an audio file under {base / 'audio'} "
            f"(names: <youtube_id>.wav, Y<youtube_id>.wav, <youtube_id>_<start_time>.wav or <audiocap_id>.wav; "
            f"layout: {LAYOUT_HELP})"
        )
    return NotedTaskData(train=splits["train"], test=splits["test"], files=files, notes=notes)


# ---------------------------------------------------------------- ESC-50


def load_esc50(root: Path, test_fold: int = ESC50_TEST_FOLD) -> TaskData:
    base = root / "esc50"
    path = _need(base / "meta" / "esc50.csv", "esc50", "meta/esc50.csv")
    rows = read_csv(path, "esc50", ("filename", "fold", "target", "category"))
    names: dict[int, str] = {}
    for r in rows:
        try:
            target, fold = int(r["target"]), int(r["fold"])
        except ValueError:
            raise TaskDataError(f"esc50: {path}: target and fold must be integers, got {r}") from None
        if names.setdefault(target, r["category"]) != r["category"]:
            raise TaskDataError(
                f"esc50: {path}: target {target} names two categories ({names[target]}, {r['category']})"
            )
        r["target"], r["fold"] = target, fold
    order = sorted(names)
    classes = tuple(names[t].replace("_", " ") for t in order)
    label_of = {t: i for i, t in enumerate(order)}
    train, test = [], []
    for r in rows:
        label = label_of[r["target"]]
        s = Sample(
            id=_key(r, "filename", "esc50", path),
            image=str(base / "audio" / r["filename"]),
            answers=(classes[label],),
            target=classes[label],
            label=label,
        )
        (test if r["fold"] == test_fold else train).append(s)
    if not test:
        raise TaskDataError(f"esc50: no clip of fold {test_fold} (the test fold) in {path}")
    return TaskData(
        train=_require_files("esc50", train), test=_require_files("esc50", test), classes=classes, files=[str(path)]
    )
