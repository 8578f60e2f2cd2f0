"""The embedded easy-vqa data (its views and the data preparer that writes them), and `lmm data inspect`."""

import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from lmm.data import DataConfig, build_loader, easyvqa_records, easyvqa_samples

pytest.importorskip("easy_vqa")


def test_easyvqa_samples_and_views():
    test = list(easyvqa_samples("test"))
    assert len(test) == 9673
    s = test[0]
    assert set(s) == {"key", "image", "question", "answer"} and s["image"].endswith(".png")
    assert Image.open(s["image"]).size == (64, 64)
    vqa = easyvqa_records("test", "vqa")[0]
    assert vqa["conversations"][0]["value"] == "<image>\n" + s["question"]
    assert vqa["conversations"][1]["value"] == s["answer"]
    caps = easyvqa_records("test", "caption")
    assert 950 < len(caps) <= 1000  # images whose questions reveal neither shape nor colour are left out
    assert all(re.fullmatch(r"a (\w+ )?(circle|rectangle|triangle|shape)", c["caption"]) for c in caps)
    by_image = {c["image"]: c["caption"] for c in caps}
    for q in test:  # a caption never contradicts an answer about its image
        cap = by_image.get(q["image"])
        if cap and q["question"].startswith(("what shape", "what color")):
            assert q["answer"] in cap, (q, cap)
    doc = easyvqa_records("test", "fewshot", shots=2)[5]
    assert sum(x is not None for x in doc["images"]) == 3
    assert doc["texts"][-1] == f"Question: {test[5]['question']} Answer: {test[5]['answer']}"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The easy-vqa files as the data preparer writes them (`lmm data prepare easyvqa --out DIR`)."""
    from lmm.cli import app

    out = tmp_path_factory.mktemp("easyvqa")
    result = CliRunner().invoke(app, ["data", "prepare", "easyvqa", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.rsplit("/", 1)[-1] for p in result.output.split()) == [
        "test.json",
        "test_caption.json",
        "train.json",
        "train_caption.json",
    ]
    return out


def test_prepared_files_are_the_plain_views(prepared):
    import json

    test = json.loads((prepared / "test.json").read_text())
    assert test == easyvqa_records("test", "vqa")  # LLaVA-style conversations, package order
    assert all(r["image"].endswith(".png") and Image.open(r["image"]).size == (64, 64) for r in test[:5])
    assert json.loads((prepared / "train_caption.json").read_text()) == easyvqa_records("train", "caption")


def test_a_dataset_entry_names_its_preparer_and_is_written_on_first_use(tmp_path):
    from lmm.config import ConfigError
    from lmm.data import prepare_datasets

    cfg = DataConfig.from_dict(
        {"datasets": [{"path": str(tmp_path / "d" / "test.json"), "format": "conversation", "prepare": "easyvqa"}]}
    )
    assert prepare_datasets(cfg) == [str(tmp_path / "d" / "test.json")]
    assert (tmp_path / "d" / "train.json").is_file() and prepare_datasets(cfg) == []  # written once
    bad = DataConfig.from_dict({"datasets": [{"path": str(tmp_path / "e" / "nope.json"), "prepare": "easyvqa"}]})
    with pytest.raises(ConfigError, match="not nope.json"):
        prepare_datasets(bad)
    with pytest.raises(ConfigError, match="Did you mean 'easyvqa'"):
        prepare_datasets(
            DataConfig.from_dict({"datasets": [{"path": str(tmp_path / "x.json"), "prepare": "easyvqa2"}]})
        )


def test_easyvqa_through_the_loader(tokenizer, transform, prepared):
    cfg = DataConfig.from_dict(
        {
            "datasets": [
                {
                    "path": str(prepared / "test.json"),
                    "weight": 2,
                    "name": "easyvqa-vqa-test",
                    "format": "conversation",
                },
                {"path": str(prepared / "test_caption.json"), "format": "pair", "name": "easyvqa-caption-test"},
            ],
            "batch_size": 4,
            "packing": True,
            "max_tokens": 96,
        }
    )
    loader = build_loader(cfg, tokenizer, transform)
    batch = next(iter(loader))
    assert loader.task_names == ["easyvqa-vqa-test", "easyvqa-caption-test"]
    n_images = int((batch["input_ids"] == tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert n_images == int((batch["pixel_values"].flatten(2).abs().sum(-1) > 0).sum())
    assert batch["pixel_values"].shape[-3:] == (3, 32, 32)


def test_cli_inspect_shows_samples_lengths_and_bad_counts(tmp_path, img, write_tar):
    from lmm.cli import app

    samples = [{"__key__": f"k{i}", "jpg": img.bytes(i), "txt": f"caption {i}"} for i in range(5)]
    samples.append({"__key__": "broken", "jpg": b"not an image", "txt": "x"})
    write_tar(str(tmp_path / "s-%03d.tar"), samples)
    result = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "s-000.tar"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "records read: 6   usable: 5   skipped: 1" in out
    assert "<image>caption 0<|endofchunk|>" in out
    assert "1 frame(s) 48x48" in out
    assert "loss on: 'caption 0<|endofchunk|><|endoftext|>'" in out
    assert "corrupt_image: 1" in out
    assert "tokens per sample" in out
    bad = CliRunner().invoke(app, ["data", "inspect", str(tmp_path / "nothing-*.tar")])
    assert bad.exit_code == 2 and "no .tar files match" in bad.output


def test_the_prepared_demo_data_reads_back_as_the_demos_conversations(prepared):
    """What the frozen cache reads for configs/demo.yaml: every training question, in package order, as the
    conversation the demo always trained on (image path, "<image>\\n{question}" -> "{answer}")."""
    from lmm.data import DatasetConfig, iter_dataset

    got = [
        (s.media[0].value, s.messages)
        for _, s, bad in iter_dataset(DatasetConfig(path=str(prepared / "train.json"), format="conversation"))
    ]
    want = [
        (
            s["image"],
            [{"role": "user", "content": f"<image>\n{s['question']}"}, {"role": "assistant", "content": s["answer"]}],
        )
        for s in easyvqa_samples("train")
    ]
    assert len(got) == 38575 and got == want
