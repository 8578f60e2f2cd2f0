"""Your own data end to end: a folder of labelled images + LLaVA-style JSON, training on the frozen-feature fast
path (the vision tower sees each training image once, not once per step), the held-out split evaluated through
`eval.datasets` during training and through `lmm eval --data` after, both equal to what `model.chat` answers."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from lmm.backbones.vision import VisionTower
from lmm.eval.conversation import GENERATION
from lmm.eval.metrics import normalize_exact
from lmm.model import LMM
from lmm.training import TrainConfig, train

from .conftest import write_dataset


def test_own_folder_trains_on_cached_features_and_every_evaluation_equals_model_chat(tmp_path, tiny_dir):
    train_json = write_dataset(tmp_path / "train", n=48)
    held_json = write_dataset(tmp_path / "held", n=12)
    cfg = TrainConfig.from_dict(
        {
            "name": "own",
            "preset": tiny_dir,
            "run_dir": str(tmp_path / "run"),
            "output_dir": str(tmp_path / "final"),
            "seed": 0,
            "frozen_cache": True,
            "freeze_new_token_rows": True,
            "data": {"datasets": [{"path": train_json, "format": "conversation"}], "batch_size": 8, "max_tokens": 64},
            "optim": {"lr": 5e-3, "gate_lr_mult": 10.0},
            "schedule": {"max_steps": 24, "warmup_steps": 0, "kind": "constant"},
            "checkpoint": {"every": 0, "at_end": False},
            "logging": {"tensorboard": False, "progress": False, "plot": False},
            "eval": {"every": 12, "limit": None, "datasets": [{"path": held_json, "name": "held"}]},
        }
    )
    rows = []

    def count(module, args, output):
        if isinstance(module, VisionTower):
            rows.append(args[0].shape[0])

    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        result = train(cfg)
    finally:
        hook.remove()
    # 48 distinct training images once (the cache), then 12 held-out images per evaluation (steps 12 and 24);
    # 24 steps of 8 rows through the tower would add 192
    assert sum(rows) == 48 + 2 * 12, (rows, result.step, result.stopped_early)
    during = result.eval["held/accuracy"]

    out = tmp_path / "res.json"
    from lmm.cli import app

    res = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tmp_path / "final"),
            "--data",
            held_json,
            "--format",
            "conversation",
            "--out",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    (held,) = json.loads(out.read_text())["results"].values()  # named after the file
    after = held["0"]["mean"]["accuracy"]

    model = LMM.from_pretrained(tmp_path / "final", device="cpu").eval()
    items = [json.loads(line) for line in open(held_json)]
    answers = [
        model.chat(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": it["image"]},
                        {"type": "text", "text": it["conversations"][0]["value"].replace("<image>\n", "")},
                    ],
                }
            ],
            max_new_tokens=GENERATION["max_new_tokens"],
        )
        for it in items
    ]
    correct = [normalize_exact(a) == normalize_exact(it["conversations"][1]["value"]) for a, it in zip(answers, items)]
    by_chat = 100.0 * sum(correct) / len(items)
    assert during == after == by_chat, (during, after, by_chat, answers[:4])
    # item for item: the CLI's predictions are model.chat's answers
    records = json.loads(open(held["0"]["trials"][0]["predictions_file"]).read())
    assert len(records) == len(items)
    assert sorted(r["prediction"] for r in records) == sorted(a.strip() for a in answers)
    assert [r["prediction"] for r in sorted(records, key=lambda r: int(r["id"]))] == [a.strip() for a in answers]
