"""Sharding over ranks and workers, exact resume, mixtures, curriculum stages, repeat sampling."""

import json
import re
from collections import Counter

import pytest
import torch

from lmm.data import DataConfig, build_loader


@pytest.fixture
def pairs(tmp_path, img, write_tar):
    """pairs(name, n, shards) -> brace pattern of `shards` tars holding n pairs captioned "cap {name} {i}"."""

    def make(name: str, n: int, shards: int) -> str:
        per = -(-n // shards)
        samples = [
            {"__key__": f"{name}{i:04d}", "png": img.bytes(i % 50, "PNG"), "txt": f"cap {name} {i}"} for i in range(n)
        ]
        (tmp_path / name).mkdir()
        write_tar(str(tmp_path / name / "%03d.tar"), samples, maxcount=per)
        return str(tmp_path / name / f"{{000..{shards - 1:03d}}}.tar")

    return make


def captions(batch, tokenizer):
    text = tokenizer.decode(batch["input_ids"][batch["attention_mask"].bool()])
    return re.findall(r"cap \w+ \d+", text)


def take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_resume_gives_exactly_the_uninterrupted_batches(pairs, tokenizer, transform):
    """Packing + 2 workers + a 2-dataset mixture + a stage boundary inside the run."""
    a, b, c = pairs("a", 30, 3), pairs("b", 20, 2), pairs("c", 12, 1)
    cfg = DataConfig.from_dict(
        {
            "stages": [
                {"steps": 5, "datasets": [{"path": a, "weight": 2}, {"path": b}]},
                {"datasets": [{"path": c}, {"path": b}]},
            ],
            "batch_size": 2,
            "max_tokens": 24,
            "packing": True,
            "num_workers": 2,
            "seed": 3,
        }
    )
    full = take(build_loader(cfg, tokenizer, transform), 11)
    first = build_loader(cfg, tokenizer, transform)
    head = take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain JSON
    resumed = build_loader(cfg, tokenizer, transform)
    resumed.load_state_dict(state)
    tail = take(resumed, 8)
    assert_same_batches(head + tail, full)
    # the same loader object also continues where it stopped
    assert_same_batches(take(first, 2), full[3:5])


def test_resume_without_workers(pairs, tokenizer, transform):
    cfg = DataConfig.from_dict({"datasets": [{"path": pairs("a", 9, 2)}], "batch_size": 4, "epochs": 2})
    full = list(build_loader(cfg, tokenizer, transform))
    first = build_loader(cfg, tokenizer, transform)
    head = take(first, 2)
    second = build_loader(cfg, tokenizer, transform)
    second.load_state_dict(first.state_dict())
    assert_same_batches(head + list(second), full)
    assert sum(len(captions(x, tokenizer)) for x in full) == 18


@pytest.mark.parametrize("shards", [8, 3])  # 3 shards < 4 readers: records are split instead of files
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(pairs, tokenizer, transform, shards):
    path = pairs("a", 37, shards)
    seen = []
    for rank in range(2):
        cfg = DataConfig.from_dict({"datasets": [{"path": path}], "batch_size": 3, "epochs": 1, "num_workers": 2})
        for batch in build_loader(cfg, tokenizer, transform, rank=rank, world_size=2):
            seen += captions(batch, tokenizer)
    assert len(seen) == len(set(seen)) == 37
    assert set(seen) == {f"cap a {i}" for i in range(37)}


def test_mixture_proportions_follow_weights(pairs, tokenizer, transform):
    cfg = DataConfig.from_dict(
        {
            "datasets": [
                {"path": pairs("a", 40, 2), "weight": 3, "loss_weight": 2.0},
                {"path": pairs("b", 40, 2), "weight": 1},
            ],
            "batch_size": 40,
            "seed": 1,
        }
    )
    loader = build_loader(cfg, tokenizer, transform)
    assert loader.task_names == ["a/{000..001}.tar", "b/{000..001}.tar"]
    tasks = torch.cat([b["task_ids"][:, 0] for b in take(loader, 10)])
    n = len(tasks)
    share = float((tasks == 0).float().mean())
    sd = (0.75 * 0.25 / n) ** 0.5
    assert abs(share - 0.75) < 4 * sd, share
    assert loader.loss_weights == [2.0, 1.0]


def test_task_names_are_distinct_per_dataset(pairs, tokenizer, transform):
    from lmm.config import ConfigError

    cfg = DataConfig.from_dict(
        {"datasets": [{"path": pairs("a", 4, 1), "name": "alpha"}, {"path": pairs("b", 4, 1), "name": "beta"}]}
    )
    assert build_loader(cfg, tokenizer, transform).task_names == ["alpha", "beta"]
    clash = DataConfig.from_dict(
        {"datasets": [{"path": "x/1.tar", "name": "same"}, {"path": "y/1.tar", "name": "same"}]}
    )
    with pytest.raises(ConfigError, match="distinct `name:`"):
        clash.resolved_stages()


@pytest.mark.parametrize("workers", [0, 2])
def test_stages_switch_at_the_configured_step(pairs, tokenizer, transform, workers):
    cfg = DataConfig.from_dict(
        {
            "stages": [
                {"steps": 3, "datasets": [{"path": pairs("a", 20, 2), "name": "a"}]},
                {"steps": 2, "datasets": [{"path": pairs("b", 20, 2), "name": "b"}]},
            ],
            "batch_size": 2,
            "num_workers": workers,
        }
    )
    loader = build_loader(cfg, tokenizer, transform)
    batches = list(loader)  # the curriculum ends after 3 + 2 steps
    assert [sorted({c.split()[1] for c in captions(b, tokenizer)}) for b in batches] == [["a"]] * 3 + [["b"]] * 2
    assert [int(b["task_ids"][0, 0]) for b in batches] == [0, 0, 0, 1, 1]


def test_repeat_buffer_reuses_each_decoded_sample_r_times_with_fresh_augmentation(pairs, tokenizer, transform):
    def noisy(im):
        x = transform(im)
        return x + 0.01 * torch.randn_like(x)

    cfg = DataConfig.from_dict(
        {"datasets": [{"path": pairs("a", 10, 1), "repeat": 3, "repeat_buffer": 4}], "batch_size": 5, "epochs": 1}
    )
    pixels: dict = {}
    for b in build_loader(cfg, tokenizer, noisy):
        for row, cap in enumerate(captions(b, tokenizer)):
            pixels.setdefault(cap, []).append(b["pixel_values"][row, 0, 0])
    assert Counter({k: len(v) for k, v in pixels.items()}) == Counter({f"cap a {i}": 3 for i in range(10)})
    first = pixels["cap a 0"]
    assert not torch.equal(first[0], first[1])  # augmentation runs again at every use


def test_config_from_yaml_with_overrides_and_clear_errors(tmp_path):
    from lmm.config import ConfigError

    p = tmp_path / "run.yaml"
    p.write_text("data:\n  batch_size: 4\n  datasets:\n    - {path: train.json, prepare: easyvqa}\n")
    cfg = DataConfig.from_yaml(p, ["packing=true", "max_tokens=128"])
    assert cfg.packing and cfg.max_tokens == 128 and cfg.datasets[0].prepare == "easyvqa"
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        DataConfig.from_dict({"batch_sise": 3})
    with pytest.raises(ConfigError, match="needs `steps`"):
        DataConfig.from_dict(
            {"stages": [{"datasets": [{"path": "x"}]}, {"datasets": [{"path": "y"}]}]}
        ).resolved_stages()
    with pytest.raises(ConfigError, match="no datasets"):
        DataConfig().resolved_stages()
