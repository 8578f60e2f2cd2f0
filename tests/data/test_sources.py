"""Each on-disk format, written as real files, loaded through build_loader."""

import json
import os

import datasets
import pytest

from lmm.data import DataConfig, build_loader
from lmm.data.video import write_video


def load_all(tokenizer, transform, datasets_cfg, **kw):
    cfg = DataConfig.from_dict({"datasets": datasets_cfg, "batch_size": 64, "epochs": 1, "max_tokens": 128, **kw})
    loader = build_loader(cfg, tokenizer, transform)
    return list(loader), loader


def test_webdataset_pairs_jpg_png_webp_txt_json_brace_pattern(
    tmp_path, tokenizer, transform, write_tar, img, decode_rows
):
    samples = []
    for i in range(12):
        ext = ["jpg", "png", "webp"][i % 3]
        cap = {"txt": f"caption {i}"} if i % 2 else {"json": {"caption": f"caption {i}"}}
        samples.append(
            {"__key__": f"s{i:03d}", ext: img.bytes(i, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]), **cap}
        )
    write_tar(str(tmp_path / "shard-%03d.tar"), samples, maxcount=5)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".tar")]) == 3
    batches, loader = load_all(
        tokenizer, transform, [{"path": str(tmp_path / "shard-{000..002}.tar"), "shuffle": False}]
    )
    texts, colors = [], []
    for b in batches:
        assert b["pixel_values"].shape[1:3] == (1, 1)
        for t, px in zip(decode_rows(b), b["pixel_values"][:, 0, 0]):
            texts.append(t)
            colors.append(img.mean(px))
    assert texts == [f"<image>caption {i}<|endofchunk|><|endoftext|>" for i in range(12)]
    for i, c in enumerate(colors):
        assert img.close(c, img.color(i)), (i, c, img.color(i))
    assert loader.bad_sample_counts() == {}


def _image_table(n, img):
    return {
        "image": [{"bytes": img.bytes(i, "PNG"), "path": None} for i in range(n)],
        "caption": [f"caption {i}" for i in range(n)],
    }


@pytest.mark.parametrize("streaming", [False, True])
def test_parquet_with_image_column(tmp_path, tokenizer, transform, img, decode_rows, streaming):
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(_image_table(6, img), features=features)
    ds.to_parquet(str(tmp_path / "part-0.parquet"))
    batches, _ = load_all(
        tokenizer, transform, [{"path": str(tmp_path / "*.parquet"), "shuffle": False, "streaming": streaming}]
    )
    (b,) = batches
    assert decode_rows(b) == [f"<image>caption {i}<|endofchunk|><|endoftext|>" for i in range(6)]
    assert all(img.close(img.mean(b["pixel_values"][i, 0, 0]), img.color(i)) for i in range(6))


