"""`lmm eval --prompt-style chat`: benchmark queries asked exactly as `model.chat` asks them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from lmm.cli.eval import register

SYSTEM = "Answer in one word."
QUESTIONS = {  # split -> (image_id, question, answer)
    "train2014": [(1, "What color is the shape?", "red"), (2, "Is there a circle?", "yes")],
    "val2014": [(11, "What color is it?", "blue"), (12, "What shape is shown?", "square"), (13, "How many?", "one")],
}


def write_vqa(root):
    """A tiny VQAv2-format dataset (questions + annotations JSON per split, COCO-named JPEGs)."""
    base = root / "vqav2"
    rng = np.random.RandomState(0)
    qid = 0
    for split, items in QUESTIONS.items():
        (base / split).mkdir(parents=True)
        qs, anns = [], []
        for image_id, question, answer in items:
            qid += 1
            pixels = rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / split / f"COCO_{split}_{image_id:012d}.jpg")
            qs.append({"image_id": image_id, "question": question, "question_id": qid})
            anns.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_id": j + 1} for j in range(10)],
                }
            )
        (base / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(json.dumps({"questions": qs}))
        (base / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": anns}))
    return root


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from lmm.model import LMM
    from lmm.testing import tiny_lmm

    folder = tmp_path_factory.mktemp("chat_model")
    model = tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=5)
    model.config.system_prompt = SYSTEM
    model.save_pretrained(folder / "model")
    loaded = LMM.from_pretrained(folder / "model", device="cpu")
    assert loaded.config.system_prompt == SYSTEM
    return loaded, folder / "model"


def run_cli(*args):
    app = typer.Typer()

    @app.callback()
    def main():
        pass

    register(app)
    result = CliRunner().invoke(app, ["eval", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def user(image, text):
    return {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


@pytest.mark.parametrize("shots", [0, 2])
def test_chat_style_equals_model_chat(tmp_path, chat_model, shots):
    model, model_dir = chat_model
    root = write_vqa(tmp_path / "data")
    out = tmp_path / "results.json"
    run_cli(
        "--model", model_dir, "--tasks", "vqav2", "--data-root", root, "--shots", shots, "--prompt-style", "chat",
        "--num-beams", 1, "--max-new-tokens", 6, "--trials", 1, "--batch-size", 2, "--out", out, "--no-progress",
    )  # fmt: skip
    report = json.loads(out.read_text())
    r = report["results"]["vqav2"][str(shots)]
    assert report["config"]["prompt_style"] == "chat"
    assert r["n_demos"] == shots and not r["text_only_demos"]  # chat: no text-only demos at 0 shots
    records = json.loads(open(r["trials"][0]["predictions_file"]).read())
    assert len(records) == len(QUESTIONS["val2014"])

    base = root / "vqav2"
    train = {str(i + 1): (base / "train2014" / f"COCO_train2014_{img:012d}.jpg", q, a)
             for i, (img, q, a) in enumerate(QUESTIONS["train2014"])}  # fmt: skip
    n_train = len(QUESTIONS["train2014"])
    for rec, (img, question, _) in zip(records, QUESTIONS["val2014"]):
        conv = []
        for demo_id in rec["demos"]:
            d_img, d_q, d_a = train[demo_id]
            conv += [user(str(d_img), d_q), {"role": "assistant", "content": d_a}]
        assert len(rec["demos"]) == shots and all(int(d) <= n_train for d in rec["demos"])
        conv.append(user(str(base / "val2014" / f"COCO_val2014_{img:012d}.jpg"), question))
        expected = model.chat(conv, max_new_tokens=6, num_beams=1)
        assert rec["raw"] == expected
        assert rec["prediction"] == expected.strip()


def test_chat_style_prompt_is_render_chat(chat_model):
    from lmm.eval.registry import parse_tasks
    from lmm.eval.task import Sample

    model, _ = chat_model
    (task,) = parse_tasks(["vqav2"])
    chat = task.with_prompt_style("chat")
    assert task.prompt_style == "flamingo" and chat is not task  # the registered task is not changed
    query = Sample(id="q", image="q.jpg", question="What color?")
    demo = Sample(id="d", image="d.jpg", question="What shape?", target="circle")
    prompt, images = chat.build_inputs(model, query, [demo], text_only=False)
    expected, _ = model.render_chat(
        [user("d.jpg", "What shape?"), {"role": "assistant", "content": "circle"}, user("q.jpg", "What color?")]
    )
    assert prompt == expected and SYSTEM in prompt and "Short answer:" not in prompt
    assert images == ["d.jpg", "q.jpg"]
    flamingo_prompt, _ = task.build_inputs(model, query, [demo], text_only=False)
    assert flamingo_prompt.endswith("Question:What color? Short answer:") and SYSTEM not in flamingo_prompt
    assert chat.zero_shot_demos(2) == 0 and task.zero_shot_demos(2) == 2


def test_prompt_style_rejected(tmp_path):
    from lmm.eval.harness import EvalConfig
    from lmm.eval.task import EvalConfigError

    with pytest.raises(EvalConfigError, match="--prompt-style"):
        EvalConfig(tasks=["easyvqa"], prompt_style="llava").validate()
