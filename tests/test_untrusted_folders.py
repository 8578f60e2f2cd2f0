"""A model folder is untrusted input: its config cannot make lmm write outside a private temp folder, and its
weight files load only with exactly the names and shapes the model has."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmm.config import ConfigError
from lmm.model import LMM
from lmm.testing import tiny_lmm


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model"
    tiny_lmm(gates=0.5).save_pretrained(path)
    return path


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def test_a_vision_name_with_a_path_writes_nothing_and_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    cfg = json.loads((folder / "lmm_config.json").read_text())
    (tmp_path / "outside").mkdir()  # an existing folder, so that a path in the name could be written to
    target = tmp_path / "outside" / "pwned"
    cfg["vision"]["name"] = f"../../../../../..{target}"
    (folder / "lmm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="plain identifier"):
        LMM.from_pretrained(folder, device="cpu")
    assert list((tmp_path / "outside").iterdir()) == []


@pytest.mark.parametrize("file", ["trainable.safetensors", "frozen.safetensors"])
def test_a_wrong_shaped_tensor_is_a_config_error_naming_it(saved, tmp_path, file):
    folder = _copy(saved, tmp_path)
    tensors = load_file(folder / file)
    name = next(k for k, v in tensors.items() if v.ndim == 2)
    tensors[name] = torch.tensor(0.5)  # a 0-dim tensor would broadcast over the whole parameter with copy_
    save_file(tensors, folder / file)
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        LMM.from_pretrained(folder, device="cpu")


def test_a_frozen_file_missing_tensors_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    tensors = load_file(folder / "frozen.safetensors")
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, folder / "frozen.safetensors")
    with pytest.raises(ConfigError, match="lacks frozen weights"):
        LMM.from_pretrained(folder, device="cpu")
