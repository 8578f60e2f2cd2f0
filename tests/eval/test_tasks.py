"""Task loaders read each dataset's official file format (fixtures written by conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmm.eval import tasks
from lmm.eval.easyvqa import load_easyvqa
from lmm.eval.registry import get_task
from lmm.eval.tasks import TaskDataError, load_image


def _all_images_exist(data):
    return all(Path(s.image).is_file() for s in data.train + data.test)


def test_coco_karpathy_splits_and_references(data_root):
    d = tasks.load_coco(data_root)
    assert [s.id for s in d.test] == ["5", "6", "7"]  # split "test"
    assert sorted(s.id for s in d.train) == ["1", "2", "3"]  # "train" + "restval"; "val" unused
    assert d.test[0].answers == ("A yellow circle on a white background.", "a circle that is yellow")
    assert d.train[0].target == "A red circle on a white background."
    assert _all_images_exist(d)


def test_flickr30k_finds_the_official_image_folder(data_root):
    d = tasks.load_flickr30k(data_root)
    assert len(d.test) == 3 and len(d.train) == 3
    assert Path(d.test[0].image).parent.name == "flickr30k-images"
    assert _all_images_exist(d)


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_coco_vqa_formats_join_questions_and_annotations(data_root, name):
    d = get_task(name).load(data_root)
    assert [s.question for s in d.test] == ["What color is the circle?", "Is it round?", "What color is it?"]
    assert d.test[0].answers == tuple(["yellow"] * 6 + ["gold"] * 4)
    assert d.test[2].target == "red"  # multiple_choice_answer
    assert Path(d.test[0].image).name == "COCO_val2014_000000000011.jpg"
    assert _all_images_exist(d)  # okvqa's images are found through the coco/ fallback


def test_textvqa_reads_plain_string_answers(data_root):
    d = tasks.load_textvqa(data_root)
    assert d.test[0].answers[:2] == ("yellow", "yellow") and len(d.test[0].answers) == 10
    assert d.train[1].target == "green"
    assert _all_images_exist(d)


def test_vizwiz_reads_answer_dicts(data_root):
    d = tasks.load_vizwiz(data_root)
    assert d.test[1].answers == ("yes",) * 10
    assert d.test[0].id == "VizWiz_val_00000011"
    assert _all_images_exist(d)


def test_hateful_memes_labels_and_meme_text(data_root):
    d = tasks.load_hatefulmemes(data_root)
    assert [s.label for s in d.test] == [1, 0, 1, 0]
    assert d.test[0].question == "another mean one"
    assert d.classes == ("no", "yes") and d.train[1].target == "yes"
    assert _all_images_exist(d)


def test_hateful_memes_falls_back_to_dev_seen_and_rejects_unlabelled(tmp_path, data_root):
    root = tmp_path / "r"
    shutil.copytree(data_root / "hateful_memes", root / "hateful_memes")
    (root / "hateful_memes" / "test_seen.jsonl").rename(root / "hateful_memes" / "dev_seen.jsonl")
    assert tasks.load_hatefulmemes(root).files[-1].endswith("dev_seen.jsonl")
    (root / "hateful_memes" / "test_seen.jsonl").write_text(json.dumps({"id": 1, "img": "img/00011.png", "text": "x"}))
    with pytest.raises(TaskDataError, match="labelled split"):
        tasks.load_hatefulmemes(root)


def test_imagenet_folders_give_labels_and_class_names(data_root):
    d = tasks.load_imagenet(data_root)
    # two names from classnames.json, the third from its folder name
    assert d.classes == ("red ball", "blue box", "n03 green thing")
    assert [s.label for s in d.test] == [0, 1, 2]
    assert len(d.train) == 6 and d.train[2].target == "blue box"


def test_easyvqa_comes_from_the_package():
    d = load_easyvqa()
    assert len(d.train) == 38575 and len(d.test) == 9673
    assert len(d.classes) == 13 and d.test[0].answers[0] in d.classes
    assert Path(d.test[0].image).is_file()


def test_missing_file_error_names_the_path_and_the_option(tmp_path):
    with pytest.raises(TaskDataError) as e:
        tasks.load_vqav2(tmp_path)
    msg = str(e.value)
    assert "--data-root" in msg and str(tmp_path / "vqav2") in msg


def test_wrong_json_shape_is_reported(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "dataset_coco.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(TaskDataError, match="Karpathy"):
        tasks.load_coco(tmp_path)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(TaskDataError, match="Did you mean 'vqav2'"):
        get_task("vqav3")
    assert get_task("OK-VQA").name == "okvqa"


def test_missing_image_error_names_the_file(tmp_path):
    with pytest.raises(TaskDataError, match="nothere.jpg"):
        load_image(str(tmp_path / "nothere.jpg"))
