"""lmm flamingo model with OpenFlamingo's shapes -> what open_flamingo loads.

    lmm export openflamingo runs/mine/final --out mine-of

writes OUT/checkpoint.pt (OpenFlamingo's parameter names: perceiver, gated cross-attention, trained embedding and
head rows), OUT/lm (the decoder as an HF folder, with lmm's tokenizer), OUT/vision.pt (the open_clip weights) and
OUT/openflamingo.json (the arguments), for:

    model, _, tok = create_model_and_transforms(vision_name, OUT/vision.pt, OUT/lm, OUT/lm,
                                                cross_attn_every_n_layers=N, decoder_layers_attr_name=...)
    model.load_state_dict(torch.load(OUT/checkpoint.pt, weights_only=True), strict=False)

Exportable: OpenFlamingo's fixed shapes (perceiver 6 x 64 latents, 8 heads x 64; cross-attention 8 heads x 64,
FFN x4, before layer i when (i + 1) % N == 0), an open_clip ViT with OpenFlamingo's tokens (final_norm, no CLS,
last layer), Flamingo's block options, and media-time / frame embeddings at zero (OpenFlamingo's perceiver has
none; `drop_time_embeddings` drops trained ones, which changes the outputs). For a tied-embedding LM (MPT) the
marker tokens' head rows are their embedding rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmm.config import ConfigError
from lmm.convert.interop import publish

OF_SHAPES = {"depth": 6, "num_latents": 64, "heads": 8, "head_dim": 64, "ff_mult": 4}


def check_exportable(model, drop_time_embeddings: bool = False) -> list[int]:
    """The decoder layers with cross-attention; a ConfigError naming what OpenFlamingo cannot hold."""
    from lmm.fusion import FusedLayer, find_layer_list

    c = model.config
    b, v = c.bridge, c.vision
    if b.kind != "flamingo" or not b.use_perceiver:
        raise ConfigError(f"OpenFlamingo export needs the flamingo bridge with a perceiver (this model: {b.kind})")
    if set(model.encoders) != {"image"} or b.contrastive_dim:
        raise ConfigError("OpenFlamingo export takes image-only models without a contrastive head")
    if v.kind != "open_clip" or not v.final_norm or v.include_cls or v.layer not in (-1, model.vision.num_blocks - 1):
        raise ConfigError(
            "OpenFlamingo export needs an open_clip ViT giving OpenFlamingo's tokens: vision.final_norm=true, "
            "vision.include_cls=false, vision.layer=-1"
        )
    p = b.perceiver
    wrong = {k: getattr(p, k) for k, want in OF_SHAPES.items() if getattr(p, k) != want}
    wrong |= {k: True for k in ("qk_norm", "cosine_attn", "rope_2d") if getattr(p, k, False)}
    if getattr(p, "ff_act", "gelu") != "gelu":
        wrong["ff_act"] = p.ff_act
    if wrong:
        raise ConfigError(f"OpenFlamingo's perceiver is fixed at {OF_SHAPES}, GELU, no options; this one has {wrong}")
    x = b.cross_attn
    layers = [i for i, m in enumerate(find_layer_list(model.lm)) if isinstance(m, FusedLayer)]
    every = layers[0] + 1 if layers else 0
    n = len(find_layer_list(model.lm))
    wrong = {k: getattr(x, k) for k in ("heads", "head_dim", "ff_mult") if getattr(x, k) != OF_SHAPES[k]}
    if layers != list(range(every - 1, n, every)) or not layers:
        wrong["layers"] = layers
    for k, default in (("qk_norm", False), ("cosine_attn", False), ("norm", "layer"), ("ff_act", "gelu")):
        if getattr(x, k, default) != default:
            wrong[k] = getattr(x, k)
    if getattr(x, "vector_gates", False) or not x.only_previous_image:
        wrong["gates/masking"] = "vector gates or all previous images"
    if wrong:
        raise ConfigError(
            "OpenFlamingo's cross-attention is 8 heads x 64, FFN x4, Flamingo's block, before layer i when "
            f"(i + 1) % N == 0, immediate image only; this one has {wrong}"
        )
    r = model.resampler
    if not drop_time_embeddings and (bool(r.media_time_embs.any()) or bool(r.frame_embs.any())):
        raise ConfigError(
            "this perceiver learned media-time / frame embeddings, which OpenFlamingo's perceiver does not have; "
            "export with --drop-time-embeddings (outputs then change) or train with them at zero"
        )
    return layers


def _layers_path(lm) -> str:
    from lmm.fusion import find_layer_list

    layers = find_layer_list(lm)
    return next(n for n, m in lm.named_modules() if m is layers)


def _unwrapped_lm_state(model, layers: list[int]) -> dict[str, torch.Tensor]:
    """The decoder's own tensors under its own names (the fused layers' blocks left out)."""
    prefixes = [f"{_layers_path(model.lm)}.{i}." for i in layers]
    out = {}
    for k, t in model.lm.state_dict().items():
        pre = next((p for p in prefixes if k.startswith(p)), None)
        if pre is None:
            out[k] = t
        elif k.startswith(pre + "layer."):
            out[pre + k[len(pre + "layer.") :]] = t
    return out


def checkpoint_state(model, layers: list[int]) -> dict[str, torch.Tensor]:
    """OpenFlamingo's names for the perceiver, the blocks and the embedding / head matrices (lmm's marker rows in)."""
    import re

    from lmm.fusion import find_layer_list

    lm = model.lm
    layers_path = _layers_path(lm)
    state: dict[str, torch.Tensor] = {}
    for k, t in model.resampler.state_dict().items():
        if k in ("frame_embs", "media_time_embs"):
            continue
        k = re.sub(r"^layers\.(\d+)\.(norm_media|norm_latents)\.", r"layers.\1.0.\2.", k)
        k = re.sub(r"^layers\.(\d+)\.attn\.", r"layers.\1.0.", k)
        k = re.sub(r"^layers\.(\d+)\.ff\.", r"layers.\1.1.", k)
        state[f"perceiver.{k}"] = t.float()
    fused = find_layer_list(lm)
    for i in layers:
        for k, t in fused[i].block.state_dict().items():
            k = "attn.norm." + k[len("norm.") :] if k.startswith("norm.") else k
            state[f"lang_encoder.{layers_path}.{i}.gated_cross_attn_layer.{k}"] = t.float()
    n_tok = len(model.tokenizer)
    ids = model.embed.new_ids.tolist()
    emb = lm.get_input_embeddings()
    emb_name = next(n for n, p in lm.named_parameters(remove_duplicate=False) if p is emb.weight)
    state[f"lang_encoder.{emb_name}"] = _rows(emb.weight, n_tok, ids, model.embed.extra)
    head = lm.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        head_name = next(n for n, p in lm.named_parameters(remove_duplicate=False) if p is head.weight)
        state[f"lang_encoder.{head_name}"] = _rows(head.weight, n_tok, ids, model.head.extra)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def _rows(weight: torch.Tensor, n: int, ids: list[int], extra: torch.Tensor) -> torch.Tensor:
    """`weight` resized to `n` rows as OpenFlamingo's resize_token_embeddings(len(tokenizer)) does, marker rows set."""
    w = weight.detach().float()
    out = w.mean(0).repeat(n, 1)
    out[: min(n, w.shape[0])] = w[:n]
    out[ids] = extra.detach().float()
    return out


