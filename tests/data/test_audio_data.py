"""Audio through the data pipeline: real recordings (Debian's asterisk-core-sounds-en-wav, 8 kHz speech) in
conversation JSON, webdataset shards, parquet with the HF `Audio` feature and OBELICS documents -> batches with
`media_inputs["audio"]` (B, M, F, ...) beside `pixel_values`; bad clips skipped and counted by reason."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm.data import DataConfig, build_loader
from lmm.data.audio import decode_audio, encode_audio
from lmm.data.errors import DataError
from lmm.data.inspect import format_inspection, inspect_dataset

from .conftest import draw_image, image_bytes

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
pytestmark = pytest.mark.skipif(
    not (SOUNDS / "digits").is_dir(), reason="needs Debian's asterisk-core-sounds-en-wav (.ci/run installs it)"
)
CHUNK = 4000  # test processor: 0.25 s windows, so clips of different lengths take different chunk counts


def chunker(wave: np.ndarray) -> torch.Tensor:
    """A stand-in for an audio encoder's `preprocess`: the waveform in zero-padded windows, (chunks, CHUNK)."""
    n = math.ceil(len(wave) / CHUNK)
    out = torch.zeros(n * CHUNK)
    out[: len(wave)] = torch.from_numpy(wave)
    return out.view(n, CHUNK)


def digit(i: int) -> Path:
    return SOUNDS / "digits" / f"{i}.wav"


@pytest.fixture(scope="module")
def tok():
    from lmm.testing import tiny_tokenizer
    from lmm.tokens import add_media_tokens, add_tokens

    t = tiny_tokenizer()
    add_media_tokens(t)
    add_tokens(t, ["<audio>"])
    return t


def loader(tok, transform, datasets, processors=None, **kw):
    cfg = DataConfig.from_dict(
        {"datasets": datasets, "batch_size": 4, "epochs": 1, "max_tokens": 256, "log_bad_samples": False, **kw}
    )
    procs = {"audio": chunker} if processors is None else processors
    return build_loader(cfg, tok, transform, media_processors=procs)


def rows_audio(batch, b: int) -> list[torch.Tensor]:
    """The audio items of row b, each trimmed to its real chunks (by the frame mask when there is one)."""
    x = batch["media_inputs"]["audio"][b]
    mask = batch.get("media_frame_mask", {}).get("audio")
    n = int((batch["input_ids"][b] == AUDIO_ID[0]).sum())
    return [x[k][mask[b, k]] if mask is not None else x[k] for k in range(n)]


AUDIO_ID: list[int] = []


@pytest.fixture(autouse=True)
def _audio_id(tok):
    AUDIO_ID[:] = [tok.convert_tokens_to_ids("<audio>")]


