"""QLoRA / 8-bit AdamW are refused at config validation with the fix named (bitsandbytes missing, or no
CUDA), and a run that starts from a saved directory with overrides loads only the saved weights over a model
built from its own frozen sources (the route by which QLoRA loads a 4-bit LM under a trained bridge)."""

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from lmm.config import ConfigError
from lmm.training import TrainConfig, build_model
from lmm.training.config import OptimConfig
from lmm.training.optim import build_optimizer

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(torch.cuda.is_available() and HAS_BNB, reason="QLoRA can run here")
@pytest.mark.parametrize("what", ["load_in_4bit", "eight_bit"])
def test_quantisation_without_its_requirements_names_the_fix(tmp_path, tiny_dir, dataset, h, what):
    cfg = h.run_config(tmp_path / "run", tiny_dir, dataset)
    if what == "eight_bit":
        cfg["optim"]["eight_bit"] = True
    else:
        cfg["model_overrides"] = ["lora.r=4", "language.load_in_4bit=true"]
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict(cfg).validate()
    msg = str(err.value)
    if HAS_BNB:
        assert "needs a CUDA GPU" in msg
    else:
        assert "needs the bitsandbytes package" in msg and "pip install" in msg
    assert ("set optim.eight_bit=false" if what == "eight_bit" else "drop that model override") in msg


@pytest.mark.skipif(torch.cuda.is_available() and HAS_BNB, reason="8-bit AdamW can run here")
def test_eight_bit_optimizer_refused_without_requirements():
    with pytest.raises(ConfigError, match="optim.eight_bit"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(eight_bit=True), torch.device("cpu"))


def test_start_from_saved_dir_with_overrides_loads_only_saved_weights(tmp_path, tiny_dir, dataset, h):
    cfg = TrainConfig.from_dict(
        h.run_config(
            tmp_path / "run", tiny_dir, dataset, model_overrides=["lora.r=4", "lora.target_modules=[q_proj,v_proj]"]
        )
    )
    model = build_model(cfg, torch.device("cpu"))
    saved = load_file(f"{tiny_dir}/trainable.safetensors")
    own = dict(model.named_parameters())
    for name, t in saved.items():
        assert torch.equal(own[name].detach(), t), name
    lora = [n for n in own if "lora_" in n]
    assert lora and not set(lora) & set(saved)
    frozen = load_file(f"{tiny_dir}/frozen.safetensors")  # a random-init LM: frozen weights come from the dir
    state = {**dict(model.named_buffers()), **own}
    name = next(n for n in frozen if n.endswith("embed_tokens.weight"))
    assert torch.equal(state[name], frozen[name])