def _open_clip_state(model) -> dict[str, torch.Tensor]:
    """A whole open_clip model's state dict (what `pretrained=` loads strictly) holding this tower's weights; the
    text tower, which OpenFlamingo never runs, keeps its random init."""
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model(model.config.vision.name)
    clip.visual.load_state_dict(model.vision.visual.state_dict())
    return {k: v.detach().contiguous().cpu() for k, v in clip.state_dict().items()}


def export_openflamingo(src: str | Path, out: str | Path, drop_time_embeddings: bool = False) -> Path:
    """Write `src` (an lmm model directory) as OpenFlamingo files at `out` (whole or not at all)."""
    from transformers import AutoModelForCausalLM

    from lmm.export import merge_lora_
    from lmm.model import LMM

    model = LMM.from_pretrained(src, device="cpu").float()
    layers = check_exportable(model, drop_time_embeddings)
    if model.config.lora.r > 0:
        merge_lora_(model)
    state = checkpoint_state(model, layers)
    lm = AutoModelForCausalLM.from_config(model.lm.config, dtype=torch.float32)
    lm.load_state_dict(_unwrapped_lm_state(model, layers))
    every = layers[0] + 1
    layers_path = _layers_path(model.lm)
    args = {
        "clip_vision_encoder_path": model.config.vision.name,
        "clip_vision_encoder_pretrained": "vision.pt",
        "lang_encoder_path": "lm",
        "tokenizer_path": "lm",
        "cross_attn_every_n_layers": every,
        "decoder_layers_attr_name": layers_path,
    }

    def write(tmp: Path) -> None:
        torch.save(state, tmp / "checkpoint.pt")
        torch.save(_open_clip_state(model), tmp / "vision.pt")
        lm.save_pretrained(tmp / "lm")
        model.tokenizer.save_pretrained(tmp / "lm")
        if model.config.vision.model_cfg:
            (tmp / f"{model.config.vision.name}.json").write_text(json.dumps(model.config.vision.model_cfg))
        (tmp / "openflamingo.json").write_text(json.dumps(args, indent=2))

    return publish(out, write)
