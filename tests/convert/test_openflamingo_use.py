"""A converted OpenFlamingo model used without further steps: `lmm convert openflamingo` (CLI), then `lmm chat
--prompt` and `lmm serve` (openai client) answer token for token as OpenFlamingo's own greedy decoding does on
the same rendered prompt; a LoRA fine-tune of it runs, saves and reloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lmm.generation import prepare_inputs
from lmm.model import LMM
from lmm.testing import sibling_module

MAX_NEW = 10


OF = sibling_module(__file__, "openflamingo_oracle")
pytestmark = OF.NEEDS_OPENFLAMINGO


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("of")
    of_model, _, paths = OF.build(tmp, "llama", every=2, seed=3)
    from lmm.cli import app

    res = CliRunner().invoke(
        app,
        [
            "convert",
            "openflamingo",
            "--checkpoint",
            str(paths["checkpoint"]),
            "--vision",
            paths["vision"],
            "--lm",
            str(paths["lm"]),
            "--cross-attn-every",
            "2",
            "--out",
            str(tmp / "model"),
        ],
    )
    assert res.exit_code == 0, res.output
    image = tmp / "photo.png"
    Image.fromarray(np.random.RandomState(7).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(image)
    return of_model, tmp / "model", image


def of_answer(of_model, model, question: str, image: Path, max_new: int = MAX_NEW, marker: bool = False) -> str:
    """OpenFlamingo's greedy answer to the chat-rendered prompt lmm builds for this message (an image part, or
    with `marker` an `<image>` marker in the text as LLaVA-style data writes it)."""
    with Image.open(image) as im:
        pil = im.convert("RGB")
    if marker:
        msgs = [{"role": "user", "content": f"<image>\n{question}"}]
    else:
        msgs = [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": question}]}]
    prompt, imgs = model.render_chat(msgs)
    imgs = list(imgs) + ([pil] if marker else [])
    batch = prepare_inputs(model, [prompt], [imgs], add_special_tokens=False)
    rows = OF.of_greedy(
        of_model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["pixel_values"],
        max_new,
        {model.tokenizer.eos_token_id},
        never=[model.image_token_id],
    )
    return model.tokenizer.decode(rows[0], skip_special_tokens=True)


def test_chat_prompt_answers_as_openflamingo(converted):
    of_model, path, image = converted
    from lmm.cli import app

    model = LMM.from_pretrained(path, device="cpu")
    want = of_answer(of_model, model, "what is this?", image)
    assert want.strip()
    res = CliRunner().invoke(
        app,
        [
            "chat",
            "--model",
            str(path),
            "--image",
            str(image),
            "--prompt",
            "what is this?",
            "--max-new-tokens",
            str(MAX_NEW),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.stdout == want + "\n"


def test_serve_answers_as_openflamingo(converted, tmp_path):
    openai = pytest.importorskip("openai")
    from lmm.testing import free_port, running_server

    of_model, path, image = converted
    model = LMM.from_pretrained(path, device="cpu")
    want = of_answer(of_model, model, "what is this?", image)
    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("lmm")),
        "serve",
        "--model",
        str(path),
        "--port",
        str(port),
        "--allow-local-dir",
        str(image.parent),
        "--log-level",
        "warning",
        "--device",
        "cpu",
    ]
    with running_server(cmd, f"http://127.0.0.1:{port}/health", tmp_path / "serve.log"):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image.as_uri()}},
                    {"type": "text", "text": "what is this?"},
                ],
            }
        ]
        resp = client.chat.completions.create(model=path.name, messages=msgs, max_tokens=MAX_NEW, temperature=0)
    assert resp.choices[0].message.content == want


def test_lora_finetune_of_a_converted_model(converted, tmp_path):
    from lmm.training import TrainConfig, train

    _, path, image = converted
    rows = [
        {
            "id": f"s{i}",
            "image": str(image),
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is this?"},
                {"from": "gpt", "value": "a photo of a cat"},
            ],
        }
        for i in range(8)
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig.from_dict(
        {
            "name": "of-lora",
            "preset": str(path),
            "model_overrides": ["lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]"],
            "run_dir": str(tmp_path / "run"),
            "seed": 0,
            "data": {"datasets": [{"path": str(data), "format": "conversation"}], "batch_size": 4, "max_tokens": 64},
            "optim": {"lr": 1e-2},
            "schedule": {"max_steps": 4, "warmup_steps": 0, "kind": "constant"},
            "checkpoint": {"every": 0},
            "logging": {"tensorboard": False, "progress": False, "plot": False},
        }
    )
    result = train(cfg)
    assert result.losses[-1] < result.losses[0]
    tuned = LMM.from_pretrained(result.output_dir, device="cpu")
    assert tuned.config.lora.r == 4
    assert any("lora_B" in k and float(v.abs().max()) > 0 for k, v in tuned.trainable_state_dict().items())


def test_eval_on_a_held_out_set_answers_as_openflamingo(converted, tmp_path):
    """`lmm eval --data` (exact match, chat prompts, 8 new tokens): each prediction is OpenFlamingo's answer."""
    from lmm.cli import app

    of_model, path, image = converted
    questions = ["what is this?", "what shape is in the image?", "what color is the shape?"]
    rows = [
        {
            "id": f"q{i}",
            "image": str(image),
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "a cat"}],
        }
        for i, q in enumerate(questions)
    ]
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "res.json"
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(path),
            "--data",
            str(data),
            "--format",
            "conversation",
            "--metric",
            "exact_match",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["results"]["heldout"]["0"]
    assert r["n"] == 3, r
    recs = json.loads(Path(r["trials"][0]["predictions_file"]).read_text())
    model = LMM.from_pretrained(path, device="cpu")
    want = [of_answer(of_model, model, q, image, max_new=8, marker=True) for q in questions]  # eval: 8 new tokens
    assert any(w.strip() for w in want)
    assert [p["prediction"] for p in recs] == [w.strip() for w in want]
