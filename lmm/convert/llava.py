"""HF `LlavaForConditionalGeneration` folder (LLaVA-1.5 layout) -> lmm model directory on the projector bridge.

    lmm convert llava --model llava-1.5-7b-hf/ --out llava15

Mapping, checked by the parity tests against transformers' own LLaVA:
- vision: its CLIP (or SigLIP) tower as lmm's HF tower, tokens from hidden_states[vision_feature_layer]; the
  `default` select strategy drops CLS, `full` keeps it;
- projector: linear_1 -> GELU -> linear_2 as lmm's 2-layer Projector (biases copied; zero where LLaVA has none);
- image tokens: one `<image>` (LLaVA's image token, same id) expands into the image's features inside lmm (early
  fusion splice) where LLaVA's processor repeats the token; the positions come out the same;
- language model and head: its decoder with its own weights; lmm's `<|endofchunk|>` takes a spare vocabulary row
  where the model has one (LLaVA-1.5 pads its vocabulary to 32064), so every logit is LLaVA's; without one it gets
  a new column whose logit is -inf (`language.suppress_tokens`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmm.config import BridgeConfig, ConfigError, LanguageConfig, LMMConfig, ProjectorConfig, VisionConfig
from lmm.convert.interop import copy_tensors, plain_config_dict, save_converted

SUPPORTED_VISION = ("clip_vision_model", "siglip_vision_model")


def load_llava(path: str | Path):
    """The HF LLaVA model (fp32, eval) from a local folder, with a clear error for other kinds of folder."""
    import json

    from transformers import LlavaForConditionalGeneration

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model: not an HF model folder (no config.json): {p}")
    kind = json.loads((p / "config.json").read_text()).get("model_type")
    if kind != "llava":
        hint = " (LLaVA-NeXT / 1.6 tiles images into a grid lmm's projector bridge does not do)" if kind else ""
        raise ConfigError(f"--model: {p} is a {kind!r} model, not 'llava' (LlavaForConditionalGeneration){hint}")
    model = LlavaForConditionalGeneration.from_pretrained(p, dtype=torch.float32)
    return model.eval()


def llava_lmm_config(cfg) -> LMMConfig:
    """The lmm config of an HF LlavaConfig (refusing what the projector bridge cannot express)."""
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    vtype = cfg.vision_config.model_type
    if not isinstance(layer, int):
        raise ConfigError(f"vision_feature_layer={layer}: features concatenated from several layers are not supported")
    if strategy not in ("default", "full"):
        raise ConfigError(f"vision_feature_select_strategy={strategy!r}: only 'default' and 'full' are supported")
    if vtype not in SUPPORTED_VISION:
        raise ConfigError(f"vision tower {vtype!r}: lmm's HF tower takes {', '.join(SUPPORTED_VISION)}")
    if cfg.projector_hidden_act != "gelu":
        raise ConfigError(f"projector_hidden_act={cfg.projector_hidden_act!r}: lmm's projector is Linear-GELU-Linear")
    if strategy == "default" and vtype != "clip_vision_model":
        raise ConfigError("vision_feature_select_strategy='default' drops a CLS token this tower does not have")
    return LMMConfig(
        vision=VisionConfig(
            kind="hf", hf_config=plain_config_dict(cfg.vision_config), layer=layer, include_cls=strategy == "full"
        ),
        language=LanguageConfig(hf_config=plain_config_dict(cfg.text_config)),
        bridge=BridgeConfig(kind="projector", projector=ProjectorConfig(depth=2, hidden_mult=1)),
        dtype="auto",
        name="llava",
    )


def build_from_llava(path: str | Path, dtype: str = "fp32"):
    """The converted LMM in memory (CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmm.backbones.vision import build_vision_tower
    from lmm.model import LMM, resolve_dtype

    llava = load_llava(path)
    cfg = llava.config
    config = llava_lmm_config(cfg)
    tok = AutoTokenizer.from_pretrained(path)
    image_id = getattr(cfg, "image_token_id", None)
    if image_id is None:
        image_id = cfg.image_token_index
    image_token = tok.convert_ids_to_tokens(image_id)
    if image_token != "<image>":
        raise ConfigError(f"the tokenizer's image token (id {image_id}) is {image_token!r}, not '<image>'")
    vision = build_vision_tower(config.vision)
    copy_tensors(dict(vision.model.state_dict()), dict(llava.model.vision_tower.state_dict()), "vision tower")
    lm = AutoModelForCausalLM.from_config(cfg.text_config, dtype=torch.float32)
    copy_tensors(dict(lm.base_model.state_dict()), dict(llava.model.language_model.state_dict()), "language model")
    with torch.no_grad():
        lm.get_output_embeddings().weight.copy_(llava.lm_head.weight)
    if "<|endofchunk|>" not in tok.get_vocab() and len(tok) >= lm.get_output_embeddings().weight.shape[0]:
        config.language.suppress_tokens = ["<|endofchunk|>"]  # no spare row: lmm's marker gets a column LLaVA lacks
    frozen = resolve_dtype(dtype, torch.device("cpu"))
    lm.requires_grad_(False).eval()
    model = LMM(config, vision.to(frozen), lm.to(frozen), tok)
    if (model.image_token_id, tok.convert_tokens_to_ids("<image>")) != (image_id, image_id):
        raise ConfigError("lmm's <image> id does not match the model's image_token_id")
    # the projector; LLaVA without biases (multimodal_projector_bias=false) -> zero biases
    proj = llava.model.multi_modal_projector
    ours = dict(model.resampler.named_parameters())
    src = {"mlp.0.weight": proj.linear_1.weight, "mlp.2.weight": proj.linear_2.weight}
    src["mlp.0.bias"] = proj.linear_1.bias if proj.linear_1.bias is not None else torch.zeros_like(ours["mlp.0.bias"])
    src["mlp.2.bias"] = proj.linear_2.bias if proj.linear_2.bias is not None else torch.zeros_like(ours["mlp.2.bias"])
    src["frame_embs"] = torch.zeros_like(ours["frame_embs"])
    copy_tensors(ours, src, "projector")
    set_marker_rows(model)
    return model


def set_marker_rows(model) -> None:
    """lmm's trainable marker rows (`<image>`, `<|endofchunk|>`) = the model's own rows where its vocabulary has
    them (logits then unchanged); beyond it, the mean row (a new column only)."""
    emb, head = model.embed.base.weight, model.head.base.weight
    with torch.no_grad():
        for k, i in enumerate(model.embed.new_ids.tolist()):
            model.embed.extra[k] = (emb[i] if i < emb.shape[0] else emb.float().mean(0)).float()
        for k, i in enumerate(model.head.new_ids.tolist()):
            model.head.extra[k] = (head[i] if i < head.shape[0] else head.float().mean(0)).float()


def convert_llava(path: str | Path, out: str | Path, dtype: str = "fp32") -> Path:
    """Convert and save to `out` (written whole or not at all); returns `out`."""
    model = build_from_llava(path, dtype)
    return save_converted(model, out, {"source": "llava", "model": str(path)})
