"""Bad input never stops a run and is never silently wrong: skipped, counted per reason, logged."""

import json
import logging
import random
import tarfile

import pytest
import torch

from lmm.data import DataConfig, DataError, build_loader
from lmm.data.video import write_video


def captions_of(batches, decode_rows):
    out = []
    for b in batches:
        for t in decode_rows(b):
            out.append(t.split("<image>")[-1].split("<|endofchunk|>")[0])
    return out


def make_fuzz_shard(tmp_path, img, write_tar):
    """40 samples, 12 of them (30%) bad in every way a record can be bad; returns (good captions, expected counts)."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(5):
        img.draw(i).save(pics / f"{i}.png")
    clip = tmp_path / "ok.mp4"
    write_video(str(clip), [img.draw(i) for i in range(3)])
    jpeg = img.bytes(7)
    bad = [
        ("corrupt_image", {"jpg": b"\xff\xd8 this is not a jpeg" * 10, "txt": "bad"}),
        ("corrupt_image", {"jpg": jpeg[: len(jpeg) // 2], "txt": "truncated jpeg"}),
        ("corrupt_image", {"png": img.bytes(8, "PNG")[:60], "txt": "truncated png"}),
        ("empty_image", {"jpg": b"", "txt": "zero bytes"}),
        ("missing_image", {"txt": "caption without image"}),
        (
            "missing_image",
            {
                "json": {
                    "image": str(pics / "nope.png"),
                    "conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "x"}],
                }
            },
        ),
        ("empty_text", {"jpg": jpeg, "txt": ""}),
        ("bad_record", {"jpg": jpeg, "json": b"{broken"}),
        (
            "too_many_images",
            {"json": {"texts": ["doc"] + [None] * 5, "images": [None] + [str(pics / f"{i}.png") for i in range(5)]}},
        ),
        ("corrupt_video", {"mp4": b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50, "txt": "broken clip"}),
        ("corrupt_video", {"mp4": clip.read_bytes()[:200], "txt": "cut clip"}),
        (
            "image_count_mismatch",
            {
                "json": {
                    "image": str(pics / "0.png"),
                    "conversations": [
                        {"from": "human", "value": "<image><image>two?"},
                        {"from": "gpt", "value": "one"},
                    ],
                }
            },
        ),
    ]
    good = [{"jpg": img.bytes(i), "txt": f"good {i}"} for i in range(28)]
    items = [("good", g) for g in good] + bad
    random.Random(0).shuffle(items)
    samples = [{"__key__": f"k{i:03d}", **rec} for i, (_, rec) in enumerate(items)]
    write_tar(str(tmp_path / "fuzz-%03d.tar"), samples)
    expected = {}
    for reason, _ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return sorted(f"good {i}" for i in range(28)), expected


def truncate_tar(path, sample_index: int) -> None:
    """Cut a tar file in the middle of the data of its `sample_index`-th member."""
    with tarfile.open(path) as tf:
        member = tf.getmembers()[sample_index]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


@pytest.mark.parametrize("workers,fast", [(0, False), (2, False), (0, True), (2, True)])
def test_fuzz_shard_yields_exactly_the_good_samples_and_counts_the_bad(
    tmp_path, tokenizer, transform, img, write_tar, decode_rows, workers, fast, caplog
):
    """Both image paths: PIL images into a torchvision transform, and the fast path (torchvision.io decoding,
    uint8 ImageTransform) where PIL still judges every file torchvision refuses."""
    from lmm.backbones.image_transform import ImageTransform

    good, expected = make_fuzz_shard(tmp_path, img, write_tar)
    cfg = DataConfig.from_dict(
        {
            "datasets": [{"path": str(tmp_path / "fuzz-000.tar")}],
            "batch_size": 5,
            "epochs": 1,
            "max_images": 3,
            "num_workers": workers,
            "num_frames": 2,
        }
    )
    loader = build_loader(cfg, tokenizer, ImageTransform(32, (0.5,) * 3, (0.5,) * 3) if fast else transform)
    with caplog.at_level(logging.WARNING, logger="lmm.data"):
        batches = list(loader)
    assert all(b["pixel_values"].dtype == (torch.uint8 if fast else torch.float32) for b in batches)
    assert sorted(captions_of(batches, decode_rows)) == good
    assert loader.bad_sample_counts() == expected
    if workers == 0:  # worker processes log in their own process
        assert "fuzz-000.tar:k" in caplog.text and "corrupt_image" in caplog.text
    assert "too_many_images: 1" in loader.report()


def test_truncated_shard_keeps_what_was_read_and_counts_once(
    tmp_path, tokenizer, transform, img, write_tar, decode_rows
):
    samples = [{"__key__": f"k{i}", "jpg": img.bytes(i), "txt": f"good {i}"} for i in range(6)]
    (path,) = write_tar(str(tmp_path / "cut-%03d.tar"), samples)
    truncate_tar(path, 8)  # member 8 = the jpg of sample 4 (members alternate jpg, txt)
    cfg = DataConfig.from_dict({"datasets": [{"path": path}], "batch_size": 4, "epochs": 1})
    loader = build_loader(cfg, tokenizer, transform)
    assert sorted(captions_of(list(loader), decode_rows)) == [f"good {i}" for i in range(4)]
    assert loader.bad_sample_counts() == {"truncated_shard": 1}


def test_unusable_datasets_fail_at_start_with_a_clear_message(tmp_path, tokenizer, transform, img, write_tar):
    def build(ds):
        return build_loader(DataConfig.from_dict({"datasets": [ds]}), tokenizer, transform)

    with pytest.raises(DataError, match="not found"):
        build({"path": str(tmp_path / "missing-{000..003}.tar")})
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataError, match="cannot read"):
        build({"path": str(tmp_path / "garbage.tar")})
    write_tar(
        str(tmp_path / "nocap-%03d.tar"), [{"__key__": f"k{i}", "jpg": img.bytes(i), "cls": b"1"} for i in range(3)]
    )
    with pytest.raises(DataError, match="empty_text"):
        build({"path": str(tmp_path / "nocap-000.tar")})
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError):
        build({"path": str(tmp_path / "empty.jsonl")})


def test_all_bad_epoch_midrun_is_an_error_not_a_hang(tmp_path, tokenizer, transform, img, write_tar):
    """A dataset whose probe passes but whose reader sees only bad records raises instead of spinning."""
    from lmm.data.encode import SampleEncoder
    from lmm.data.errors import BadSampleCounter
    from lmm.data.sources import build_source
    from lmm.data.stream import DatasetStream

    write_tar(str(tmp_path / "bad-%03d.tar"), [{"__key__": f"k{i}", "jpg": b"", "txt": "x"} for i in range(3)])
    dcfg = DataConfig.from_dict({"datasets": [{"path": str(tmp_path / "bad-000.tar")}]}).datasets[0]
    enc = SampleEncoder(tokenizer, transform)
    stream = DatasetStream(dcfg, build_source(dcfg), enc, 0, 0, 1, BadSampleCounter(log=False))
    with pytest.raises(DataError, match="every record"):
        stream.next()


def records_of_every_bad_type(img) -> tuple[list[dict], dict]:
    """Webdataset samples: record-level errors of each type (each must be one counted skip) + good ones."""
    import base64

    jpeg = img.bytes(3)
    b64 = base64.b64encode(jpeg).decode()

    def mmc4(**info):
        return {
            "json": json.dumps(
                {
                    "text_list": ["a sentence", "another"],
                    "image_info": [{"image_base64": b64, "matched_text_index": 0, **info}],
                }
            ).encode()
        }

    def conv(content):
        return {
            "jpg": jpeg,
            "json": json.dumps(
                {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "fine"}]}
            ).encode(),
        }

    bad = [
        ("bad_record", mmc4(matched_sim="very similar")),
        ("bad_record", mmc4(matched_sim=[0.3])),
        ("bad_record", mmc4(matched_text_index=None)),
        ("bad_record", mmc4(matched_text_index="first")),
        ("bad_record", {"json": json.dumps({"text_list": 5, "image_info": [{"image_base64": b64}]}).encode()}),
        ("bad_record", {"json": json.dumps({"text_list": ["x"], "image_info": {"image_base64": b64}}).encode()}),
        ("bad_record", {"json": json.dumps({"texts": 7, "images": [None]}).encode()}),
        ("bad_record", conv(["a string part", {"type": "image"}])),
        ("bad_record", conv({"type": "text", "text": "a dict, not a list"})),
        (
            "corrupt_image",
            {
                "json": json.dumps(
                    {"text_list": ["t"], "image_info": [{"image_base64": "abc", "matched_text_index": 0}]}
                ).encode()
            },
        ),  # bad padding
        ("bad_record", {"jpg": jpeg, "json": b"[" * 100_000 + b"]" * 100_000}),  # RecursionError in json
        ("bad_record", {"jpg": jpeg, "json": b'{"caption": "x", "n": ' + b"9" * 5000 + b"}"}),
        ("bad_record", {"jpg": jpeg, "json": b'{"caption": "lone \\ud800 surrogate"}'}),
    ]
    good = [{"jpg": img.bytes(i), "txt": f"good {i}"} for i in range(6)]
    good.append(
        {
            "json": json.dumps(
                {
                    "text_list": ["good mmc4", "doc"],
                    "image_info": [{"image_base64": b64, "matched_text_index": "1", "matched_sim": "0.5"}],
                }
            ).encode()
        }
    )
    items = [rec for _, rec in bad] + good
    random.Random(1).shuffle(items)
    expected = {}
    for reason, _ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return [{"__key__": f"r{i:03d}", **rec} for i, rec in enumerate(items)], expected


@pytest.mark.parametrize("workers", [0, 2])
def test_every_record_level_error_is_a_counted_skip(
    tmp_path, tokenizer, transform, img, write_tar, decode_rows, workers
):
    """Wrong types, bad base64, deeply nested JSON, huge numbers, lone surrogates: each one bad record counted
    by reason; the good records all come through and the run goes on."""
    samples, expected = records_of_every_bad_type(img)
    (path,) = write_tar(str(tmp_path / "types-%03d.tar"), samples)
    cfg = DataConfig.from_dict({"datasets": [{"path": path}], "batch_size": 4, "epochs": 1, "num_workers": workers})
    loader = build_loader(cfg, tokenizer, transform)
    texts = [t for b in loader for t in decode_rows(b)]
    assert sorted(t.split("<image>")[-1].split("<|endofchunk|>")[0] for t in texts if "mmc4" not in t) == [
        f"good {i}" for i in range(6)
    ]
    assert any("good mmc4" in t for t in texts)
    assert loader.bad_sample_counts() == expected


def test_parse_record_raises_only_bad_samples_for_hostile_records():
    """Straight at the parser: any record shape is a Sample or a BadSample, never another exception."""
    from lmm.data import BadSample
    from lmm.data.formats import parse_record

    hostile = [
        [1, 2],
        "text",
        None,
        {"json": 5},
        {"text_list": "abc", "image_info": []},
        {"text_list": ["a"], "image_info": [{"matched_text_index": 10**30, "image": "x.png"}]},
        {"texts": ["a", None], "images": [None, {"nested": {"deeper": []}}]},
        {
            "conversations": [
                {"from": "human", "value": [{"type": "text", "text": {"not": "text"}}]},
                {"from": "gpt", "value": "x"},
            ],
            "image": "x.png",
        },
        {"conversations": [{"from": 5, "value": "hi"}]},
        {"messages": [{"role": "user", "content": 3.5}, {"role": "assistant", "content": "x"}]},
        {"jpg": b"x", "txt": ["a", "list"]},
    ]
    for rec in hostile:
        for fmt in ("auto", "pair", "mmc4", "obelics", "conversation", "video"):
            try:
                parse_record(rec, fmt, key="k")
            except BadSample as e:
                assert e.key == "k"


def test_shard_member_over_the_byte_cap_is_not_read_and_is_counted(
    tmp_path, tokenizer, transform, img, write_tar, decode_rows, monkeypatch
):
    samples = [{"__key__": f"k{i}", "jpg": img.bytes(i), "txt": f"good {i}"} for i in range(4)]
    samples.insert(2, {"__key__": "big", "jpg": b"\xff\xd8" + b"\x00" * 50_000, "txt": "too big"})
    (path,) = write_tar(str(tmp_path / "cap-%03d.tar"), samples)
    monkeypatch.setenv("LMM_MAX_MEMBER_BYTES", "20000")
    cfg = DataConfig.from_dict({"datasets": [{"path": path}], "batch_size": 4, "epochs": 1})
    loader = build_loader(cfg, tokenizer, transform)
    assert sorted(captions_of(list(loader), decode_rows)) == [f"good {i}" for i in range(4)]
    assert loader.bad_sample_counts() == {"member_too_large": 1}


def test_sparse_tar_declaring_a_1_gib_member_is_refused_from_its_header(tmp_path, img):
    """A 10 KB GNU sparse tar whose jpg member is 1 GiB of holes: the reader never reads it (default 256 MiB cap)."""
    import shutil
    import subprocess

    from lmm.data import BadSample
    from lmm.data.formats import parse_record
    from lmm.data.sources import read_tar

    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar to write a sparse member")
    with open(tmp_path / "k1.jpg", "wb") as f:
        f.truncate(2**30)
    (tmp_path / "k1.txt").write_text("sparse")
    (tmp_path / "k2.jpg").write_bytes(img.bytes(2))
    (tmp_path / "k2.txt").write_text("fine")
    subprocess.run(["tar", "-S", "-cf", "sparse.tar", "k1.jpg", "k1.txt", "k2.jpg", "k2.txt"], cwd=tmp_path, check=True)
    assert (tmp_path / "sparse.tar").stat().st_size < 100_000
    errors = []
    records = list(read_tar(str(tmp_path / "sparse.tar"), lambda e, p: errors.append(e)))
    assert [k for k, _ in records] == ["k1", "k2"] and errors == []
    assert "jpg" not in records[0][1] and records[0][1]["txt"] == b"sparse"
    with pytest.raises(BadSample) as e:
        parse_record(records[0][1], key="k1")
    assert e.value.reason == "member_too_large" and "1073741824" in str(e.value)
    assert parse_record(records[1][1], key="k2").parts[1] == "fine"


def _webm(n_frames: int) -> bytes:
    """A VP8 WebM of n_frames grey frames (frame i has grey level i): WebM headers carry no frame count."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="webm") as c:
        s = c.add_stream("libvpx", rate=8)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(n_frames):
            for p in s.encode(av.VideoFrame.from_ndarray(np.full((32, 32, 3), i, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def test_video_without_a_frame_count_is_sampled_in_bounded_memory(monkeypatch):
    """A WebM (no frame count in its header) used to be decoded into a list of every frame; now only a thinned
    set of at most 2 x num_frames frames (plus the chosen ones) is ever converted and kept, the frames are spread
    over the whole clip, and a clip longer than MAX_DECODED_FRAMES is sampled by seeking."""
    import av
    import numpy as np

    import lmm.data.video as video

    if "libvpx" not in av.codecs_available:
        pytest.skip("PyAV without libvpx")
    data = _webm(240)
    kept = []
    real = video._rgb
    monkeypatch.setattr(video, "_rgb", lambda frame: kept.append(frame.pts) or real(frame))
    frames = video.sample_frames(data, 8)
    greys = [int(np.asarray(f)[..., 0].mean()) for f in frames]
    want = video.uniform_indices(240, 8)
    assert len(frames) == 8 and all(abs(g - w) <= 4 for g, w in zip(greys, want)), (greys, want)
    assert len(kept) <= 8 * 8, len(kept)  # not one conversion per frame (240)
    kept.clear()
    monkeypatch.setattr(video, "MAX_DECODED_FRAMES", 64)  # the clip is now "long": seek to each wanted frame
    frames = video.sample_frames(data, 8)
    greys = [int(np.asarray(f)[..., 0].mean()) for f in frames]
    assert len(kept) == 8 and all(abs(g - w) <= 4 for g, w in zip(greys, want)), (greys, want)


def test_video_frames_over_the_pixel_limit_are_refused_from_the_header(monkeypatch):
    import av

    from lmm.data import BadSample
    from lmm.data.video import sample_frames

    if "libvpx" not in av.codecs_available:
        pytest.skip("PyAV without libvpx")
    monkeypatch.setenv("LMM_MAX_IMAGE_PIXELS", "1000")  # 32 x 32 = 1024 pixels
    with pytest.raises(BadSample) as e:
        sample_frames(_webm(4), 2)
    assert e.value.reason == "image_too_large"
