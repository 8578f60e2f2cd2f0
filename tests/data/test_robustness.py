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
        ("missing_image", {"json": {"image": str(pics / "nope.png"),
                                    "conversations": [{"from": "human", "value": "<image>hi"},
                                                      {"from": "gpt", "value": "x"}]}}),
        ("empty_text", {"jpg": jpeg, "txt": ""}),
        ("bad_record", {"jpg": jpeg, "json": b"{broken"}),
        ("too_many_images", {"json": {"texts": ["doc"] + [None] * 5,
                                      "images": [None] + [str(pics / f"{i}.png") for i in range(5)]}}),
        ("corrupt_video", {"mp4": b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50, "txt": "broken clip"}),
        ("corrupt_video", {"mp4": clip.read_bytes()[:200], "txt": "cut clip"}),
        ("image_count_mismatch", {"json": {"image": str(pics / "0.png"), "conversations": [
            {"from": "human", "value": "<image><image>two?"}, {"from": "gpt", "value": "one"}]}}),
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
def test_fuzz_shard_yields_exactly_the_good_samples_and_counts_the_bad(tmp_path, tokenizer, transform, img,
                                                                       write_tar, decode_rows, workers, fast, caplog):
    """Both image paths: PIL images into a torchvision transform, and the fast path (torchvision.io decoding,
    uint8 ImageTransform) where PIL still judges every file torchvision refuses."""
    from lmm.backbones.image_transform import ImageTransform

    good, expected = make_fuzz_shard(tmp_path, img, write_tar)
    cfg = DataConfig.from_dict({"datasets": [{"path": str(tmp_path / "fuzz-000.tar")}], "batch_size": 5,
                                "epochs": 1, "max_images": 3, "num_workers": workers, "num_frames": 2})
    loader = build_loader(cfg, tokenizer, ImageTransform(32, (0.5,) * 3, (0.5,) * 3) if fast else transform)
    with caplog.at_level(logging.WARNING, logger="lmm.data"):
        batches = list(loader)
    assert all(b["pixel_values"].dtype == (torch.uint8 if fast else torch.float32) for b in batches)
    assert sorted(captions_of(batches, decode_rows)) == good
    assert loader.bad_sample_counts() == expected
    if workers == 0:  # worker processes log in their own process
        assert "fuzz-000.tar:k" in caplog.text and "corrupt_image" in caplog.text
    assert "too_many_images: 1" in loader.report()


def test_truncated_shard_keeps_what_was_read_and_counts_once(tmp_path, tokenizer, transform, img, write_tar,
                                                             decode_rows):
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
    write_tar(str(tmp_path / "nocap-%03d.tar"), [{"__key__": f"k{i}", "jpg": img.bytes(i), "cls": b"1"}
                                                 for i in range(3)])
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