def test_conversation_json_audio_paths_become_the_decoded_chunks(tmp_path, tok, transform):
    draw_image(3).save(tmp_path / "im.png")
    rows = [
        {
            "id": "a",
            "audio": str(digit(1)),
            "conversations": [{"from": "human", "value": "<audio>\nWhat digit?"}, {"from": "gpt", "value": "one"}],
        },
        # no marker: the clip goes first in the first user turn (LLaVA's rule for images)
        {
            "id": "b",
            "audio": [str(digit(2))],
            "conversations": [{"from": "human", "value": "What digit?"}, {"from": "gpt", "value": "two"}],
        },
        # two clips and an image, markers in the text: media in text order
        {
            "id": "c",
            "image": "im.png",
            "audio": ["digits/3.wav", "letters/a.wav"],
            "conversations": [
                {"from": "human", "value": "<audio> then <image> then <audio>?"},
                {"from": "gpt", "value": "three a"},
            ],
        },
        # OpenAI-style parts, base64 input_audio as the server receives it
        {
            "id": "d",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_audio",
                            "input_audio": {
                                "data": __import__("base64").b64encode(digit(4).read_bytes()).decode(),
                                "format": "wav",
                            },
                        },
                        {"type": "text", "text": "Digit?"},
                    ],
                },
                {"role": "assistant", "content": "four"},
            ],
        },
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ld = loader(tok, transform, [{"path": str(path), "shuffle": False, "image_root": str(SOUNDS)}])
    # image_root resolves the relative audio paths; the image is absolute in the test below
    batches = list(ld)
    assert ld.bad_sample_counts().get("missing_image", 0) == 1  # "im.png" is not under SOUNDS: row c skipped
    (batch,) = batches
    assert batch["input_ids"].shape[0] == 3 and "pixel_values" not in batch  # audio-only batch: no image slots
    want = [digit(1), digit(2), digit(4)]
    for b, p in enumerate(want):
        (got,) = rows_audio(batch, b)
        torch.testing.assert_close(got, chunker(decode_audio(str(p))))
    lengths = {len(decode_audio(str(p))) for p in want}
    assert len(lengths) > 1 and "audio" in batch["media_frame_mask"]  # different chunk counts: a mask
    assert batch["media_frame_mask"]["audio"].sum().item() == sum(
        math.ceil(n / CHUNK) for n in map(len, (decode_audio(str(p)) for p in want))
    )
    # the marker never carries a loss; the answer does
    labels = batch["labels"][batch["input_ids"] == AUDIO_ID[0]]
    assert (labels == -100).all()

    rows[2]["image"] = str(tmp_path / "im.png")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (batch,) = list(loader(tok, transform, [{"path": str(path), "shuffle": False, "image_root": str(SOUNDS)}]))
    ids = batch["input_ids"][2].tolist()
    image_id = tok.convert_tokens_to_ids("<image>")
    order = [t for t in ids if t in (image_id, AUDIO_ID[0])]
    assert order == [AUDIO_ID[0], image_id, AUDIO_ID[0]]
    first, second = rows_audio(batch, 2)
    torch.testing.assert_close(first, chunker(decode_audio(str(digit(3)))))
    torch.testing.assert_close(second, chunker(decode_audio(str(SOUNDS / "letters" / "a.wav"))))
    assert batch["pixel_values"].shape[:3] == (4, 1, 1)  # the image of row 2 beside the audio


