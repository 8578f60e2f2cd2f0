"""Start-up validation: bad configs fail with a message naming the problem, before any model loads."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from lmm.config import ConfigError
from lmm.training import TrainConfig, load_train_config, train
from lmm.training.optim import lr_factor


@pytest.fixture
def unloadable_model(tmp_path_factory, tiny_dir):
    """A model directory that passes the config checks but cannot be loaded (corrupt weights): a run that
    reports a config problem instead of a weights error has validated before loading any model."""
    import shutil

    path = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_dir, path)
    (path / "trainable.safetensors").write_bytes(b"not safetensors")
    return str(path)


def write(tmp_path, cfg: dict):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_warmup_longer_than_the_run_is_clamped_with_a_warning(tmp_path, dataset, h, tiny_dir, capsys):
    """schedule.max_steps=5 with warmup_steps=10 (e.g. a smoke test with the default warm-up): the warm-up is
    clamped to the run's length and a warning says so, instead of a ConfigError."""
    cfg = h.run_config(tmp_path / "run", tiny_dir, dataset)
    cfg["schedule"].update(max_steps=5, warmup_steps=10)
    loaded = load_train_config(write(tmp_path, cfg))
    loaded.validate_training()
    assert loaded.schedule.warmup_steps == 5
    err = capsys.readouterr().err
    assert "warning: schedule.warmup_steps (10) is larger than schedule.max_steps (5)" in err
    assert "clamped to 5 steps" in err
    loaded.validate_training()  # already clamped: no second warning
    assert "warning" not in capsys.readouterr().err
    assert lr_factor(4, loaded.schedule) == pytest.approx(1.0)  # warm-up ends at the last step


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["optim"].update(lerning_rate=1e-3), "unknown config key 'optim.lerning_rate'"),
        (lambda c: c["schedule"].update(warmup=3), "did you mean 'schedule.warmup_steps'"),
        (lambda c: c["data"]["datasets"][0].update(path="/nonexistent/shards-{000..003}.tar"), "data file not found"),
        (lambda c: c["data"]["datasets"][0].update(image_root="/nonexistent/images"), "image_root folder not found"),
        (lambda c: c["optim"].update(global_batch_size=6, grad_accum=4), "not divisible by world_size"),
        (lambda c: c["optim"].update(grad_accum=0), "optim.grad_accum must be >= 1"),
        (lambda c: c["schedule"].update(warmup_steps=-1), "schedule.warmup_steps must be >= 0"),
        (lambda c: c["data"].update(batch_size=0), "data.batch_size must be >= 1"),
        (lambda c: c.update(model_overrides=["lora.rank=4"]), "model_overrides: unknown config key 'lora.rank'"),
        (lambda c: c.update(preset="/nonexistent/model"), "neither a preset name"),
        (
            lambda c: c.update(model={"language": {"load_in_4bit": True}}, preset=None),
            "language.load_in_4bit (QLoRA) needs",
        ),
        (lambda c: c.update(distributed="fsdp"), "'fsdp' is not one of"),
        (lambda c: c.update(balance_answers=True), "balance_answers works with the frozen-cache batches"),
    ],
    ids=[
        "typo",
        "typo-suggestion",
        "missing-shards",
        "missing-image-root",
        "global-batch",
        "grad-accum",
        "negative-warmup",
        "batch-size",
        "override-typo",
        "missing-preset",
        "qlora-without-cuda",
        "bad-choice",
        "balance-without-cache",
    ],
)
def test_bad_config_fails_before_the_model_loads(tmp_path, unloadable_model, dataset, h, edit, message):
    cfg = h.run_config(tmp_path / "run", unloadable_model, dataset)
    edit(cfg)
    with pytest.raises(ConfigError) as err:
        train(load_train_config(write(tmp_path, cfg)))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_world_size_is_part_of_the_batch_check(tmp_path, dataset, tiny_dir, h):
    cfg = TrainConfig.from_dict(
        h.run_config(tmp_path, tiny_dir, dataset, distributed="ddp", optim={"global_batch_size": 12, "grad_accum": 3})
    )
    cfg.validate(world_size=2)
    assert cfg.data.batch_size == 2  # 12 = 2 ranks x 3 micro-batches x 2 rows
    with pytest.raises(ConfigError, match="not divisible by world_size \\(8\\)"):
        cfg.validate(world_size=8)
    with pytest.raises(ConfigError, match="distributed=none"):
        TrainConfig.from_dict(h.run_config(tmp_path, tiny_dir, dataset)).validate(world_size=2)


def test_cli_reports_config_errors_in_one_line(tmp_path, unloadable_model, dataset, h):
    from lmm.cli import app

    cfg = h.run_config(tmp_path / "run", unloadable_model, dataset)
    res = CliRunner().invoke(app, ["train", "--config", str(write(tmp_path, cfg)), "optim.betas=[0.9]"])
    assert res.exit_code == 2
    assert "error: optim.betas must be two numbers" in res.output and "Traceback" not in res.output


def test_overrides_reach_nested_keys_and_the_resolved_config_round_trips(tmp_path, dataset, tiny_dir, h):
    cfg = load_train_config(
        write(tmp_path, h.run_config(tmp_path, tiny_dir, dataset)),
        ["optim.lr=2e-4", "schedule.kind=linear", "model_overrides=[lora.r=4]"],
    )
    assert cfg.optim.lr == 2e-4 and cfg.schedule.kind == "linear" and cfg.model_overrides == ["lora.r=4"]
    again = TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    from lmm.training.config import ScheduleConfig

    s = ScheduleConfig(max_steps=100, warmup_steps=10, kind=kind, min_lr_ratio=0.1)
    f = [lr_factor(i, s) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    if kind == "constant":
        assert set(f[10:]) == {1.0}
    else:
        assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=0.01)
