"""Frozen causal LM: any HF `AutoModelForCausalLM` from a local folder, a GGUF file, or a config dict."""

from __future__ import annotations

from pathlib import Path

import torch

from lmm.config import ConfigError, LanguageConfig, require_bitsandbytes


def load_language_model(cfg: LanguageConfig, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """Return the frozen LM (eval mode, no grad) in `dtype` on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attn = None if cfg.attn_implementation == "auto" else cfg.attn_implementation
    kwargs: dict = {"dtype": dtype, "attn_implementation": attn}
    if cfg.load_in_4bit:
        require_bitsandbytes("language.load_in_4bit (QLoRA)", "set language.load_in_4bit=false")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
        kwargs["device_map"] = {"": torch.device(device).index or 0}
    if cfg.path is not None:
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"language.path: model folder not found: {cfg.path}")
        if cfg.gguf_file:
            kwargs["gguf_file"] = cfg.gguf_file
        lm = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    elif cfg.hf_config is not None:
        d = dict(cfg.hf_config)
        if "model_type" not in d:
            raise ConfigError("language.hf_config needs a model_type (e.g. llama, qwen2, gpt2)")
        with torch.device(device):  # random weights made where they will live ("meta": nothing allocated)
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d), **kwargs)
    else:
        raise ConfigError("language needs path (an HF folder) or hf_config (random weights)")
    if not cfg.load_in_4bit:
        lm.to(device)
    lm.requires_grad_(False)
    lm.eval()
    return lm


def load_tokenizer(cfg: LanguageConfig):
    """The LM's tokenizer, from `tokenizer_path` or the model folder (GGUF too)."""
    from transformers import AutoTokenizer

    path = cfg.tokenizer_path or cfg.path
    if path is None:
        raise ConfigError(
            "no tokenizer: set language.tokenizer_path (a random-weight LM has no tokenizer), "
            "or pass tokenizer= to LMM.from_config"
        )
    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer folder not found: {path}")
    kw = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer_path else {}
    return AutoTokenizer.from_pretrained(path, **kw)
