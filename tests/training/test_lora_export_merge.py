"""LoRA instruction tuning saves only adapter + bridge weights and reloads identically; the LoRA export
merges into the LM and generates the same tokens; `lmm merge` interpolates compatible models only."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from lmm.config import ConfigError
from lmm.export import export_merged
from lmm.merge import IncompatibleModels, merge_models
from lmm.model import LMM
from lmm.training import TrainConfig, train

LORA = ["lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_dir, dataset, h):
    """A LoRA instruction-tuning run started from the saved tiny model with LoRA switched on by override."""
    tmp = tmp_path_factory.mktemp("lora")
    cfg = TrainConfig.from_dict(
        h.run_config(
            tmp / "run",
            tiny_dir,
            dataset,
            model_overrides=LORA,
            optim={"lr": 1e-2},
            schedule={"max_steps": 8, "warmup_steps": 1},
        )
    )
    result = train(cfg)
    return result


def prompts(dataset):
    rows = [json.loads(line) for line in open(dataset)][:3]
    return [r["conversations"][0]["value"] for r in rows], [[Image.open(r["image"])] for r in rows]


def greedy(model, dataset):
    texts, images = prompts(dataset)
    return [model.generate(t, images=im, max_new_tokens=6, stop_at_end_of_chunk=False) for t, im in zip(texts, images)]


def test_lora_run_saves_only_adapter_and_bridge_weights(lora_run, tiny_dir):
    assert lora_run.losses[-1] < lora_run.losses[0]
    saved = load_file(lora_run.output_dir / "trainable.safetensors")
    lora = [k for k in saved if "lora_" in k]
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    bridge = set(saved) - set(lora)
    assert all(k.startswith(("resamplers.", "embed.extra", "head.extra")) or ".block." in k for k in bridge), bridge
    assert not any(k.endswith(("q_proj.base_layer.weight", "embed_tokens.weight")) for k in saved)
    assert any(float(saved[k].abs().max()) > 0 for k in lora if ".lora_B." in k)  # B starts at 0: it trained
    start = load_file(f"{tiny_dir}/trainable.safetensors")
    changed = [k for k in start if not torch.equal(start[k], saved[k])]
    assert changed  # the bridge trained too


def test_lora_model_reloads_and_generates_identically(lora_run, dataset):
    model = LMM.from_pretrained(lora_run.output_dir, device="cpu")
    again = LMM.from_pretrained(lora_run.output_dir, device="cpu")
    assert model.config.lora.r == 4
    for (k, v), (k2, v2) in zip(model.trainable_state_dict().items(), again.trainable_state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert greedy(model, dataset) == greedy(again, dataset)


def test_export_merges_lora_into_the_lm_and_generates_the_same_tokens(lora_run, dataset, tmp_path):
    model = LMM.from_pretrained(lora_run.output_dir, device="cpu")
    expected = greedy(model, dataset)
    texts, images = prompts(dataset)
    out = export_merged(lora_run.output_dir, tmp_path / "merged")
    merged = LMM.from_pretrained(out, device="cpu")
    assert merged.config.lora.r == 0
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert not any("lora_" in k for k in load_file(out / "trainable.safetensors"))
    assert greedy(merged, dataset) == expected
    enc = model.tokenizer(texts[0], return_tensors="pt")
    pix = model.image_processor(images[0][0])[None, None, None]
    with torch.no_grad():
        a = model(enc.input_ids, enc.attention_mask, pixel_values=pix).logits
        b = merged(enc.input_ids, enc.attention_mask, pixel_values=pix).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_export_refuses_a_model_without_lora(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="no LoRA layers"):
        export_merged(tiny_dir, tmp_path / "x")


@pytest.fixture(scope="module")
def two_finetunes(tmp_path_factory, tiny_dir, dataset, h):
    """Two short fine-tunes of the same start on different data orders / learning rates."""
    tmp = tmp_path_factory.mktemp("finetunes")
    outs = []
    for i, lr in enumerate([1e-2, 3e-3]):
        cfg = h.run_config(
            tmp / f"r{i}",
            tiny_dir,
            dataset,
            optim={"lr": lr},
            data={"seed": i},
            schedule={"max_steps": 3, "warmup_steps": 0},
        )
        outs.append(train(TrainConfig.from_dict(cfg)).output_dir)
    return outs


def test_merge_alpha_0_and_1_reproduce_each_endpoint_exactly(two_finetunes, tmp_path):
    a, b = two_finetunes
    wa, wb = load_file(a / "trainable.safetensors"), load_file(b / "trainable.safetensors")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    for alpha, expected in ((0.0, wa), (1.0, wb)):
        out = merge_models(a, b, alpha, tmp_path / f"m{alpha}")
        got = load_file(out / "trainable.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    half = load_file(merge_models(a, b, 0.5, tmp_path / "half") / "trainable.safetensors")
    for k in wa:
        torch.testing.assert_close(half[k], (wa[k] + wb[k]) / 2)
    LMM.from_pretrained(tmp_path / "half", device="cpu")  # opens as a normal model


def test_lmm_merge_cli_and_refusals(two_finetunes, lora_run, tiny_dir, tmp_path):
    from lmm.cli import app

    a, b = two_finetunes
    res = CliRunner().invoke(app, ["merge", str(a), str(b), "--alpha", "0.25", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "trainable.safetensors").is_file()
    res = CliRunner().invoke(app, ["merge", str(a), str(lora_run.output_dir), "--out", str(tmp_path / "d")])
    assert res.exit_code == 2 and "different model configs" in res.output and "lora" in res.output
    with pytest.raises(IncompatibleModels, match="not a save_pretrained"):
        merge_models(a, tmp_path, 0.5, tmp_path / "e")
    with pytest.raises(ConfigError, match="alpha"):
        merge_models(a, b, 1.5, tmp_path / "f")
