"""OpenFlamingo checkpoint -> lmm model directory, with OpenFlamingo's exact semantics.

    lmm convert openflamingo --checkpoint checkpoint.pt --vision ViT-L-14-quickgelu:clip.pt --lm mpt-7b/ --out of9b

An OpenFlamingo `checkpoint.pt` holds the perceiver, the gated cross-attention blocks and the trained input
embedding matrix (a full `model.state_dict()` also holds the frozen towers: they are checked against --vision and
--lm). Mapping, each checked by the parity tests against OpenFlamingo's own classes:
- tokens: OpenFlamingo's tokenizer additions in its order (`<|endofchunk|>`, `<image>`, then `<PAD>` when the
  tokenizer has no pad token), so every id is the original's; the embedding matrix (all rows trained) and, where
  the checkpoint has it, the output head replace the LM's; the `<image>` / `<|endofchunk|>` rows become lmm's
  trainable extra rows;
- vision: the open_clip ViT's final-layer patch tokens after its final LayerNorm, without CLS (`final_norm`);
- perceiver: OpenFlamingo's (keys/values = media + latents, pre-norm, final norm); its optional frame and
  media-time embeddings are copied (absent in its releases: zeros here, the same thing);
- cross-attention: `GatedCrossAttentionBlock` before decoder layer i when (i + 1) % N == 0 (first_layer N - 1),
  tanh gates on the attention and the dense block, only the immediately preceding image visible
  (`only_attend_immediate_media`), no cross-attention output before the first image.
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
from lmm.convert.interop import copy_tensors, load_weights, plain_config_dict, save_converted

OF_TOKENS = ["<|endofchunk|>", "<image>"]  # OpenFlamingo adds them in this order
OF_HEAD_DIM = 64  # OpenFlamingo's perceiver and cross-attention: dim_head=64 (heads = inner width / 64)
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
# tensor names of LMs as OpenFlamingo's transformers 4.x wrote them -> transformers 5 names
LEGACY_LM_NAMES = [(r"^embed_out\.", "lm_head.")]  # GPT-NeoX (RedPajama-INCITE for OpenFlamingo-4B, Pythia)


def parse_vision(spec: str) -> VisionConfig:
    """`NAME[:WEIGHTS]` -> an open_clip VisionConfig giving OpenFlamingo's visual tokens. NAME is an open_clip
    model name or a model-config JSON file (registered under its stem); WEIGHTS a local checkpoint file."""
    name, _, weights = spec.partition(":")
    model_cfg = None
    if name.endswith(".json"):
        p = Path(name)
        if not p.is_file():
            raise ConfigError(f"--vision: open_clip model config not found: {p}")
        model_cfg, name = json.loads(p.read_text()), p.stem
    else:
        import open_clip

        if open_clip.get_model_config(name) is None:
            raise ConfigError(
                f"--vision: {name!r} is not an open_clip model name (OpenFlamingo's releases use ViT-L-14 with "
                "OpenAI weights: pass ViT-L-14-quickgelu:/path/to/weights); or pass a model-config .json"
            )
    if weights and not Path(weights).is_file():
        raise ConfigError(f"--vision: weights file not found: {weights}")
    return VisionConfig(
        kind="open_clip", name=name, pretrained=weights or None, model_cfg=model_cfg, include_cls=False, final_norm=True
    )


def openflamingo_tokenizer(path: str | Path):
    """The LM's tokenizer with OpenFlamingo's additions, in its order (the ids then equal the original's)."""
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise ConfigError(f"tokenizer folder not found: {path}")
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": OF_TOKENS}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<PAD>"})
    return tok


def check_lm_folder(path: Path) -> None:
    """Refuse the remote-code decoders no transformers class computes (OpenFlamingo-3B's MPT-1B)."""
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    qk_ln = cfg.get("attn_qk_ln") or (cfg.get("attn_config") or {}).get("qk_ln")
    if cfg.get("model_type") == "mosaic_gpt" or (cfg.get("model_type") == "mpt" and qk_ln):
        raise ConfigError(
            f"--lm {path}: MosaicML's remote-code {cfg.get('model_type')} decoder with QK LayerNorm (e.g. "
            "mpt-1b-redpajama-200b under OpenFlamingo-3B) has no transformers implementation: transformers' "
            "MptForCausalLM has no QK LayerNorm, so its outputs cannot be reproduced (MPT-7B: OpenFlamingo-9B converts)"
        )


def normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's `module.` prefix and FSDP / activation-checkpointing wrapper segments."""
    out = {}
    for k, v in state.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        for seg in WRAPPER_SEGMENTS:
            k = k.replace(seg, "")
        out[k] = v
    return out


