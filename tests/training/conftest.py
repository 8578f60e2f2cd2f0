"""Fixtures for training tests: a saved tiny model, a small real conversation dataset, config dicts."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models on a shared 2-core machine: extra OpenMP threads only spin against each other
# (one thread is ~50x faster here); subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40), "yellow": (240, 230, 20)}
SHAPES = ("circle", "rectangle", "triangle")


def write_dataset(root, n: int = 48) -> str:
    """n LLaVA-style conversations about PNG images of coloured shapes; returns the JSONL path."""
    from PIL import Image, ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    rows = []
    for i in range(n):
        colour, shape = names[i % len(names)], SHAPES[(i // len(names)) % len(SHAPES)]
        im = Image.new("RGB", (32, 32), (255, 255, 255))
        d = ImageDraw.Draw(im)
        box = [4 + i % 5, 4, 26, 27 - i % 4]
        if shape == "circle":
            d.ellipse(box, fill=COLORS[colour])
        elif shape == "rectangle":
            d.rectangle(box, fill=COLORS[colour])
        else:
            d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[colour])
        path = root / f"img{i:03d}.png"
        im.save(path)
        q, a = ("what color is the shape?", colour) if i % 2 == 0 else ("what shape is in the image?", shape)
        rows.append(
            {
                "id": f"s{i}",
                "image": str(path),
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    out = root / "train.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A saved tiny random LMM (frozen weights included) that `preset:` can start from."""
    from lmm.testing import tiny_lmm

    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_lmm(seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_lora_dir(tmp_path_factory) -> str:
    """The same tiny LMM with LoRA (r=4) on the LM's attention projections."""
    import torch

    from lmm.config import LoraSettings
    from lmm.model import LMM
    from lmm.testing import tiny_lmm_config, tiny_tokenizer

    cfg = tiny_lmm_config()
    cfg.lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_lora") / "model"
    LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu").save_pretrained(path)
    return str(path)


def run_config(run_dir, preset: str, data_path: str, **top) -> dict:
    """A small, fast, deterministic CPU run config as a plain dict (what a YAML file would hold)."""
    cfg = {
        "name": "test",
        "preset": preset,
        "run_dir": str(run_dir),
        "seed": 0,
        "deterministic": True,
        "data": {
            "datasets": [{"path": data_path, "format": "conversation"}],
            "batch_size": 4,
            "max_tokens": 48,
            "seed": 0,
        },
        "optim": {"lr": 3e-3, "grad_clip": 1.0},
        "schedule": {"max_steps": 6, "warmup_steps": 2, "kind": "cosine"},
        "checkpoint": {"every": 0, "keep_last": 2, "resume": "auto"},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False, "plot": False},
    }
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


def launch(cfg: dict, cwd, env_extra: dict | None = None, torchrun: int = 0):
    """Start `train.py --config <cfg as YAML>` in a subprocess (under torchrun with `torchrun` processes)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    path = Path(cwd) / f"cfg-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, str(root / "train.py"), "--config", str(path)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] + cmd[1:]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout: float = 300) -> str:
    """Wait for a launched run; its output (the run must succeed)."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def step_losses(run_dir) -> dict:
    """{step: loss} from a run's metrics.jsonl (which must hold one clean history)."""
    from lmm.training.monitor import read_metrics

    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"metrics must hold one clean history, got steps {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="session")
def h():
    """Helpers: h.run_config, h.launch, h.finish, h.step_losses, h.write_dataset."""
    from types import SimpleNamespace

    return SimpleNamespace(
        run_config=run_config, launch=launch, finish=finish, step_losses=step_losses, write_dataset=write_dataset
    )


@pytest.fixture(scope="session")
def feature_batches(tiny_dir, dataset):
    """12 batches of 4 from the real loader, pixels replaced by cached frozen vision features."""
    from lmm.data import DataConfig, build_loader
    from lmm.model import LMM

    model = LMM.from_pretrained(tiny_dir, device="cpu")
    cfg = DataConfig.from_dict(
        {"datasets": [{"path": dataset, "format": "conversation"}], "batch_size": 4, "max_tokens": 48, "seed": 0}
    )
    out = []
    for batch in build_loader(cfg, model.tokenizer, model.image_processor):
        with torch.no_grad():
            batch["vision_features"] = model.vision_features(batch.pop("pixel_values"))
        out.append(batch)
        if len(out) == 12:
            return out
