"""HF `IdeficsForVisionText2Text` folder (IDEFICS 9B/80B and instruct) -> lmm model directory (flamingo bridge).

    lmm convert idefics --model idefics-9b-instruct/ --out idefics9b

Mapping, checked by the parity tests against transformers' own IDEFICS:
- vision: its CLIP-style ViT as an HF CLIP tower (all tokens of the last layer, CLS included, no final norm);
- perceiver: latents attend to media + latents, pre-LayerNorm, `qk_layer_norms_perceiver` as lmm's qk_norm, its
  ReLU MLP (`perceiver.ff_act=relu`), final LayerNorm; one image per perceiver call, no time embeddings;
- cross-attention: `IdeficsGatedCrossAttentionLayer` before decoder layers 0, k, 2k ... (`cross_layer_interval`
  k) as lmm blocks with RMSNorm pre-norms and q/k norms (`qk_layer_norms`), separate k/v projections joined into
  one, a SwiGLU MLP, tanh gates of `alpha_type` float (one) or vector (one per channel); a token sees only the
  image at or before it (IDEFICS's processor mask); the gated MLP runs on every token, images or not;
- language model: its Llama-style decoder as a transformers LlamaForCausalLM; the decoupled embedding and head
  (`additional_vocab_size`: `<fake_token_around_image>`, `<image>` ...) concatenated after the base rows, so ids
  and logits are IDEFICS's; lmm's `<|endofchunk|>` is not in IDEFICS's vocabulary: its logit is -inf.
Prompts keep IDEFICS's format: `<fake_token_around_image><image><fake_token_around_image>` around each image.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lmm.config import (
    BridgeConfig,
    ConfigError,
    CrossAttnConfig,
    LanguageConfig,
    LMMConfig,
    PerceiverConfig,
    VisionConfig,
)
from lmm.convert.interop import copy_tensors, save_converted
from lmm.tokens import END_OF_CHUNK_TOKEN


def load_idefics(path: str | Path):
    from transformers import IdeficsForVisionText2Text

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model: not an HF model folder (no config.json): {p}")
    kind = json.loads((p / "config.json").read_text()).get("model_type")
    if kind != "idefics":
        hint = " (IDEFICS2/3 use a different architecture: not supported)" if kind in ("idefics2", "idefics3") else ""
        raise ConfigError(f"--model: {p} is a {kind!r} model, not 'idefics' (IdeficsForVisionText2Text){hint}")
    return IdeficsForVisionText2Text.from_pretrained(p, dtype=torch.float32).eval()


def idefics_lmm_config(c) -> LMMConfig:
    v, p = c.vision_config, c.perceiver_config
    if not c.use_resampler:
        raise ConfigError("use_resampler=false (image tokens straight into cross-attention) is not supported")
    if c.hidden_act != "silu":
        raise ConfigError(f"hidden_act={c.hidden_act!r}: lmm's SwiGLU blocks use silu")
    if c.alpha_type not in ("float", "vector"):
        raise ConfigError(f"alpha_type={c.alpha_type!r}: only float and vector gates exist")
    n_cross = c.num_hidden_layers // c.cross_layer_interval
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": v.embed_dim,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
    }
    language = {
        "model_type": "llama",
        "vocab_size": c.vocab_size + c.additional_vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_attention_heads,
        "hidden_act": c.hidden_act,
        "rms_norm_eps": c.rms_norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_parameters": dict(c.rope_parameters),
        "tie_word_embeddings": bool(c.tie_word_embeddings),
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
    }
    bridge = BridgeConfig(
        kind="flamingo",
        perceiver=PerceiverConfig(
            num_latents=p.resampler_n_latents,
            depth=p.resampler_depth,
            heads=p.resampler_n_heads,
            head_dim=p.resampler_head_dim,
            ff_mult=4,
            qk_norm=p.qk_layer_norms_perceiver,
            ff_act="relu",
            max_media=64,
        ),
        cross_attn=CrossAttnConfig(
            layers=[k * c.cross_layer_interval for k in range(n_cross)],
            heads=c.num_attention_heads,
            head_dim=c.hidden_size // c.num_attention_heads,
            qk_norm=c.qk_layer_norms,
            only_previous_image=True,
            dense_without_media=True,
            norm="rms",
            norm_eps=c.rms_norm_eps,
            ff_act="swiglu",
            ff_hidden=c.intermediate_size,
            vector_gates=c.alpha_type == "vector",
        ),
    )
    return LMMConfig(
        vision=VisionConfig(kind="hf", hf_config=vision, layer=-1, include_cls=True, resize_mode="squash"),
        language=LanguageConfig(hf_config=language, suppress_tokens=[END_OF_CHUNK_TOKEN]),
        bridge=bridge,
        dtype="auto",
        name="idefics",
    )


def _perceiver_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"blocks\.(\d+)\.(0|1)\.(.+)$", k)
        if not m:
            out[{"layer_norm.weight": "norm.weight", "layer_norm.bias": "norm.bias"}.get(k, k)] = v
            continue
        i, part, rest = m.groups()
        if part == "1":
            mlp = {"ln.": "ff.0.", "fc.": "ff.1.", "c_proj.": "ff.3."}
            pre = next(a for a in mlp if rest.startswith(a))
            out[f"layers.{i}.{mlp[pre]}{rest[len(pre) :]}"] = v
            continue
        attn = {
            "context_layer_norm.": "norm_media.",
            "latents_layer_norm.": "norm_latents.",
            "q_proj.": "attn.to_q.",
            "output_proj.": "attn.to_out.",
            "q_layer_norm.": "attn.q_norm.",
            "k_layer_norm.": "attn.k_norm.",
        }
        if rest == "k_proj.weight":
            out[f"layers.{i}.attn.to_kv.weight"] = torch.cat([v, state[f"blocks.{i}.0.v_proj.weight"]])
        elif rest != "v_proj.weight":
            pre = next(a for a in attn if rest.startswith(a))
            out[f"layers.{i}.{attn[pre]}{rest[len(pre) :]}"] = v
    return out


def _block_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {
        "input_layernorm.weight": "norm.weight",
        "cross_attn.q_proj.weight": "attn.to_q.weight",
        "cross_attn.o_proj.weight": "attn.to_out.weight",
        "cross_attn.q_layer_norm.weight": "attn.q_norm.weight",
        "cross_attn.k_layer_norm.weight": "attn.k_norm.weight",
        "post_attention_layernorm.weight": "ff.0.weight",
        "mlp.gate_proj.weight": "ff.1.gate_proj.weight",
        "mlp.up_proj.weight": "ff.1.up_proj.weight",
        "mlp.down_proj.weight": "ff.1.down_proj.weight",
    }
    out = {
        names.get(k, k): v
        for k, v in state.items()
        if k not in ("cross_attn.k_proj.weight", "cross_attn.v_proj.weight")
    }
    out["attn.to_kv.weight"] = torch.cat([state["cross_attn.k_proj.weight"], state["cross_attn.v_proj.weight"]])
    out["attn_gate"] = out.pop("alpha_cross_attn").reshape(-1)
    out["ff_gate"] = out.pop("alpha_dense").reshape(-1)
    return out


def _prefixed(ours: dict, theirs: dict) -> dict:
    """IDEFICS's vision tensors under the names of lmm's CLIP tower (with or without its `vision_model.` prefix)."""
    pre = "vision_model." if any(k.startswith("vision_model.") for k in ours) else ""
    return {pre + k: v for k, v in theirs.items()}


def build_from_idefics(path: str | Path, dtype: str = "fp32"):
    """The converted LMM in memory (CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmm.backbones.vision import build_vision_tower
    from lmm.convert.llava import set_marker_rows
    from lmm.fusion import find_layer_list
    from lmm.model import LMM, resolve_dtype

    src = load_idefics(path)
    c = src.config
    config = idefics_lmm_config(c)
    tok = AutoTokenizer.from_pretrained(path)
    if "<image>" not in tok.get_vocab() or tok.convert_tokens_to_ids("<image>") < c.vocab_size:
        raise ConfigError("the tokenizer's <image> token is missing or not one of IDEFICS's additional tokens")
    m = src.model
    vision = build_vision_tower(config.vision)
    copy_tensors(
        dict(vision.model.state_dict()),
        _prefixed(vision.model.state_dict(), m.vision_model.state_dict()),
        "vision tower",
    )
    lcfg = dict(config.language.hf_config)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(lcfg.pop("model_type"), **lcfg), dtype=torch.float32)
    emb = m.embed_tokens
    text = {f"model.{k}": v for k, v in m.state_dict().items() if k.startswith(("layers.", "norm."))}
    extra_emb = [emb.additional_embedding.weight] if c.additional_vocab_size else []
    text["model.embed_tokens.weight"] = torch.cat([emb.weight, *extra_emb])
    if not lm.config.tie_word_embeddings:
        head = src.lm_head
        extra_head = [head.additional_fc.weight] if c.additional_vocab_size else []
        text["lm_head.weight"] = torch.cat([head.weight, *extra_head])
    copy_tensors({k: v for k, v in lm.state_dict().items()}, text, "language model")
    lm.requires_grad_(False).eval()
    frozen = resolve_dtype(dtype, torch.device("cpu"))
    model = LMM(config, vision.to(frozen), lm.to(frozen), tok)
    copy_tensors(
        dict(model.resampler.named_parameters()),
        _perceiver_names(m.perceiver_resampler.state_dict())
        | {k: torch.zeros_like(getattr(model.resampler, k)) for k in ("frame_embs", "media_time_embs")},
        "perceiver",
    )
    layers = find_layer_list(model.lm)
    for k, i in enumerate(config.bridge.cross_attn.layers):
        block_state = {n: t for n, t in m.gated_cross_attn_layers[k].state_dict().items() if "rotary" not in n}
        copy_tensors(dict(layers[i].block.named_parameters()), _block_names(block_state), f"cross-attention {k}")
    set_marker_rows(model)  # <image>: IDEFICS's own rows; <|endofchunk|>: a suppressed new column
    return model


def convert_idefics(path: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Convert and save to `out` (written whole or not at all); returns `out`."""
    model = build_from_idefics(path, dtype)
    return save_converted(model, out, {"source": "idefics", "model": str(path)})