def _legacy(name: str, own: dict) -> str:
    if name in own:
        return name
    for pat, rep in LEGACY_LM_NAMES:
        name = re.sub(pat, rep, name)
    return name


class Checkpoint:
    """An OpenFlamingo state dict split into its parts, against a given LM (its layer-list path and tensors)."""

    def __init__(self, state: dict[str, torch.Tensor], lm, layers_path: str):
        if "perceiver.latents" not in state:
            hint = ""
            if any(k.startswith(("model.", "transformer.", "gpt_neox.", "lm_head.")) for k in state):
                hint = " (it looks like a language model's weights: pass those as --lm, a folder)"
            raise ConfigError(
                "--checkpoint is not an OpenFlamingo checkpoint: it has no perceiver.latents "
                f"(its first keys: {sorted(state)[:4]}){hint}"
            )
        lm_state = lm.state_dict()
        emb_names = _param_names(lm, lm.get_input_embeddings().weight)
        emb_name = emb_names[0]
        head = lm.get_output_embeddings()
        head_names = _param_names(lm, head.weight) if head is not None else []
        self.tied = bool(set(emb_names) & set(head_names))
        self.perceiver: dict[str, torch.Tensor] = {}
        self.xattn: dict[int, dict[str, torch.Tensor]] = {}
        self.vision: dict[str, torch.Tensor] = {}
        self.lm: dict[str, torch.Tensor] = {}  # frozen LM tensors a full state dict carries (checked, not used)
        self.embedding = self.head = None
        unexpected = []
        xattn_re = re.compile(
            rf"^lang_encoder\.(?:gated_cross_attn_layers\.(\d+)|{re.escape(layers_path)}\.(\d+)"
            r"\.gated_cross_attn_layer)\.(.+)$"
        )
        block_re = re.compile(
            rf"^lang_encoder\.(?:old_decoder_blocks\.(\d+)|{re.escape(layers_path)}\.(\d+)"
            r"\.decoder_layer)\.(.+)$"
        )
        for k, v in state.items():
            if k.startswith("perceiver."):
                self.perceiver[k[len("perceiver.") :]] = v
            elif k.startswith("vision_encoder."):
                self.vision[k[len("vision_encoder.") :]] = v
            elif m := xattn_re.match(k):
                i, rest = int(m.group(1) or m.group(2)), m.group(3)
                prev = self.xattn.setdefault(i, {}).get(rest)
                if prev is not None and not torch.equal(prev, v):
                    raise ConfigError(f"--checkpoint: two different copies of cross-attention tensor {k}")
                self.xattn[i][rest] = v
            elif m := block_re.match(k):
                name = _legacy(f"{layers_path}.{m.group(1) or m.group(2)}.{m.group(3)}", lm_state)
                if name in self.lm and not torch.equal(self.lm[name], v):
                    raise ConfigError(f"--checkpoint: two different copies of decoder tensor {k}")
                self.lm[name] = v
            elif k.startswith("lang_encoder."):
                name = _legacy(k[len("lang_encoder.") :], lm_state)
                if name in emb_names and (self.embedding is None or not self.tied):
                    self.embedding = v
                elif name in head_names:
                    self.head = v
                elif name in lm_state:
                    self.lm[name] = v
                else:
                    unexpected.append(k)
            else:
                unexpected.append(k)
        unexpected += [f"lang_encoder.{n}" for n in self.lm if n not in lm_state]
        if unexpected:
            raise ConfigError(
                f"--checkpoint has tensors OpenFlamingo with this --lm does not have: {sorted(unexpected)[:6]} "
                "(a checkpoint of another LM family or layout?)"
            )
        if self.embedding is None:
            raise ConfigError(f"--checkpoint lacks the trained input embeddings (lang_encoder.{emb_name})")
        if self.tied and self.head is not None and not torch.equal(self.head, self.embedding):
            raise ConfigError("--checkpoint: this LM ties its output head to its input embeddings, but they differ")
        if not self.xattn:
            raise ConfigError("--checkpoint has no gated cross-attention layers (lang_encoder.*.gated_cross_attn_*)")

    def cross_attn_every(self, n_layers: int, given: int | None) -> int:
        """OpenFlamingo puts a block before layer i when (i + 1) % N == 0: N from the blocks the checkpoint has."""
        idx = sorted(self.xattn)
        every = idx[0] + 1
        if idx != list(range(every - 1, n_layers, every)):
            raise ConfigError(
                f"--checkpoint has cross-attention before layers {idx[:8]} of {n_layers}: not OpenFlamingo's "
                "every-N pattern for this --lm (a checkpoint of an LM with another depth?)"
            )
        if given is not None and given != every:
            raise ConfigError(
                f"--cross-attn-every {given} disagrees with the checkpoint, whose blocks sit every {every} layers"
            )
        return every