def _shard_samples():
    wav = digit(5).read_bytes()
    good = [
        {"__key__": "wav", "wav": wav, "txt": b"five"},
        {
            "__key__": "flac",
            "flac": encode_audio(decode_audio(wav), 16000, "flac"),
            "json": json.dumps({"caption": "five flac"}).encode(),
        },
        {"__key__": "mp3", "mp3": encode_audio(decode_audio(str(digit(6))), 16000, "mp3"), "txt": b"six"},
    ]
    bad = [
        {"__key__": "truncated", "wav": wav[: len(wav) // 2], "txt": b"cut"},
        {"__key__": "zero", "wav": b"", "txt": b"nothing"},
        {"__key__": "jpeg", "wav": image_bytes(1), "txt": b"a picture"},
        {"__key__": "long", "wav": (SOUNDS / "conf-adminmenu.wav").read_bytes(), "txt": b"too long"},
    ]
    return good, bad


@pytest.mark.parametrize("workers", [0, 2])
def test_webdataset_audio_pairs_and_bad_clips_counted_by_reason(
    tmp_path, tok, transform, write_tar, monkeypatch, workers
):
    good, bad = _shard_samples()
    long_seconds = len(decode_audio(bad[-1]["wav"])) / 16000
    monkeypatch.setenv("LMM_MAX_AUDIO_SECONDS", "5")  # the 19 s menu prompt is over it, the digits are not
    assert long_seconds > 5
    order = [good[0], bad[0], good[1], bad[1], good[2], bad[2], bad[3]]  # both shards hold a good clip
    shards = write_tar(str(tmp_path / "shard-%03d.tar"), order, maxcount=4)
    ld = loader(tok, transform, [{"path": str(tmp_path / "shard-{000..001}.tar")}], num_workers=workers)
    got = {}
    for batch in ld:
        for b in range(batch["input_ids"].shape[0]):
            text = tok.decode([t for t, lab in zip(batch["input_ids"][b], batch["labels"][b]) if lab != -100])
            got[text.split("<")[0].strip()] = rows_audio(batch, b)[0]
    assert len(shards) == 2
    assert set(got) == {"five", "five flac", "six"}
    torch.testing.assert_close(got["five"], chunker(decode_audio(digit(5).read_bytes())))
    counts = ld.bad_sample_counts()
    assert counts == {"corrupt_audio": 2, "empty_audio": 1, "audio_too_long": 1}, counts


def test_parquet_with_the_hf_audio_feature(tmp_path, tok, transform):
    import datasets

    files = [digit(7), digit(8), SOUNDS / "letters" / "b.wav"]
    ds = datasets.Dataset.from_dict(
        {"audio": [{"bytes": p.read_bytes(), "path": p.name} for p in files], "text": ["seven", "eight", "bee"]}
    ).cast_column("audio", datasets.Audio(decode=False))
    ds.to_parquet(str(tmp_path / "a.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "a.parquet"), split="train")
    assert isinstance(loaded.features["audio"], datasets.Audio)  # the feature survives the file
    for streaming in (False, True):
        (batch,) = list(
            loader(tok, transform, [{"path": str(tmp_path / "a.parquet"), "shuffle": False, "streaming": streaming}])
        )
        for b, p in enumerate(files):
            torch.testing.assert_close(rows_audio(batch, b)[0], chunker(decode_audio(str(p))))


def test_interleaved_document_with_audio_and_images_and_a_mixture(tmp_path, tok, transform):
    doc = {
        "texts": ["Listen:", None, "That was nine. Now look:", None, "a picture."],
        "images": [None, None, None, str(tmp_path / "im.jpg"), None],
        "audios": [None, str(digit(9)), None, None, None],
    }
    (tmp_path / "im.jpg").write_bytes(image_bytes(2))
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    (batch,) = list(loader(tok, transform, [{"path": str(tmp_path / "docs.jsonl"), "format": "obelics"}]))
    ids = batch["input_ids"][0].tolist()
    image_id, audio_id = tok.convert_tokens_to_ids("<image>"), AUDIO_ID[0]
    assert [t for t in ids if t in (image_id, audio_id)] == [audio_id, image_id]
    torch.testing.assert_close(rows_audio(batch, 0)[0], chunker(decode_audio(str(digit(9)))))
    assert batch["pixel_values"].shape[:2] == (1, 1)
    first_loss = next(i for i, lab in enumerate(batch["labels"][0].tolist()) if lab != -100)
    assert first_loss > ids.index(audio_id)  # no loss before the first medium (Flamingo's rule)

    # a mixture: an image dataset and an audio dataset in one stage -> batches holding both
    imgs = [{"jpg": image_bytes(i), "txt": f"picture {i}".encode(), "__key__": f"i{i}"} for i in range(6)]
    auds = [{"wav": digit(i).read_bytes(), "txt": f"digit {i}".encode(), "__key__": f"a{i}"} for i in range(6)]
    import webdataset as wds

    for name, samples in (("img.tar", imgs), ("aud.tar", auds)):
        with wds.TarWriter(str(tmp_path / name)) as w:
            for s in samples:
                w.write(s)
    ld = loader(
        tok, transform, [{"path": str(tmp_path / "img.tar")}, {"path": str(tmp_path / "aud.tar")}], batch_size=12
    )
    (batch,) = list(ld)
    n_img = (batch["input_ids"] == image_id).sum(1)
    n_aud = (batch["input_ids"] == audio_id).sum(1)
    assert n_img.sum() == 6 and n_aud.sum() == 6 and ((n_img + n_aud) == 1).all()
    assert batch["pixel_values"].shape[:2] == (12, 1) and batch["media_inputs"]["audio"].shape[:2] == (12, 1)


def test_audio_without_an_audio_encoder_is_counted_and_fails_a_pure_audio_dataset(tmp_path, tok, transform):
    rows = [
        {
            "audio": str(digit(i)),
            "conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(3)
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match="no_encoder"):
        loader(tok, transform, [{"path": str(tmp_path / "a.json")}], processors={})


def test_video_conversations(tmp_path, tok, transform):
    from PIL import Image

    from lmm.data.video import write_video

    frames = [Image.new("RGB", (32, 32), (i * 30, 0, 0)) for i in range(6)]
    write_video(str(tmp_path / "v.mp4"), frames)
    rows = [
        {
            "video": "v.mp4",
            "conversations": [
                {"from": "human", "value": "<video>\nWhat happens?"},
                {"from": "gpt", "value": "it reddens"},
            ],
        },
        {
            "video": "v.mp4",
            "conversations": [{"from": "human", "value": "What happens?"}, {"from": "gpt", "value": "red"}],
        },
    ]
    (tmp_path / "v.json").write_text(json.dumps(rows))
    (batch,) = list(
        loader(tok, transform, [{"path": str(tmp_path / "v.json"), "image_root": str(tmp_path)}], num_frames=3)
    )
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [1, 1]  # <video> placed by <image>
    assert batch["pixel_values"].shape[:3] == (2, 1, 3)  # one item of 3 frames per row
    reds = batch["pixel_values"][0, 0, :, 0].mean((1, 2))
    assert reds[0] < reds[1] < reds[2]  # frames in time order


def test_inspect_shows_audio_items_and_counts_bad_ones(tmp_path, tok, transform):
    rows = [
        {
            "audio": str(digit(i)),
            "conversations": [{"from": "human", "value": "<audio>Which?"}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(3)
    ]
    rows.append(
        {
            "audio": str(tmp_path / "missing.wav"),
            "conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "x"}],
        }
    )
    (tmp_path / "empty.wav").write_bytes(b"")
    rows.append(
        {
            "audio": str(tmp_path / "empty.wav"),
            "conversations": [{"from": "human", "value": "<audio>"}, {"from": "gpt", "value": "x"}],
        }
    )
    (tmp_path / "a.json").write_text(json.dumps(rows))
    cfg = DataConfig.from_dict({"datasets": [{"path": str(tmp_path / "a.json")}]})
    rep = inspect_dataset(cfg.datasets[0], cfg, tok)
    assert rep.good == 3 and rep.bad == {"missing_audio": 1, "empty_audio": 1}
    text = format_inspection(rep)
    secs = len(decode_audio(str(digit(0)))) / 16000
    assert f"audio {secs:.2f} s (8000 Hz source), 1 chunk(s)" in text
    assert "audio clips: 3" in text and "missing_audio: 1" in text and "<audio>" in text
    assert os.path.basename(str(tmp_path / "missing.wav")) in text  # the first missing clip is named


def test_packed_rows_carry_each_segments_clips_in_order(tmp_path, tok, transform):
    rows = [
        {
            "audio": str(digit(i)),
            "conversations": [{"from": "human", "value": "<audio>Digit?"}, {"from": "gpt", "value": str(i)}],
        }
        for i in range(6)
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = [{"path": str(tmp_path / "a.json"), "shuffle": False}]
    batches = list(loader(tok, transform, ds, packing=True, max_tokens=120, batch_size=1))
    clips = iter(range(6))
    for batch in batches:
        n = int((batch["input_ids"][0] == AUDIO_ID[0]).sum())
        assert n >= 2 and batch["segment_ids"][0].max() >= n  # several samples (and the padding) per row
        for got in rows_audio(batch, 0):
            torch.testing.assert_close(got, chunker(decode_audio(str(digit(next(clips))))))
    assert next(clips, None) is None  # every clip once, in order


def test_the_spoken_digits_example_writes_two_voices_the_loader_reads(tmp_path, tok, transform):
    """examples/spoken_digits.py: training clips of one voice, test clips of another (never the same recording),
    every digit in both, real 16 kHz WAVs the loader decodes without a bad sample."""
    import importlib.util

    pytest.importorskip("spokennumbers", reason="pip install spokennumbers (the dev extra)")
    spec = importlib.util.spec_from_file_location(
        "spoken_digits", Path(__file__).parents[2] / "examples/spoken_digits.py"
    )
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    allison, other = ex.sources()
    assert not set(allison) & set(other)
    assert ex.write(tmp_path, "train", allison, 1, seed=0) == 20 and ex.write(tmp_path, "test", other, 0, seed=1) == 10
    train, test = (json.loads((tmp_path / f"{s}.json").read_text()) for s in ("train", "test"))
    words = {
        s: sorted({r["conversations"][-1]["value"] for r in rows}) for s, rows in (("train", train), ("test", test))
    }
    assert words["train"] == words["test"] == sorted(ex.WORDS)
    dataset = {"path": str(tmp_path / "test.json"), "shuffle": False, "image_root": str(tmp_path)}
    ld = loader(tok, transform, [dataset], batch_size=32)
    (batch,) = list(ld)
    assert batch["input_ids"].shape[0] == 10 and batch["media_inputs"]["audio"].shape[:2] == (10, 1)
    assert ld.bad_sample_counts() == {}