def test_save_to_disk_folder_and_arrow_file(tmp_path, tokenizer, transform, img, decode_rows):
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(_image_table(4, img), features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    (b,) = load_all(tokenizer, transform, [{"path": str(tmp_path / "saved"), "shuffle": False}])[0]
    assert decode_rows(b)[3] == "<image>caption 3<|endofchunk|><|endoftext|>"
    arrow = [f for f in os.listdir(tmp_path / "saved") if f.endswith(".arrow")]
    (b,) = load_all(
        tokenizer, transform, [{"path": str(tmp_path / "saved" / arrow[0]), "source": "arrow", "shuffle": False}]
    )[0]
    assert len(decode_rows(b)) == 4


def test_llava_json_with_relative_images_and_multiple_images(tmp_path, tokenizer, transform, img, decode_rows):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        img.draw(i).save(tmp_path / "imgs" / f"{i}.jpg", quality=95)
    records = [
        {
            "id": "a",
            "image": "0.jpg",
            "conversations": [{"from": "human", "value": "<image>\nwhat color?"}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "b",
            "images": ["1.jpg", "2.jpg"],
            "conversations": [
                {"from": "human", "value": "first <image> then <image> same?"},
                {"from": "gpt", "value": "no"},
            ],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(records))
    (b,) = load_all(
        tokenizer,
        transform,
        [{"path": str(tmp_path / "llava.json"), "image_root": str(tmp_path / "imgs"), "shuffle": False}],
    )[0]
    texts = decode_rows(b)
    assert texts[1].startswith("<|im_start|>user\nfirst <image> then <image> same?<|im_end|>")
    assert b["pixel_values"].shape[1] == 2  # M = most media in a row
    assert img.close(img.mean(b["pixel_values"][1, 1, 0]), img.color(2))
    assert b["pixel_values"][0, 1].abs().sum() == 0  # unused slot is zeros
    labelled = tokenizer.decode(b["labels"][0][b["labels"][0] != -100])
    assert labelled == "red<|im_end|>\n"


def test_openai_jsonl_and_mmc4_and_obelics_in_tar(tmp_path, tokenizer, transform, img, write_tar, decode_rows):
    import base64

    mmc4 = {
        "__key__": "doc0",
        "json": {
            "text_list": ["Intro sentence.", "About the picture."],
            "image_info": [
                {"image_base64": base64.b64encode(img.bytes(5)).decode(), "matched_text_index": 1, "matched_sim": 0.9}
            ],
        },
    }
    write_tar(str(tmp_path / "mmc4-%03d.tar"), [mmc4])
    (b,) = load_all(tokenizer, transform, [{"path": str(tmp_path / "mmc4-000.tar")}])[0]
    assert decode_rows(b) == ["Intro sentence.<image>About the picture.<|endofchunk|><|endoftext|>"]
    assert tokenizer.decode(b["labels"][0][b["labels"][0] != -100]) == "About the picture.<|endofchunk|><|endoftext|>"

    features = datasets.Features(
        {"texts": datasets.Sequence(datasets.Value("string")), "images": datasets.Sequence(datasets.Image())}
    )
    datasets.Dataset.from_dict(
        {
            "texts": [["Look:", None, "a square"]],
            "images": [[None, {"bytes": img.bytes(1, "PNG"), "path": None}, None]],
        },
        features=features,
    ).to_parquet(str(tmp_path / "obelics.parquet"))
    (b,) = load_all(tokenizer, transform, [{"path": str(tmp_path / "obelics.parquet")}])[0]
    assert decode_rows(b) == ["Look:<image>a square<|endofchunk|><|endoftext|>"]

    img.draw(3).save(tmp_path / "p.png")
    line = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(tmp_path / "p.png")}, {"type": "text", "text": "shape?"}],
            },
            {"role": "assistant", "content": "square"},
        ]
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(line) + "\n")
    (b,) = load_all(tokenizer, transform, [{"path": str(tmp_path / "chat.jsonl")}])[0]
    assert "<image>shape?" in decode_rows(b)[0]
    assert img.close(img.mean(b["pixel_values"][0, 0, 0]), img.color(3))


def test_video_in_tar_and_by_path_with_frame_mask(tmp_path, tokenizer, transform, img, write_tar, decode_rows):
    def clip(path, n):
        write_video(str(path), [img.draw(i) for i in range(n)])

    clip(tmp_path / "long.mp4", 12)
    clip(tmp_path / "short.mp4", 2)
    write_tar(
        str(tmp_path / "vid-%03d.tar"),
        [{"__key__": "v0", "mp4": (tmp_path / "long.mp4").read_bytes(), "txt": "a long clip"}],
    )
    (tmp_path / "vids.jsonl").write_text(json.dumps({"video": str(tmp_path / "short.mp4"), "caption": "short"}) + "\n")
    cfg = [
        {"path": str(tmp_path / "vid-000.tar"), "format": "video", "num_frames": 4},
        {"path": str(tmp_path / "vids.jsonl"), "format": "video"},
    ]
    batches, _ = load_all(tokenizer, transform, cfg, num_frames=4)
    (b,) = batches
    assert b["pixel_values"].shape[:3] == (2, 1, 4)
    texts = decode_rows(b)
    long_row = texts.index("<image>a long clip<|endofchunk|><|endoftext|>")
    short_row = 1 - long_row
    assert b["frame_mask"][long_row, 0].tolist() == [True] * 4
    assert b["frame_mask"][short_row, 0].tolist() == [True, True, False, False]
    # frames are sampled uniformly: 12 frames, 4 bins -> indices 1, 4, 7, 10
    got = [img.mean(b["pixel_values"][long_row, 0, f]) for f in range(4)]
    assert all(img.close(g, img.color(i), tol=25) for g, i in zip(got, [1, 4, 7, 10])), got
