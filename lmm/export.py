"""Export a LoRA-tuned model with the adapters merged into the LM's weights (peft's merge).

    from lmm.export import export_merged
    export_merged("runs/instruct/final", "runs/instruct/merged")     # or python -m lmm.export SRC OUT

The result is an ordinary save_pretrained directory with `lora.r = 0`: the merged LM weights are
written to frozen.safetensors (only the tensors LoRA changed when the LM comes from a path), so
`LMM.from_pretrained` opens it and generates the same tokens without peft layers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from lmm.config import ConfigError, LoraSettings


def merge_lora_(model: nn.Module) -> list[str]:
    """Merge every peft LoRA layer of `model.lm` into its base layer and put the base layer back in its
    place (the model was made with `inject_adapter_in_model`, so there is no PeftModel to unload).
    Returns the names (in `model`) of the weights that changed. `model.config.lora` becomes r=0."""
    from peft.tuners.lora import LoraLayer

    lora_modules = [(name, m) for name, m in model.lm.named_modules() if isinstance(m, LoraLayer)]
    if not lora_modules:
        raise ConfigError("this model has no LoRA layers to merge (its config has lora.r = 0)")
    changed = []
    for name, module in lora_modules:
        module.merge(safe_merge=True)
        base = module.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        parent = model.lm.get_submodule(parent_name) if parent_name else model.lm
        setattr(parent, child, base)
        changed += [f"lm.{name}.{n}" for n, _ in base.named_parameters()]
    model.config.lora = LoraSettings(r=0)
    return changed


def export_merged(src: str | Path | nn.Module, out: str | Path, device: str = "cpu") -> Path:
    """Load `src` (a save_pretrained dir or an LMM), merge its LoRA adapters, save to `out`."""
    from safetensors.torch import save_file

    from lmm.model import FROZEN_FILE, LMM

    model = src if isinstance(src, nn.Module) else LMM.from_pretrained(src, device=device)
    changed = merge_lora_(model)
    out = Path(out)
    model.save_pretrained(out)
    if not (out / FROZEN_FILE).is_file():  # frozen weights come from paths: store the merged ones only
        state = dict(model.named_parameters())
        save_file({k: state[k].detach().contiguous().cpu() for k in changed}, out / FROZEN_FILE)
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m lmm.export SRC_MODEL_DIR OUT_DIR   (merge LoRA adapters into the LM)", file=sys.stderr)
        raise SystemExit(2)
    with torch.no_grad():
        print(f"merged model: {export_merged(args[0], args[1])}")


if __name__ == "__main__":
    main()
