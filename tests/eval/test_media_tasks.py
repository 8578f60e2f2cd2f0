"""Video QA (MSRVTT-QA, MSVD-QA), audio captioning (Clotho, AudioCaps) and audio classification (ESC-50) in their
official file layouts, with real encoded videos (mp4, avi) and real recordings (asterisk's voice prompts, re-encoded
to wav / flac): the loaders read them, prompts carry each file at its marker, every metric equals a hand-computed or
directly computed value, and the harness and `lmm eval` run each task with the blind baseline beside it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from lmm.eval.audio_tasks import load_audiocaps, load_clotho, load_esc50
from lmm.eval.harness import EvalConfig, evaluate, evaluate_task
from lmm.eval.metrics import java_available
from lmm.eval.prompts import postprocess_vqa
from lmm.eval.registry import get_task
from lmm.eval.task import EvalConfigError, Sample, TaskData, TaskDataError
from lmm.eval.video_qa import load_msrvtt_qa, load_msvd_qa
from lmm.inputs import Audio, Video

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")
MEDIA_TASKS = ["msrvtt_qa", "msvd_qa", "clotho", "audiocaps", "esc50"]
needs_java = pytest.mark.skipif(not java_available(), reason="pycocoevalcap's tokenizer needs Java")


# ------------------------------------------------------------------ files in the official layouts


def write_clip(path: Path, shade: int) -> None:
    """A real encoded video (container from the suffix: mp4, avi) of 6 frames that change over time."""
    from PIL import Image

    from lmm.data.video import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(str(path), [Image.new("RGB", (32, 32), (shade, 40 * k, 255 - shade)) for k in range(6)])


def write_sound(path: Path, k: int, rate: int = 16_000) -> None:
    """A real recording (asterisk's spoken digit k, 8 kHz) re-encoded at `rate` in the suffix's format; a tone
    where the recordings are not installed."""
    from lmm.data.audio import decode_audio, write_audio

    if (SOUNDS / f"{k % 10}.wav").is_file():
        wave = decode_audio(str(SOUNDS / f"{k % 10}.wav"), rate)
    else:
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * k) * np.arange(rate) / rate).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_audio(path, wave, rate)


def write_csv(path: Path, header: list, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


QA = {  # split -> (question id, video id, question, answer)
    "train": [(0, 0, "what is a man doing?", "sing"), (1, 1, "who is running?", "dog"), (2, 1, "how many?", "two")],
    "test": [(10, 7, "what is shown?", "man"), (11, 8, "what is the animal?", "cat"), (12, 7, "who talks?", "woman")],
}


def write_video_qa(root: Path) -> None:
    for split, rows in QA.items():
        records = [{"id": i, "video_id": v, "question": q, "answer": a, "category_id": 0} for i, v, q, a in rows]
        for task in ("msrvtt_qa", "msvd_qa"):
            (root / task).mkdir(parents=True, exist_ok=True)
            (root / task / f"{split}_qa.json").write_text(json.dumps(records))
        for _, v, _, _ in rows:  # MSR-VTT's own folders: train/val clips in TrainValVideo/, test clips in TestVideo/
            folder = "TrainValVideo" if split == "train" else "TestVideo"
            write_clip(root / "msrvtt_qa" / folder / f"video{v}.mp4", 30 * v)
            write_clip(root / "msvd_qa" / "YouTubeClips" / f"-yt{v}x_5_15.avi", 30 * v)
    mapping = "".join(f"-yt{v}x_5_15 vid{v}\n" for v in (0, 1, 7, 8))
    (root / "msvd_qa" / "youtube_mapping.txt").write_text(mapping)


CLOTHO = {  # split -> file name -> 5 captions
    "development": {
        "rain_on_roof.wav": [f"rain falls on a metal roof {i}" for i in range(5)],
        "dog barks.wav": [f"a dog barks twice near a road {i}" for i in range(5)],
    },
    "evaluation": {
        "voice one.wav": ["a woman says one", "a woman speaks a digit", "someone says a number", "a voice", "one"],
        "voice, two.wav": ["a woman says two", "a calm voice says two", "a number is spoken", "speech", "two"],
        "voice three.wav": ["a woman says three", "a voice reads a digit", "speech in a room", "talking", "three"],
    },
}

AUDIOCAPS = {  # split -> [(audiocap_id, youtube_id, start_time, caption)]; file names use the four accepted forms
    "train": [(91, "trainA", 30, "a man speaks"), (92, "trainB", 0, "a car passes"), (93, "trainGone", 10, "wind")],
    "test": [(101 + j, "testA", 30, f"a woman says a number {j}") for j in range(5)]
    + [(201 + j, "test-B", 0, f"a voice counts slowly {j}") for j in range(5)]
    + [(301 + j, "removed", 20, f"a clip YouTube took down {j}") for j in range(5)],
}
AUDIOCAPS_FILES = {"trainA": "train/YtrainA.wav", "trainB": "train/92.flac", "testA": "test/testA_30.wav"}
AUDIOCAPS_FILES["test-B"] = "test/test-B.flac"

ESC50_CATEGORIES = ["dog", "rooster", "pig", "cow", "frog", "chirping_birds"]


def write_esc50(root: Path) -> None:
    rows = []
    for i in range(9):  # folds 1-4: demos; fold 5: the test clips (i = 6, 7, 8)
        target = i % 6
        fold = 5 if i >= 6 else 1 + i % 4
        name = f"{fold}-{1000 + i}-A-{target}.wav"
        write_sound(root / "esc50" / "audio" / name, i, rate=44_100)  # ESC-50's clips are 44.1 kHz
        rows.append([name, fold, target, ESC50_CATEGORIES[target], False, 1000 + i, "A"])
    write_csv(
        root / "esc50" / "meta" / "esc50.csv",
        ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
        rows,
    )


def write_all(root: Path) -> Path:
    write_video_qa(root)
    for split, files in CLOTHO.items():
        for k, name in enumerate(files):
            write_sound(root / "clotho" / split / name, k + (3 if split == "evaluation" else 0))
        write_csv(
            root / "clotho" / f"clotho_captions_{split}.csv",
            ["file_name"] + [f"caption_{i}" for i in range(1, 6)],
            [[name, *caps] for name, caps in files.items()],
        )
    for yid, rel in AUDIOCAPS_FILES.items():
        write_sound(root / "audiocaps" / "audio" / rel, len(yid))
    for split, rows in AUDIOCAPS.items():
        write_csv(root / "audiocaps" / f"{split}.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], rows)
    write_esc50(root)
    return root


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    return write_all(tmp_path_factory.mktemp("media_eval"))


@pytest.fixture(scope="module")
def model():
    from lmm.testing import tiny_media_lmm

    return tiny_media_lmm(seed=5, video_frames=4, pool=50, max_chunks=2)


# ------------------------------------------------------------------ loaders


def test_video_qa_layouts(media_root):
    for load in (load_msrvtt_qa, load_msvd_qa):
        data = load(media_root)
        assert [(s.id, s.question, s.answers, s.target) for s in data.test] == [
            (str(i), q, (a,), a) for i, _, q, a in QA["test"]
        ]
        assert [s.id for s in data.train] == ["0", "1", "2"]
    msrvtt, msvd = load_msrvtt_qa(media_root), load_msvd_qa(media_root)
    assert [Path(s.image).relative_to(media_root).as_posix() for s in msrvtt.test] == [
        "msrvtt_qa/TestVideo/video7.mp4",
        "msrvtt_qa/TestVideo/video8.mp4",
        "msrvtt_qa/TestVideo/video7.mp4",
    ]
    assert Path(msvd.train[1].image).name == "-yt1x_5_15.avi"  # vid1 through youtube_mapping.txt


def test_video_qa_bad_files_name_the_fix(tmp_path):
    write_video_qa(tmp_path)
    (tmp_path / "msrvtt_qa" / "TestVideo" / "video8.mp4").unlink()
    with pytest.raises(TaskDataError, match=r"1 question\(s\) name videos not found.*video8\.mp4"):
        load_msrvtt_qa(tmp_path)
    (tmp_path / "msvd_qa" / "youtube_mapping.txt").write_text("-yt0x_5_15 vid0\n")
    with pytest.raises(TaskDataError, match="video_id 1 has no line 'NAME vid1'"):
        load_msvd_qa(tmp_path)
    (tmp_path / "msvd_qa" / "train_qa.json").write_text('{"questions": []}')
    with pytest.raises(TaskDataError, match="must hold a list"):
        load_msvd_qa(tmp_path)


def test_audio_layouts(media_root):
    clotho = load_clotho(media_root)
    assert [(s.id, s.answers) for s in clotho.test] == [(n, tuple(c)) for n, c in CLOTHO["evaluation"].items()]
    assert [s.target for s in clotho.train] == [c[0] for c in CLOTHO["development"].values()]
    assert all(Path(s.image).is_file() for s in clotho.train + clotho.test)

    caps = load_audiocaps(media_root)  # one sample per clip, all its captions; clips without a file skipped
    assert [(s.id, len(s.answers)) for s in caps.test] == [("testA", 5), ("test-B", 5)]
    assert caps.test[1].answers[0] == "a voice counts slowly 0"
    assert [(s.id, Path(s.image).name, s.target) for s in caps.train] == [
        ("trainA", "YtrainA.wav", "a man speaks"),
        ("trainB", "92.flac", "a car passes"),
    ]
    assert caps.notes == [
        f"1 of 3 train clips have no audio file under {media_root / 'audiocaps' / 'audio'} and were skipped",
        f"1 of 3 test clips have no audio file under {media_root / 'audiocaps' / 'audio'} and were skipped",
    ]

    esc = load_esc50(media_root)
    assert esc.classes == ("dog", "rooster", "pig", "cow", "frog", "chirping birds")
    assert [(s.id, s.label, s.target) for s in esc.test] == [
        ("5-1006-A-0.wav", 0, "dog"),
        ("5-1007-A-1.wav", 1, "rooster"),
        ("5-1008-A-2.wav", 2, "pig"),
    ]
    assert len(esc.train) == 6


def test_audio_bad_files_name_the_fix(tmp_path):
    write_esc50(tmp_path)
    (tmp_path / "esc50" / "audio" / "5-1007-A-1.wav").unlink()
    with pytest.raises(TaskDataError, match="1 audio file.*5-1007-A-1.wav"):
        load_esc50(tmp_path)
    write_csv(tmp_path / "clotho" / "clotho_captions_development.csv", ["name", "caption"], [["a.wav", "x"]])
    with pytest.raises(TaskDataError, match="no column.*file_name"):
        load_clotho(tmp_path)
    write_csv(tmp_path / "audiocaps" / "train.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], [])
    write_csv(tmp_path / "audiocaps" / "test.csv", ["audiocap_id", "youtube_id", "start_time", "caption"], [])
    with pytest.raises(TaskDataError, match="no test clip.*has an audio file"):
        load_audiocaps(tmp_path)


def test_an_undecodable_clip_is_an_error_naming_the_file(tmp_path, model):
    write_video_qa(tmp_path)
    bad = tmp_path / "msrvtt_qa" / "TestVideo" / "video8.mp4"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated
    with pytest.raises(TaskDataError, match=r"msrvtt_qa: cannot use .*video8\.mp4: cannot use this video"):
        evaluate_task(model, "msrvtt_qa", data_root=str(tmp_path), max_new_tokens=1)
    write_esc50(tmp_path)
    (tmp_path / "esc50" / "audio" / "5-1007-A-1.wav").write_bytes(b"")  # zero bytes
    with pytest.raises(TaskDataError, match=r"esc50: cannot use .*5-1007-A-1\.wav: .*empty_audio"):
        evaluate_task(model, "esc50", data_root=str(tmp_path))


# ------------------------------------------------------------------ prompts and media


def test_video_qa_prompts_carry_each_video_at_its_marker(media_root, model):
    task = get_task("msvd-qa")
    data = task.load(media_root)
    query, demos = data.test[0], data.train[:2]
    prompt, media = task.build_inputs(model, query, demos, text_only=False)
    assert prompt == (
        "<video>Question:what is a man doing? Short answer:sing<|endofchunk|>"
        "<video>Question:who is running? Short answer:dog<|endofchunk|><video>Question:what is shown? Short answer:"
    )
    assert media == [Video(demos[0].image), Video(demos[1].image), Video(query.image)]
    prompt, media = task.build_inputs(model, query, demos, text_only=True)  # 0-shot: text-only demos
    assert prompt.count("<video>") == 1 and prompt.startswith("Question:what is a man doing?")
    assert media == [Video(query.image)]
    chat = task.with_prompt_style("chat")
    prompt, media = chat.build_inputs(model, query, demos[:1], text_only=False)
    assert prompt.count("<video>\nwhat is a man doing?") == 1 and prompt.count("<video>\nwhat is shown?") == 1
    assert "<image>" not in prompt and media == [Video(demos[0].image), Video(query.image)]


def test_audio_prompts_use_the_encoders_marker(media_root, model):
    esc = get_task("esc-50")
    data = esc.load(media_root)
    prompt, media = esc.build_inputs(model, data.test[0], [], text_only=True)
    assert prompt == "<audio>This is a sound of " and media == [Audio(data.test[0].image)]
    clotho = get_task("clotho")
    data = clotho.load(media_root)
    prompt, media = clotho.build_inputs(model, data.test[0], data.train[:1], text_only=False)
    assert prompt == "<audio>Output:rain falls on a metal roof 0<|endofchunk|><audio>Output:"
    assert media == [Audio(data.train[0].image), Audio(data.test[0].image)]


def test_audio_tasks_need_an_audio_encoder_and_no_rices(media_root):
    from lmm.testing import tiny_lmm

    image_only = tiny_lmm()
    with pytest.raises(EvalConfigError, match="no audio encoder"):
        evaluate_task(image_only, "esc50", data_root=str(media_root), limit=1)
    cfg = EvalConfig(tasks="msrvtt_qa", shots=[1], data_root=str(media_root), rices=True, progress=False)
    with pytest.raises(EvalConfigError, match="--rices retrieves .* msrvtt_qa cannot"):
        evaluate(image_only, cfg)


# ------------------------------------------------------------------ metrics by hand


def test_video_qa_accuracy_by_hand(media_root):
    task = get_task("msrvtt_qa")
    data = task.load(media_root)  # answers: man, cat, woman
    # VQA normalisation on both sides: "A man." -> "man", "Woman!" -> "woman"; "cats" is not "cat"
    preds = ["A man.", "cats", "Woman!"]
    records = [{"id": s.id, "prediction": p} for s, p in zip(data.test, preds)]
    scores, notes, records = task.score(data, data.test, records, None)
    assert scores == {"accuracy": pytest.approx(100 * 2 / 3), "correct": 2} and notes == []
    assert [r["correct"] for r in records] == [True, False, True]
    assert [r["answer"] for r in records] == ["man", "cat", "woman"]


def test_esc50_accuracy_by_hand(media_root):
    task = get_task("esc50")
    data = task.load(media_root)  # labels 0, 1, 2
    rankings = [[0, 3, 1, 2, 4], [3, 1, 0, 2, 4], [5, 0, 1, 3, 4]]  # top-1 hits: 1st only; top-5: 1st and 2nd
    records = [{"id": s.id, "top5": r, "prediction": data.classes[r[0]]} for s, r in zip(data.test, rankings)]
    scores, _, records = task.score(data, data.test, records, None)
    assert scores == {"accuracy": pytest.approx(100 / 3), "top5_accuracy": pytest.approx(100 * 2 / 3)}
    assert [r["label"] for r in records] == ["dog", "rooster", "pig"]


def _cider(refs: dict, preds: dict) -> float:
    """pycocoevalcap's CIDEr-D on PTB-tokenised strings, computed here directly."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    return float(Cider().compute_score(gts, res)[0])


NO_METEOR = EvalConfig(tasks=["clotho"], meteor=False)


@needs_java
def test_caption_cider_equals_pycocoevalcap_and_a_hand_value(media_root):
    for name in ("clotho", "audiocaps"):
        task = get_task(name)
        data = task.load(media_root)
        preds = {s.id: f"a woman says {w}" for s, w in zip(data.test, ("one", "a number", "hello"))}
        records = [{"id": s.id, "prediction": preds[s.id]} for s in data.test]
        scores, notes, records = task.score(data, data.test, records, NO_METEOR)
        direct = _cider({s.id: s.answers for s in data.test}, preds)
        assert direct > 0.1 and scores["cider"] == pytest.approx(100 * direct, rel=1e-9)
        assert records[0]["references"] == list(data.test[0].answers)
        assert notes == (data.notes if name == "audiocaps" else [])
    # by hand: each prediction equals its only reference and the two share no word, so every n-gram has the same
    # idf (log 2) on both sides: cosine 1 for n = 1..4, no length penalty -> CIDEr-D 10 per clip, x100 reported
    task = get_task("clotho")
    test = [
        Sample(id="a", image="", answers=("dog barks loudly outside",)),
        Sample(id="b", image="", answers=("rain hits the window",)),
    ]
    records = [{"id": s.id, "prediction": s.answers[0]} for s in test]
    scores, _, _ = task.score(TaskData(train=[], test=test), test, records, NO_METEOR)
    assert scores["cider"] == pytest.approx(1000.0, rel=1e-6)


# ------------------------------------------------------------------ end to end: harness and CLI


def test_esc50_ranks_with_the_clip_and_blind_without(media_root, model):
    out = evaluate_task(model, "esc50", shots=0, data_root=str(media_root), blind=True)
    data = get_task("esc50").load(media_root)
    classes = list(data.classes)
    cands = [f" {c}<|endofchunk|>" for c in classes]
    train = {d.id: d for d in data.train}
    for rec, s in zip(out["predictions"], data.test):  # 0-shot: two text-only demos, then the clip
        text = "".join(f"This is a sound of {train[i].target}<|endofchunk|>" for i in rec["demos"])
        direct = model.score([text + "<audio>This is a sound of"], [[]], cands, audios=[[s.image]])[0]
        assert rec["top5"][0] == int(direct.argmax()) and rec["top5_logprobs"][0] == pytest.approx(
            float(direct.max()), rel=1e-4
        )
    hits = sum(r["top5"][0] == s.label for r, s in zip(out["predictions"], data.test))
    assert out["metrics"]["accuracy"] == pytest.approx(100 * hits / 3)
    # the clip matters: two test clips give different log-likelihoods for the same text
    a, b = (model.score(["<audio>This is a sound of"], [[Audio(s.image)]], cands)[0] for s in data.test[:2])
    assert float((a - b).abs().max()) > 1e-5
    # blind: the query text alone, no demos, no audio; scored by hand
    blind = model.score(["This is a sound of"], [[]], cands)[0]
    assert out["blind"]["accuracy"] == pytest.approx(100 * sum(int(blind.argmax()) == s.label for s in data.test) / 3)


@needs_java
def test_generation_tasks_through_the_harness(media_root, model):
    from lmm.eval.vqa_normalize import normalize_answer

    cfg = EvalConfig(
        tasks="msrvtt_qa,msvd_qa,clotho,audiocaps",
        shots=[0, 1],
        data_root=str(media_root),
        trials=1,
        num_beams=1,
        max_new_tokens=3,
        meteor=False,
        blind=True,
        progress=False,
        batch_size=2,
    )
    report = evaluate(model, cfg)
    for name in ("msrvtt_qa", "msvd_qa", "clotho", "audiocaps"):
        data = get_task(name).load(media_root)
        by_id = {s.id: s for s in data.test}
        for shots in ("0", "1"):
            r = report["results"][name][shots]
            preds = {p["id"]: p["prediction"] for p in r["trials"][0]["predictions"]}
            assert list(preds) == [s.id for s in data.test]
            if name.endswith("_qa"):  # the reported accuracy is the hand count of the answers given
                hits = sum(normalize_answer(preds[i]) == normalize_answer(by_id[i].target) for i in preds)
                assert r["mean"]["accuracy"] == pytest.approx(100 * hits / len(preds))
            else:
                direct = _cider({i: by_id[i].answers for i in preds}, preds)
                assert r["mean"]["cider"] == pytest.approx(100 * direct, abs=1e-9)
            assert set(r["blind"]) >= {r["primary_metric"]}
    assert report["notes"]["audiocaps"] == load_audiocaps(media_root).notes

    # a 1-shot record is what model.generate answers for that prompt with the demo's and the query's video
    rec = report["results"]["msvd_qa"]["1"]["trials"][0]["predictions"][0]
    data = load_msvd_qa(media_root)
    demo, query = next(d for d in data.train if d.id == rec["demos"][0]), data.test[0]
    prompt = (
        f"<video>Question:{demo.question} Short answer:{demo.target}<|endofchunk|>"
        f"<video>Question:{query.question} Short answer:"
    )
    assert rec["raw"] == model.generate(prompt, videos=[demo.image, query.image], max_new_tokens=3, num_beams=1)
    # the blind baseline (shot-independent) is reported beside every shot count
    blind = get_task("clotho").blind_baseline(model, load_clotho(media_root).test, load_clotho(media_root), cfg)
    assert report["results"]["clotho"]["0"]["blind"] == report["results"]["clotho"]["1"]["blind"] == blind


class Recorder:
    """The real model, with every generate / score call's prompts and media written down."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, prompts, images=None, **kw):
        self.calls.append((list(prompts), images))
        return self.model.generate(prompts, images, **kw)

    def score(self, prompts, images, candidates, **kw):
        self.calls.append((list(prompts), images))
        return self.model.score(prompts, images, candidates, **kw)


def test_blind_baselines_ask_each_query_alone_without_media(media_root, model):
    cfg = EvalConfig(tasks=["msvd_qa"], num_beams=1, max_new_tokens=3, meteor=False, batch_size=8)
    expected = {
        ("msvd_qa", "flamingo"): [f"Question:{q} Short answer:" for _, _, q, _ in QA["test"]],
        ("esc50", "flamingo"): ["This is a sound of"],  # one distinct prompt, asked once
        ("clotho", "flamingo"): ["Output:"],
    }
    for (name, style), prompts_ in expected.items():
        task = get_task(name).with_prompt_style(style)
        data = task.load(media_root)
        spy = Recorder(model)
        metrics = task.blind_baseline(spy, data.test, data, cfg)
        assert spy.calls == [(prompts_, [[] for _ in prompts_])]
        if name == "msvd_qa":  # the metric of exactly those answers
            outs = model.generate(prompts_, max_new_tokens=3, num_beams=1)
            records = [{"id": s.id, "prediction": postprocess_vqa(o)} for s, o in zip(data.test, outs)]
            assert metrics == task.score(data, data.test, records, cfg)[0]
    chat = get_task("msvd_qa").with_prompt_style("chat")
    spy = Recorder(model)
    data = chat.load(media_root)
    chat.blind_baseline(spy, data.test[:1], data, cfg)
    ((prompts_, media),) = spy.calls
    assert prompts_ == [model.render_chat([{"role": "user", "content": QA["test"][0][2]}])[0]] and media == [[]]


def _cli(*args):
    from lmm.cli.eval import register

    app = typer.Typer()

    @app.callback()
    def main():  # a group, as in the real `lmm` app
        pass

    register(app)
    return CliRunner().invoke(app, ["eval", *map(str, args)])


@needs_java
def test_lmm_eval_runs_every_media_task(media_root, model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "results.json"
    result = _cli(
        "--model", tmp_path / "model", "--tasks", ",".join(MEDIA_TASKS), "--data-root", media_root,
        "--shots", "0,1", "--limit", 2, "--trials", 1, "--batch-size", 2, "--num-beams", 1,
        "--max-new-tokens", 3, "--no-meteor", "--no-progress", "--blind", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report["results"]) == MEDIA_TASKS
    for task in MEDIA_TASKS:
        for shots in ("0", "1"):
            r = report["results"][task][shots]
            assert r["n"] == 2 and isinstance(r["mean"][r["primary_metric"]], float)
            assert isinstance(r["blind"][r["primary_metric"]], float)
            preds = json.loads(Path(r["trials"][0]["predictions_file"]).read_text())
            assert len(preds) == 2 and all(isinstance(p["prediction"], str) and p["id"] for p in preds)
            assert all(len(p["demos"]) == (1 if shots == "1" else 2) for p in preds)
    assert report["results"]["esc50"]["0"]["primary_metric"] == "accuracy"
    assert "1 of 3 test clips" in report["notes"]["audiocaps"][1]
    for task in MEDIA_TASKS:
        assert task in result.output  # the summary table
    # the saved and reloaded model answers as the one in memory
    api = evaluate_task(model, "esc50", shots=0, data_root=str(media_root), limit=2)
    cli_preds = json.loads(Path(report["results"]["esc50"]["0"]["trials"][0]["predictions_file"]).read_text())
    assert [p["top5"] for p in cli_preds] == [p["top5"] for p in api["predictions"]]
