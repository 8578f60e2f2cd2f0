"""The evaluation loop: demo selection, zero-shot trick, known scores end to end, resumable shards.

`ColorModel` is a small rule-based model with the LMM inference interface: it reads the colour in
the middle of the query image (the last image of a prompt). Its answers are known in advance, so
the harness's scores can be checked exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmm.eval.harness import EvalConfig, EvalConfigError, evaluate, print_summary, random_demo_indices

WARM = {"yellow", "orange", "red"}


class ColorModel:
    def __init__(self, palette):
        self.palette = palette
        self.calls = []  # (method, prompts, number of images per prompt)

    def _color(self, image) -> str:
        rgb = np.asarray(image, dtype=np.float32)[image.height // 2, image.width // 2]
        return min(self.palette, key=lambda c: float(((rgb - np.array(self.palette[c])) ** 2).sum()))

    def generate(self, prompts, images, max_new_tokens=20, num_beams=1, **kw):
        self.calls.append(("generate", list(prompts), [len(x) for x in images]))
        return [" " + self._color(x[-1]) + " Question: more" for x in images]

    def score(self, prompts, images, candidates):
        self.calls.append(("score", list(prompts), [len(x) for x in images]))
        rows = []
        for x in images:
            color = self._color(x[-1])
            if any("yes" in c for c in candidates):  # HatefulMemes: warm colours are "hateful"
                rows.append([0.0 if ("yes" in c) == (color in WARM) else -1.0 for c in candidates])
            else:
                rows.append([0.0 if color in c else -1.0 for c in candidates])
        return torch.tensor(rows)

    def embed_images(self, images):
        return torch.tensor(
            np.stack([np.asarray(im, dtype=np.float32)[im.height // 2, im.width // 2] for im in images])
        )


@pytest.fixture
def model(palette):
    return ColorModel(palette)


def cfg(root, **kw) -> EvalConfig:
    base = dict(
        tasks=["vqav2"],
        shots=[0],
        data_root=str(root),
        trials=1,
        batch_size=2,
        num_beams=1,
        progress=False,
        meteor=False,
    )
    base.update(kw)
    return EvalConfig(**base)


def test_vqa_accuracy_through_the_whole_pipeline_is_the_hand_computed_value(data_root, model):
    # answers: yellow (6 of 10 humans say yellow) -> 1.0; purple for "Is it round?" -> 0;
    # orange (2 of 10 say orange) -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6.  Mean: 1.6 / 3.
    report = evaluate(model, cfg(data_root, zero_shot_text_demos=0), model_id="color")
    r = report["results"]["vqav2"]["0"]
    assert r["mean"]["vqa_accuracy"] == pytest.approx(100 * 1.6 / 3, abs=1e-9)
    preds = r["trials"][0]["predictions"]
    assert [p["prediction"] for p in preds] == ["yellow", "purple", "orange"]  # cut at "Question"
    assert [p["vqa_accuracy"] for p in preds] == pytest.approx([1.0, 0.0, 0.6], abs=1e-12)


def test_ranking_tasks_score_a_perfect_model_at_100(data_root, model):
    report = evaluate(model, cfg(data_root, tasks=["imagenet", "hatefulmemes"], shots=[0, 2]), model_id="color")
    for shots in ("0", "2"):
        assert report["results"]["imagenet"][shots]["mean"]["top1_accuracy"] == 100.0
        assert report["results"]["hatefulmemes"][shots]["mean"]["roc_auc"] == 100.0


def test_zero_shot_uses_two_text_only_demos_and_one_image(data_root, model):
    evaluate(model, cfg(data_root, shots=[0]), model_id="color")
    (kind, prompts, n_images), *_ = model.calls
    for p, n in zip(prompts, n_images):
        assert p.count("Short answer:") == 3 and p.count("<image>") == 1 and n == 1
        assert p.endswith("<image>Question:" + p.split("<image>Question:")[-1]) and p.endswith("Short answer:")


def test_few_shot_prompts_carry_one_image_per_demo(data_root, model):
    evaluate(model, cfg(data_root, shots=[2]), model_id="color")
    for p, n in zip(model.calls[0][1], model.calls[0][2]):
        assert p.count("<image>") == 3 and n == 3


def test_random_demos_are_seeded_per_sample_and_independent_of_batching(data_root, model):
    a = evaluate(model, cfg(data_root, shots=[2], trials=2, batch_size=1), model_id="color")
    b = evaluate(model, cfg(data_root, shots=[2], trials=2, batch_size=3), model_id="color")
    trials_a = a["results"]["vqav2"]["2"]["trials"]
    trials_b = b["results"]["vqav2"]["2"]["trials"]
    demos = [[p["demos"] for p in t["predictions"]] for t in trials_a]
    assert demos == [[p["demos"] for p in t["predictions"]] for t in trials_b]
    assert demos[0] != demos[1]  # seeds 0 and 1 draw differently
    assert [t["seed"] for t in trials_a] == [0, 1]
    assert random_demo_indices(10, 3, 0, "vqav2", "x") == random_demo_indices(10, 3, 0, "vqav2", "x")


def test_mean_and_std_are_over_trials(data_root, model):
    r = evaluate(model, cfg(data_root, tasks=["coco"], shots=[2], trials=3), model_id="color")["results"]["coco"]["2"]
    values = [t["metrics"]["cider"] for t in r["trials"]]
    assert len(values) == 3
    assert r["mean"]["cider"] == pytest.approx(float(np.mean(values)))
    assert r["std"]["cider"] == pytest.approx(float(np.std(values)))


def test_rices_demos_are_the_most_similar_train_images(data_root, model, tmp_path):
    report = evaluate(
        model, cfg(data_root, tasks=["imagenet"], shots=[2], rices=True, out=str(tmp_path / "r.json")), model_id="color"
    )
    r = report["results"]["imagenet"]["2"]
    assert r["demo_selection"] == "rices" and len(r["trials"]) == 1
    preds = json.loads(open(r["trials"][0]["predictions_file"]).read())
    for p in preds:  # both train images of the query's own class, which are identical in colour
        assert {d.split("/")[0] for d in p["demos"]} == {p["id"].split("/")[0]}
    assert list((tmp_path / "r.shards" / "rices").glob("imagenet-train-*.pt"))


def test_rerun_skips_finished_shards_and_recomputes_changed_work(data_root, model, tmp_path):
    out = tmp_path / "results.json"
    settings = dict(tasks=["vqav2"], shots=[2], out=str(out), shard_size=2)
    first = evaluate(model, cfg(data_root, **settings), model_id="color")
    assert sum(len(c[1]) for c in model.calls) == 3
    model.calls.clear()
    second = evaluate(model, cfg(data_root, **settings), model_id="color")
    assert model.calls == []  # every shard was finished
    assert second["results"] == first["results"]
    shard_dir = next((tmp_path / "results.shards" / "vqav2").glob("2shot-random-seed0-*"))
    (shard_dir / "shard_00001.json").unlink()
    evaluate(model, cfg(data_root, **settings), model_id="color")
    assert [len(c[1]) for c in model.calls] == [1]  # only the missing shard (the third sample) ran
    model.calls.clear()
    evaluate(model, cfg(data_root, **settings, num_beams=2), model_id="color")
    assert sum(len(c[1]) for c in model.calls) == 3  # a changed setting never reuses shards
    saved = json.loads(out.read_text())
    assert (
        saved["results"]["vqav2"]["2"]["mean"]["vqa_accuracy"] == first["results"]["vqav2"]["2"]["mean"]["vqa_accuracy"]
    )
    preds = json.loads(open(saved["results"]["vqav2"]["2"]["trials"][0]["predictions_file"]).read())
    assert [p["id"] for p in preds] == ["104", "105", "106"] and all("answers" in p for p in preds)


def test_summary_table_lists_each_task_and_shot(data_root, model, capsys):
    report = evaluate(model, cfg(data_root, tasks=["vqav2", "imagenet"], shots=[0, 2], trials=2), model_id="color")
    text = print_summary(report)
    lines = text.splitlines()
    assert lines[0].split() == ["task", "shots", "metric", "score", "trials", "n"]
    assert any(line.split()[:3] == ["imagenet", "2", "top1_accuracy"] and "±" in line for line in lines)
    assert "vqav2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shots=[8]), "--shots"),  # 8 demos from 3 train samples
        (dict(data_root=None), "--data-root"),
        (dict(limit=0), "--limit"),
        (dict(tasks=["vqa9"]), "Did you mean"),
    ],
)
def test_user_errors_name_the_fix(data_root, model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(model, cfg(data_root, **kwargs), model_id="color")


def test_a_model_without_score_is_refused_up_front(data_root):
    class GenerateOnly:
        def generate(self, prompts, images, **kw):
            return ["x"] * len(prompts)

    with pytest.raises(EvalConfigError, match="score"):
        evaluate(GenerateOnly(), cfg(data_root, tasks=["hatefulmemes"]), model_id="g")


def test_rices_demos_show_distinct_images_when_questions_share_one(data_root, model, tmp_path):
    import shutil

    from lmm.eval.tasks import load_vqav2

    root = tmp_path / "root"
    shutil.copytree(data_root / "vqav2", root / "vqav2")
    qs_path = root / "vqav2" / "v2_OpenEnded_mscoco_train2014_questions.json"
    an_path = root / "vqav2" / "v2_mscoco_train2014_annotations.json"
    qs, an = json.loads(qs_path.read_text()), json.loads(an_path.read_text())
    for extra in range(5):  # five more questions about train image 1
        qid = 900 + extra
        qs["questions"].insert(0, {"image_id": 1, "question": f"Question {extra}?", "question_id": qid})
        an["annotations"].append(
            {
                "question_id": qid,
                "image_id": 1,
                "answers": [{"answer": "red", "answer_id": 1}],
                "multiple_choice_answer": "red",
            }
        )
    qs_path.write_text(json.dumps(qs))
    an_path.write_text(json.dumps(an))
    report = evaluate(model, cfg(root, shots=[3], rices=True), model_id="color")
    train = {s.id: s.image for s in load_vqav2(root).train}
    for p in report["results"]["vqav2"]["3"]["trials"][0]["predictions"]:
        assert len({train[d] for d in p["demos"]}) == 3  # three demos, three different images