def _param_names(module, tensor) -> list[str]:
    """Every name of a parameter (a tied head has two)."""
    return [n for n, p in module.named_parameters(remove_duplicate=False) if p is tensor]


def _check_same(found: dict[str, torch.Tensor], own: dict[str, torch.Tensor], what: str, fix: str) -> None:
    for k, v in found.items():
        mine = own.get(k)
        if mine is None or tuple(mine.shape) != tuple(v.shape):
            raise ConfigError(f"--checkpoint's {what} tensor {k} does not fit {fix} (shape {tuple(v.shape)})")
        if not torch.allclose(mine.float(), v.float(), rtol=1e-2, atol=1e-3):
            raise ConfigError(
                f"--checkpoint's frozen {what} tensor {k} differs from {fix}'s: pass the one it was trained with"
            )


def _perceiver_names(of: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenFlamingo perceiver names -> lmm's PerceiverResampler names."""
    out = {}
    for k, v in of.items():
        k2 = re.sub(r"^layers\.(\d+)\.0\.(norm_media|norm_latents)\.", r"layers.\1.\2.", k)
        k2 = re.sub(r"^layers\.(\d+)\.0\.(to_q|to_kv|to_out)\.", r"layers.\1.attn.\2.", k2)
        k2 = re.sub(r"^layers\.(\d+)\.1\.", r"layers.\1.ff.", k2)
        if k2 == "media_time_embs":
            v = v.reshape(v.shape[0], -1)  # (T, 1, D) -> (T, D)
        out[k2] = v
    return out


def _xattn_names(of: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenFlamingo GatedCrossAttentionBlock names -> lmm's."""
    return {("norm." + k[len("attn.norm.") :] if k.startswith("attn.norm.") else k): v for k, v in of.items()}


def bridge_config(ck: Checkpoint, lm_dim: int, every: int) -> BridgeConfig:
    """Perceiver and cross-attention shapes read from the checkpoint (OpenFlamingo fixes dim_head at 64)."""
    p = ck.perceiver
    if "latents" not in p or "layers.0.0.to_q.weight" not in p:
        raise ConfigError("--checkpoint: the perceiver lacks latents or layers.0 (a truncated checkpoint?)")
    depth = 1 + max(int(k.split(".")[1]) for k in p if k.startswith("layers."))
    inner, vis_dim = p["layers.0.0.to_q.weight"].shape
    x0 = ck.xattn[min(ck.xattn)]
    for name in ("attn.to_q.weight", "ff.1.weight"):
        if name not in x0:
            raise ConfigError(f"--checkpoint: cross-attention block {min(ck.xattn)} lacks {name}")
    x_inner = x0["attn.to_q.weight"].shape[0]
    if inner % OF_HEAD_DIM or x_inner % OF_HEAD_DIM:
        raise ConfigError(f"--checkpoint: attention widths {inner}, {x_inner} are not multiples of OpenFlamingo's 64")
    frames = p["frame_embs"].shape[0] if "frame_embs" in p else 8
    media = p["media_time_embs"].shape[0] if "media_time_embs" in p else 64
    return BridgeConfig(
        kind="flamingo",
        perceiver=PerceiverConfig(
            num_latents=p["latents"].shape[0],
            depth=depth,
            heads=inner // OF_HEAD_DIM,
            head_dim=OF_HEAD_DIM,
            ff_mult=p["layers.0.1.1.weight"].shape[0] // vis_dim if "layers.0.1.1.weight" in p else 4,
            max_media=media,
            max_frames=frames,
        ),
        cross_attn=CrossAttnConfig(
            every=every,
            first_layer=every - 1,
            heads=x_inner // OF_HEAD_DIM,
            head_dim=OF_HEAD_DIM,
            ff_mult=x0["ff.1.weight"].shape[0] // lm_dim,
            only_previous_image=True,
            dense_without_media=True,
        ),
    )


def build_from_openflamingo(
    checkpoint: str | Path,
    vision: str,
    lm: str | Path,
    cross_attn_every: int | None = None,
    tokenizer: str | Path | None = None,
    dtype: str = "fp32",
):
    """The converted LMM in memory (CPU); `convert_openflamingo` saves it."""
    from lmm.backbones.language import load_language_model
    from lmm.backbones.vision import build_vision_tower
    from lmm.fusion import find_layer_list
    from lmm.model import LMM, resolve_dtype

    vcfg = parse_vision(vision)
    if not Path(lm).is_dir():
        raise ConfigError(f"--lm: HF model folder not found: {lm}")
    check_lm_folder(Path(lm))
    state = normalise_keys(load_weights(checkpoint, "--checkpoint"))
    tok = openflamingo_tokenizer(tokenizer or lm)
    tower = build_vision_tower(vcfg)
    lang = load_language_model(LanguageConfig(path=str(lm)), torch.float32, "cpu")
    layers = find_layer_list(lang)
    layers_path = next(n for n, m in lang.named_modules() if m is layers)
    ck = Checkpoint(state, lang, layers_path)
    every = ck.cross_attn_every(len(layers), cross_attn_every)
    _check_same(ck.vision, tower.visual.state_dict(), "vision", "--vision")
    _check_same(ck.lm, lang.state_dict(), "language-model", "--lm")

    # OpenFlamingo's vocabulary: its tokenizer additions, embedding (and head) resized to len(tokenizer)
    hidden = lang.get_input_embeddings().weight.shape[1]
    if tuple(ck.embedding.shape) != (len(tok), hidden):
        raise ConfigError(
            f"--checkpoint's input embedding is {tuple(ck.embedding.shape)}, but --lm's tokenizer with "
            f"OpenFlamingo's tokens has {len(tok)} entries of width {hidden}: wrong --lm (or --tokenizer)?"
        )
    old_head = lang.get_output_embeddings()
    tied = old_head is not None and old_head.weight is lang.get_input_embeddings().weight
    head_mean = old_head.weight.detach().float().mean(0) if old_head is not None else None
    n_old = old_head.weight.shape[0] if old_head is not None else 0
    lang.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        lang.get_input_embeddings().weight.copy_(ck.embedding)
        head = lang.get_output_embeddings()
        if ck.head is not None and not tied:
            if tuple(ck.head.shape) != tuple(head.weight.shape):
                raise ConfigError(
                    f"--checkpoint's output head is {tuple(ck.head.shape)}, expected {tuple(head.weight.shape)}"
                )
            head.weight.copy_(ck.head)
        elif not tied and len(tok) > n_old:
            # the checkpoint lacks the head rows OpenFlamingo re-initialises at random on every load: use the
            # mean row (deterministic; these tokens' logits are untrained in the original)
            head.weight[n_old:] = head_mean.to(head.weight.dtype)
    lang.config.vocab_size = len(tok)

    config = LMMConfig(
        vision=vcfg,
        language=LanguageConfig(path=str(lm)),
        bridge=bridge_config(ck, hidden, every),
        dtype="auto",
        name=f"openflamingo-{Path(checkpoint).stem}",
    )
    frozen_dtype = resolve_dtype(dtype, torch.device("cpu"))
    model = LMM(config, tower.to(frozen_dtype), lang.to(frozen_dtype), tok)
    # trainable parts: perceiver, cross-attention blocks, the marker tokens' embedding and head rows
    copy_tensors(
        dict(model.resampler.named_parameters()),
        _perceiver_names(ck.perceiver) | _zero_embs(model.resampler, ck.perceiver),
        "--checkpoint perceiver",
    )
    fused = find_layer_list(model.lm)
    for i, tensors in ck.xattn.items():
        copy_tensors(
            dict(fused[i].block.named_parameters()), _xattn_names(tensors), f"--checkpoint cross-attention {i}"
        )
    new_ids = model.embed.new_ids.tolist()
    with torch.no_grad():
        model.embed.extra.copy_(model.embed.base.weight[new_ids].float())
        model.head.extra.copy_(model.head.base.weight[new_ids].float())
    # the saved directory carries everything itself: architecture dicts instead of paths
    model.config.vision = VisionConfig(
        kind="open_clip",
        name=vcfg.name,
        model_cfg=vcfg.model_cfg or _open_clip_cfg(vcfg.name),
        include_cls=False,
        final_norm=True,
    )
    model.config.language = LanguageConfig(hf_config=plain_config_dict(model.lm.config))
    return model


def _zero_embs(resampler, of_perceiver: dict) -> dict[str, torch.Tensor]:
    """OpenFlamingo's releases build the perceiver without frame / media-time embeddings: zeros here."""
    return {
        k: torch.zeros_like(getattr(resampler, k)) for k in ("frame_embs", "media_time_embs") if k not in of_perceiver
    }


def _open_clip_cfg(name: str) -> dict:
    import open_clip

    return open_clip.get_model_config(name)


def convert_openflamingo(
    checkpoint: str | Path,
    vision: str,
    lm: str | Path,
    out: str | Path,
    cross_attn_every: int | None = None,
    tokenizer: str | Path | None = None,
    dtype: str = "fp32",
) -> Path:
    """Convert and save to `out` (written whole or not at all); returns `out`."""
    model = build_from_openflamingo(checkpoint, vision, lm, cross_attn_every, tokenizer, dtype)
    provenance = {
        "source": "openflamingo",
        "checkpoint": str(checkpoint),
        "vision": vision,
        "lm": str(lm),
        "cross_attn_every": model.config.bridge.cross_attn.every,
    }
    return save_converted(model, out, provenance)
