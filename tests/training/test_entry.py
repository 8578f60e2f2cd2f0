"""The entry points: `lmm train` (= train.py) from a `model:` config, the shipped example configs, and
the CUDA-only options (run where a GPU exists)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lmm.model import LMM
from lmm.training import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_lmm_train_builds_from_a_model_config_and_saves_a_loadable_model(tmp_path, dataset, h):
    from lmm.cli import app
    from lmm.testing import tiny_lmm_config, tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    model = tiny_lmm_config().to_dict()
    model["language"]["tokenizer_path"] = str(tmp_path / "tok")
    cfg = h.run_config(tmp_path / "run", None, dataset, model=model)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(
        app,
        [
            "train",
            "--config",
            str(path),
            "schedule.max_steps=3",
            "optim.lr=1e-2",
            "output_dir=" + str(tmp_path / "out"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert f"model: {tmp_path / 'out'}" in res.output
    saved = TrainConfig.from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    assert saved.schedule.max_steps == 3 and saved.model.language.tokenizer_path == str(tmp_path / "tok")
    trained = LMM.from_pretrained(tmp_path / "out", device="cpu")
    torch.manual_seed(cfg["seed"])
    fresh = LMM.from_config(trained.config, tokenizer=trained.tokenizer, device="cpu")
    diff = [n for n, p in fresh.trainable_state_dict().items() if not torch.equal(p, trained.trainable_state_dict()[n])]
    assert diff  # it trained ...
    frozen = {n for n, _ in fresh.named_parameters()} - set(fresh.trainable_state_dict())
    fs, ts = dict(fresh.named_parameters()), dict(trained.named_parameters())
    assert all(torch.equal(fs[n], ts[n]) for n in frozen)  # ... and only the trainable part


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse_and_say_what_is_missing(path):
    from lmm.config import ConfigError

    cfg = load_train_config(path)
    try:
        cfg.validate(world_size=1)
    except ConfigError as e:  # the examples name local files a user provides
        assert "not found" in str(e) or "neither a preset name" in str(e), e


@pytest.mark.gpu
def test_cuda_bf16_fused_and_eight_bit_adamw_train(tmp_path, dataset, tiny_dir, h):
    import math

    from lmm.training import train

    cfg = h.run_config(tmp_path / "run", tiny_dir, dataset, optim={"eight_bit": True}, model_overrides=["lora.r=4"])
    res = train(TrainConfig.from_dict(cfg))
    assert res.losses[-1] < res.losses[0]
    cfg = h.run_config(tmp_path / "run2", tiny_dir, dataset, optim={"fused": True}, precision="bf16")
    assert all(math.isfinite(x) for x in train(TrainConfig.from_dict(cfg)).losses)
