"""MSRVTT-QA and MSVD-QA (Xu et al., ACM MM 2017), read from their official release files under `--data-root`.

The layout implemented is the QA release of github.com/xudejing/video-question-answering (one JSON list of
question records per split) next to the videos of the original datasets (MSR-VTT's `video<N>.mp4` clips; MSVD's
YouTubeClips `<youtube id>_<start>_<end>.avi`, named through the release's `youtube_mapping.txt`):

msrvtt_qa
    msrvtt_qa/{train,test}_qa.json      [{"id": 0, "video_id": 7010, "question": "what is a man doing?",
                                          "answer": "cook", "category_id": 0}, ...]
    msrvtt_qa/video/video{video_id}.mp4 MSR-VTT's clips (also found under videos/, TrainValVideo/, TestVideo/)

msvd_qa
    msvd_qa/{train,test}_qa.json        [{"id": 0, "video_id": 1, "question": "...", "answer": "..."}, ...]
    msvd_qa/youtube_mapping.txt         "<clip name> vid<video_id>" per line, e.g. "-4wsuPCjDBc_5_15 vid1"
    msvd_qa/YouTubeClips/<clip name>.avi (also found under video/, videos/)

test = test_qa.json; demos = train_qa.json (val_qa.json is not read). A video may also carry another video
extension (mp4, webm, mkv, avi, mov, m4v) when it was converted. A question whose video is missing is a
TaskDataError naming the file (both datasets ship all their videos in one archive).
"""

from __future__ import annotations

from pathlib import Path

from .task import Sample, TaskData, TaskDataError
from .tasks import _key, _need, _read_json

LAYOUT_HELP = "`python -m pydoc lmm.eval.video_qa`"


def _video_index(folders: list[Path], preferred: str) -> dict[str, Path]:
    """{file stem: path} of the video files in `folders` (first folder, then the preferred suffix wins)."""
    from lmm.data.video import VIDEO_EXTENSIONS

    index: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir(), key=lambda p: (p.suffix.lower() != preferred, p.name)):
            if p.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS and p.stem not in index:
                index[p.stem] = p
    return index


def _video_qa(task: str, base: Path, folders: list[Path], stem_of, preferred: str) -> TaskData:
    """The train / test question lists of one dataset; `stem_of(video_id)` names a question's video file."""
    index = _video_index(folders, preferred)
    splits, files, missing = {}, [], []
    for split in ("train", "test"):
        path = _need(base / f"{split}_qa.json", task, f"{split}_qa.json")
        rows = _read_json(path, task)
        if not isinstance(rows, list):
            raise TaskDataError(f"{task}: {path} must hold a list of question records; is this the official file?")
        samples = []
        for q in rows:
            stem = stem_of(_key(q, "video_id", task, path))
            video = index.get(stem)
            if video is None:
                missing.append(stem + preferred)
                continue
            answer = str(_key(q, "answer", task, path))
            samples.append(
                Sample(
                    id=str(_key(q, "id", task, path)),
                    image=str(video),
                    question=str(_key(q, "question", task, path)),
                    answers=(answer,),
                    target=answer,
                )
            )
        splits[split] = samples
        files.append(str(path))
    if missing:
        where = ", ".join(str(f) for f in folders)
        raise TaskDataError(
            f"{task}: {len(missing)} question(s) name videos not found in {where}: "
            f"{', '.join(sorted(set(missing))[:5])} (layout: {LAYOUT_HELP})"
        )
    return TaskData(train=splits["train"], test=splits["test"], files=files)


def load_msrvtt_qa(root: Path) -> TaskData:
    base = root / "msrvtt_qa"
    folders = [base / d for d in ("video", "videos", "TrainValVideo", "TestVideo")]
    return _video_qa("msrvtt_qa", base, folders, lambda vid: f"video{vid}", ".mp4")


def load_msvd_qa(root: Path) -> TaskData:
    base = root / "msvd_qa"
    mapping_path = _need(base / "youtube_mapping.txt", "msvd_qa", "youtube_mapping.txt")
    mapping = {}
    for n, line in enumerate(mapping_path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].startswith("vid"):
            raise TaskDataError(f"msvd_qa: line {n} of {mapping_path} is not '<clip name> vid<N>': {line!r}")
        mapping[parts[1]] = parts[0]

    def stem_of(video_id) -> str:
        name = mapping.get(f"vid{video_id}")
        if name is None:
            raise TaskDataError(f"msvd_qa: video_id {video_id} has no line 'NAME vid{video_id}' in {mapping_path}")
        return name

    folders = [base / d for d in ("YouTubeClips", "video", "videos")]
    data = _video_qa("msvd_qa", base, folders, stem_of, ".avi")
    data.files.append(str(mapping_path))
    return data
