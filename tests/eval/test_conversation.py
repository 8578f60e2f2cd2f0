"""Held-out conversation sets: prompts exactly as `model.chat` renders them, exact match and choice scoring, the
blind baseline (the same model without media) at chance where the answer is in the image, and `lmm eval --data`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lmm.eval.conversation import ConversationTask, read_conversation_file, without_media
from lmm.eval.harness import evaluate_task
from lmm.eval.task import TaskDataError

COLOURS = ("red", "green", "blue", "yellow")


def write_colour_set(root, draw, n_per_colour: int = 3, relative: bool = False) -> str:
    """One question ("what color is the shape?") whose answer is only in the image, colours balanced."""
    rows = []
    for i in range(n_per_colour * len(COLOURS)):
        colour = COLOURS[i % len(COLOURS)]
        path = draw(root / "img" / f"{i}.png", colour, ("circle", "square", "triangle")[i % 3])
        rows.append(
            {
                "id": f"q{i}",
                "image": f"img/{i}.png" if relative else str(path),
                "conversations": [
                    {"from": "human", "value": "<image>\nwhat color is the shape?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    out = root / "heldout.json"
    out.write_text(json.dumps(rows))
    return str(out)


class ColourChat:
    """A chat model that reads the colour in the middle of the last image; without an image it always guesses
    "green" (its text prior), and ranks candidates the same way."""

    def __init__(self, palette):
        self.palette, self.calls = palette, []

    def render_chat(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>", []

    def _colour(self, imgs):
        if not imgs:
            return "green"
        im = imgs[-1]
        rgb = np.asarray(im, dtype=np.float32)[im.height // 2, im.width // 2]
        return min(self.palette, key=lambda c: float(((rgb - np.array(self.palette[c])) ** 2).sum()))

    def generate(self, prompts, images, **kw):
        self.calls.append(("generate", list(prompts), [len(x) for x in images], kw))
        return [f" {self._colour(x)}." for x in images]

    def score(self, prompts, images, candidates, batch_size=16):
        self.calls.append(("score", list(prompts), [len(x) for x in images], list(candidates)))
        return torch.tensor([[0.0 if c == self._colour(x) else -1.0 for c in candidates] for x in images])


@pytest.fixture
def colour_set(tmp_path, draw_image):
    return write_colour_set(tmp_path, draw_image)


def test_blind_baseline_is_at_chance_when_the_answer_is_in_the_image(colour_set, palette):
    model = ColourChat(palette)
    task = ConversationTask.from_file(colour_set, candidates=list(COLOURS))
    r = evaluate_task(model, task, batch_size=5, blind=True, model_id="colour")
    assert r["n"] == 12 and r["metrics"]["accuracy"] == 100.0  # it reads every colour from the image
    # without the image the one question gets one answer: right for exactly 1 colour in 4
    assert r["blind"]["accuracy"] == pytest.approx(25.0) and r["blind"]["choice_accuracy"] == pytest.approx(25.0)
    blind_calls = model.calls[-2:]
    assert [c[0] for c in blind_calls] == ["generate", "score"]
    for _, prompts, n_images, _ in blind_calls:
        assert prompts == ["<user>what color is the shape?<assistant>"] and n_images == [0]  # asked once, no media


def test_choice_metric_picks_among_the_answers_of_the_set(colour_set, palette):
    model = ColourChat(palette)
    r = evaluate_task(model, ConversationTask.from_file(colour_set, metric="choice"), blind=True, model_id="c")
    assert r["metrics"]["accuracy"] == 100.0 and r["blind"]["accuracy"] == pytest.approx(25.0)
    assert model.calls[0][0] == "score" and model.calls[0][3] == list(COLOURS)  # distinct answers, first seen
    assert all(p["prediction"] in COLOURS and p["correct"] for p in r["predictions"])
    with pytest.raises(TaskDataError, match="outside the candidate set"):
        evaluate_task(model, ConversationTask.from_file(colour_set, metric="choice", candidates=["red"]))


def test_prompts_are_exactly_what_model_chat_feeds_generate(tmp_path, draw_image, tiny_model, monkeypatch):
    path = write_colour_set(tmp_path, draw_image, n_per_colour=1)
    monkeypatch.setattr(tiny_model.config, "system_prompt", "Answer in one word.")
    seen = []
    real_generate = tiny_model.generate

    def recording_generate(prompts, images=None, **kw):
        seen.append((list(prompts), [[np.asarray(i).tobytes() for i in row] for row in images], kw))
        return real_generate(prompts, images, **kw)

    monkeypatch.setattr(tiny_model, "generate", recording_generate)
    r = evaluate_task(tiny_model, ConversationTask.from_file(path), batch_size=4, blind=True)
    from PIL import Image

    by_id = {f"{i}": Image.open(tmp_path / "img" / f"{i}.png").convert("RGB") for i in range(4)}
    order = [p["id"] for p in r["predictions"]]
    asked, blind = seen[0], seen[1]
    seen.clear()
    tiny_model.chat(
        [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": by_id[k]},
                        {"type": "text", "text": "what color is the shape?"},
                    ],
                }
            ]
            for k in order
        ],
        max_new_tokens=8,
        num_beams=1,
    )
    assert asked == seen[0]  # prompts (system prompt included), pixels and generation settings
    assert "Answer in one word." in asked[0][0] and asked[0][0].count("<image>") == 1
    seen.clear()
    tiny_model.chat([[{"role": "user", "content": "what color is the shape?"}]], max_new_tokens=8, num_beams=1)
    assert blind == seen[0] and "<image>" not in blind[0][0]


def test_a_conversation_file_with_relative_images_and_several_turns(tmp_path, draw_image):
    draw_image(tmp_path / "imgs" / "a.png", "red")
    rows = [
        {
            "id": "x",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is it?"},
                {"from": "gpt", "value": "a shape"},
                {"from": "human", "value": "what color?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"id": "y", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nno answer"}]},
    ]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = read_conversation_file(str(tmp_path / "set.jsonl"), image_root=str(tmp_path / "imgs"))
    (s,) = data.test  # the record without a final answer is skipped
    assert s.target == "red" and [m["role"] for m in s.messages] == ["user", "assistant", "user"]
    assert s.media == (str(tmp_path / "imgs" / "a.png"),)
    assert without_media(s.messages)[0]["content"] == "what is it?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.png", "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    with pytest.raises(TaskDataError, match="no usable conversation"):
        read_conversation_file(str(bad))


def test_lmm_eval_data_runs_a_held_out_set_with_its_blind_baseline(colour_set, tiny_model_dir, tmp_path):
    from lmm.cli import app

    out = tmp_path / "res.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            colour_set,
            "--format",
            "conversation",
            "--metric",
            "choice",
            "--limit",
            "4",
            "--out",
            str(out),
            "--no-progress",
            "--batch-size",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())["results"]["heldout"]["0"]
    assert r["n"] == 4 and r["primary_metric"] == "accuracy" and isinstance(r["blind"]["accuracy"], float)
    assert "heldout[blind]" in result.output
    bad = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", colour_set, "--format", "pair"])
    assert bad.exit_code == 2 and "conversation" in bad.output
    none = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir)])
    assert none.exit_code == 2 and "--data" in none.output
