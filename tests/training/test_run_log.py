"""What the run log states at start."""

from __future__ import annotations

import pytest

from lmm.model import LMM
from lmm.testing import ListSource
from lmm.testing import tiny_train_config as make_cfg
from lmm.training import Trainer


def test_the_log_states_the_trainable_parameter_count(tmp_path, tiny_dir, feature_batches, capsys):
    model = LMM.from_pretrained(tiny_dir, device="cpu")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    assert 0 < n_train < n_all
    Trainer(model, make_cfg(tmp_path, schedule={"max_steps": 1}), ListSource(feature_batches[:1])).fit()
    out = capsys.readouterr().out
    assert f"trainable parameters: {n_train:,} of {n_all:,}" in out


def test_train_gives_the_loader_the_models_system_prompt(tmp_path, tiny_dir, dataset, h, monkeypatch):
    """train() builds the streaming loader with model.config.system_prompt, so conversations are rendered as
    model.chat renders them (the frozen cache applies it on its own)."""
    import lmm.data
    from lmm.training import TrainConfig, train

    seen = {}

    class Stop(Exception):
        pass

    def fake_build_loader(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(lmm.data, "build_loader", fake_build_loader)
    cfg = h.run_config(tmp_path / "run", tiny_dir, dataset, model_overrides=["system_prompt=Be terse."])
    with pytest.raises(Stop):
        train(TrainConfig.from_dict(cfg))
    assert seen["system_prompt"] == "Be terse."
