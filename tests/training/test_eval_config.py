"""The run config's evaluation section: a registered task by name, held-out sets with a metric each; the demo is a
task plus a config, with nothing easy-vqa-specific in the general config classes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmm.config import ConfigError
from lmm.training.config import load_train_config

ROOT = Path(__file__).resolve().parents[2]


def test_general_configs_and_the_harness_name_no_demo():
    for f in ("eval/harness.py", "data/config.py", "lmm/training/config.py"):
        assert "easyvqa" not in (ROOT / f).read_text(), f


def test_the_demo_config_is_a_prepared_dataset_and_a_registered_task():
    cfg = load_train_config(ROOT / "configs" / "demo.yaml").validate(world_size=1)
    (d,) = cfg.data.datasets
    assert d.prepare == "easyvqa" and d.format == "conversation" and cfg.frozen_cache
    from lmm.training.evaluation import eval_tasks

    (task,) = eval_tasks(cfg)
    assert task.name == "easyvqa" and task.metric == "exact_match"


@pytest.mark.parametrize(
    "override, match",
    [
        ("eval.task=easyvqaa", "Did you mean 'easyvqa'"),
        ("eval.datasets=[{path: /no/such.json}]", "file not found"),
        ("eval.datasets=[{path: DATA, metric: choise}]", "choise"),
        ("eval.datasets=[{path: DATA, name: easyvqa}]", "taken"),
        ("eval.datasets=[{path: DATA, metrc: choice}]", "did you mean 'eval.datasets\\[0\\].metric'"),
        ("eval.limit=0", "eval.limit"),
    ],
)
def test_eval_section_errors_name_the_fix(dataset, override, match):
    with pytest.raises(ConfigError, match=match):
        load_train_config(ROOT / "configs" / "demo.yaml", [override.replace("DATA", dataset)]).validate(world_size=1)
