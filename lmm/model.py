"""LMM: a frozen vision tower and a frozen causal LM bridged by a trainable Flamingo, Q-Former or projector.

    from lmm import LMM
    model = LMM.from_pretrained("lmm-tiny")            # or a save_pretrained directory
    model.generate("<image>Question: what shape? Answer:", images=[img])
    model.chat([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}])

Batch contract of `forward`: input_ids/attention_mask/labels (B, T); pixel_values (B, M, F, C, H, W) where the
k-th `<image>` token of row b is media b, k; optional segment_ids/position_ids for packed rows (attention stays
within a segment, position ids restart) and frame_mask (B, M, F) for padded video frames.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmm.adapters import (ContrastiveHead, GatedCrossAttentionBlock, PerceiverResampler, Projector, QFormer, info_nce,
                          media_mask)
from lmm.backbones.language import load_language_model, load_tokenizer
from lmm.backbones.vision import build_vision_tower
from lmm.config import ConfigError, LMMConfig, from_dict
from lmm.losses import next_token_losses
from lmm.fusion import (MEDIA_KWARG, checkpoint_modules, DecoderReplay, ExtendedEmbedding, ExtendedHead, FusedLayer, MediaContext,
                        cross_attn_layer_indices, find_layer_list, fuse_layers, head_logit_transform)
from lmm.tokens import IMAGE_TOKEN, add_media_tokens

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIG_FILE = "lmm_config.json"
WEIGHTS_FILE = "trainable.safetensors"
FROZEN_FILE = "frozen.safetensors"


@dataclass
class LMMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    past_key_values: Any = None
    attention_mask: torch.Tensor | None = None  # after `<image>` expansion (Q-Former / projector)
    labels: torch.Tensor | None = None  # idem
    token_losses: torch.Tensor | None = None  # (B, T-1) next-token losses, 0 where labels are -100
    contrastive_loss: torch.Tensor | None = None  # image-text InfoNCE over the batch (bridge.contrastive_dim > 0)


class MediaFlatten(nn.Module):
    """Flamingo without a perceiver: a linear map of every visual token, frames flattened: (B,M,F,N,D)->(B,M,F*N,D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, M, F_, N, D = x.shape
        if frame_mask is not None:
            x = x * frame_mask.view(B, M, F_, 1, 1).to(x.dtype)
        return self.norm(self.proj(x)).reshape(B, M, F_ * N, D)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"dtype must be auto, fp32, bf16 or fp16; got {name!r}")
    return table[name]


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every segment boundary (packed rows)."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    seg_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - seg_start


class LMM(nn.Module):
    """Frozen vision tower + frozen LM + trainable bridge (and optional LoRA)."""

    def __init__(self, config: LMMConfig, vision: nn.Module, lm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.vision = vision
        self.tokenizer = tokenizer
        self.image_token_id, self.eoc_token_id = add_media_tokens(tokenizer)
        new_ids = [self.image_token_id, self.eoc_token_id]
        if config.lora.r > 0:
            lm = _inject_lora(lm, config)
        self.lm = lm
        emb = lm.get_input_embeddings()
        lm_hidden = lm.config.hidden_size
        vocab_out = max(emb.num_embeddings, max(new_ids) + 1)
        # Every new (trainable, fp32) tensor is created on the LM's device: nothing to move afterwards, so no
        # buffer or parameter can be left behind on another device (building on "meta" allocates nothing).
        with torch.device(emb.weight.device):
            self._build_bridge(config, vision.dim, emb, lm, lm_hidden, new_ids, vocab_out)
        self._freeze()

    def _build_bridge(self, config: LMMConfig, dv: int, emb: nn.Module, lm: nn.Module, lm_hidden: int,
                      new_ids: list[int], vocab_out: int) -> None:
        self.embed = ExtendedEmbedding(emb, new_ids)
        self.head = ExtendedHead(lm.get_output_embeddings(), new_ids, vocab_out, *head_logit_transform(lm.config))
        b = config.bridge
        if b.kind == "flamingo":
            p = b.perceiver
            self.resampler = (PerceiverResampler(dv, p.num_latents, p.depth, p.heads, p.head_dim, p.ff_mult,
                                                 p.max_media, p.max_frames, p.qk_norm)
                              if b.use_perceiver else MediaFlatten(dv))
            x = b.cross_attn
            n_layers = len(find_layer_list(lm))
            idx = cross_attn_layer_indices(n_layers, x.every, x.first_layer, x.layers)
            fuse_layers(lm, {i: GatedCrossAttentionBlock(lm_hidden, dv, x.heads, x.head_dim, x.ff_mult, x.qk_norm)
                             for i in idx})
        elif b.kind == "qformer":
            q = b.qformer
            self.resampler = QFormer(dv, emb.embedding_dim, q.num_queries, q.depth, q.hidden, q.heads, q.ff_mult,
                                     q.cross_every, b.perceiver.max_frames)
        elif b.kind == "projector":
            self.resampler = Projector(dv, emb.embedding_dim, b.projector.depth, b.projector.hidden_mult,
                                       b.perceiver.max_frames)
        else:
            raise ConfigError(f"bridge.kind must be flamingo, qformer or projector; got {b.kind!r}")
        self.contrastive = None
        if b.contrastive_dim > 0:
            if b.kind != "flamingo":
                raise ConfigError("bridge.contrastive_dim is built and tested for the flamingo bridge (its media "
                                  "keep the vision width); set bridge.contrastive_dim=0 or bridge.kind=flamingo")
            self.contrastive = ContrastiveHead(dv, lm_hidden, b.contrastive_dim)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: LMMConfig | dict, tokenizer=None, device: str | torch.device | None = None) -> "LMM":
        """Build from a config: frozen weights from the paths it names (or random from hf_config dicts)."""
        if isinstance(config, dict):
            config = from_dict(LMMConfig, config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(config.dtype, device)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.language)
        vision = build_vision_tower(config.vision).to(device=device, dtype=dtype)
        lm = load_language_model(config.language, dtype, device)
        return cls(config, vision, lm, tokenizer)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device: str | torch.device | None = None) -> "LMM":
        """Load a `save_pretrained` directory, or a named preset (e.g. "lmm-tiny") from the local cache."""
        from safetensors.torch import load_file

        path = Path(path_or_name)
        if not (path / CONFIG_FILE).is_file():
            from lmm.presets import PRESETS, build_preset

            if str(path_or_name) in PRESETS:
                return build_preset(str(path_or_name), device=device)
            raise ConfigError(f"{path_or_name}: not a saved lmm model directory (no {CONFIG_FILE}) and not a "
                              f"preset name ({', '.join(PRESETS)})")
        config = from_dict(LMMConfig, json.loads((path / CONFIG_FILE).read_text()))
        tokenizer = None
        if (path / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        frozen = load_file(path / FROZEN_FILE) if (path / FROZEN_FILE).is_file() else None
        model = cls.from_config(config, tokenizer=tokenizer, device=device)
        if frozen is not None:
            missing = model._load_named(frozen)
            if missing:
                raise ConfigError(f"{path / FROZEN_FILE}: tensors do not match the model: {missing[:5]}")
        trained = load_file(path / WEIGHTS_FILE)
        expected = set(model.trainable_state_dict())
        if set(trained) != expected:
            raise ConfigError(f"{path / WEIGHTS_FILE} does not match the config: missing "
                              f"{sorted(expected - set(trained))[:5]}, unexpected {sorted(set(trained) - expected)[:5]}")
        model._load_named(trained)
        return model

    def save_pretrained(self, path: str | Path, include_frozen: bool | None = None) -> None:
        """Write the config, the trainable weights (safetensors) and the tokenizer; no pickles.

        Frozen weights are saved too when they do not come from a path (random-init from a config dict)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()},
                  path / WEIGHTS_FILE)
        if include_frozen is None:
            c = self.config
            include_frozen = c.language.path is None or (c.vision.kind == "open_clip" and c.vision.pretrained is None) \
                or (c.vision.kind == "hf" and c.vision.path is None)
        if include_frozen:
            trainable = set(self.trainable_state_dict())
            frozen = {k: v.detach().contiguous().cpu() for k, v in _unique_state(self).items() if k not in trainable}
            save_file(frozen, path / FROZEN_FILE)
        self.tokenizer.save_pretrained(path / "tokenizer")

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.resampler.requires_grad_(True)
        for blk in self.xattn_blocks():
            blk.requires_grad_(True)
        self.embed.extra.requires_grad_(True)
        self.head.extra.requires_grad_(True)
        if self.contrastive is not None:
            self.contrastive.requires_grad_(True)
        for n, p in self.lm.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        self.vision.eval()
        self.lm.eval()

    def gradient_checkpointing_enable(self) -> int:
        """Recompute every decoder layer (with its cross-attention block) and every resampler layer in backward
        instead of storing their activations; the same for the trainer, the benchmarks and the API. Returns
        the number of decoder layers wrapped."""
        checkpoint_modules(getattr(self.resampler, "layers", []))
        return checkpoint_modules(find_layer_list(self.lm))

    def xattn_blocks(self) -> list[nn.Module]:
        return [m.block for m in find_layer_list(self.lm) if isinstance(m, FusedLayer)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _load_named(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        own = _unique_state(self)
        missing = [k for k in tensors if k not in own]
        with torch.no_grad():
            for k, v in tensors.items():
                if k in own:
                    own[k].copy_(v.to(own[k].dtype))
        return missing

    def train(self, mode: bool = True):
        """Training mode for the trainable parts only: frozen towers never switch to training behaviour
        (dropout), while LoRA's own dropout (peft's `lora_dropout` modules) does."""
        super().train(mode)
        self.vision.eval()
        for name, m in self.lm.named_modules():
            trainable = any(p.requires_grad for p in m.parameters(recurse=False)) or ".lora_dropout." in name
            if not trainable:
                m.training = False
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.base.weight.device

    @property
    def image_processor(self):
        return self.vision.preprocess

    # ------------------------------------------------------------------ forward

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen visual tokens (B, M, F, N, Dv) for pixel_values (B, M, F, C, H, W); no grad."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None, None]
        elif pixel_values.ndim == 5:
            pixel_values = pixel_values[:, :, None]
        B, M, F_ = pixel_values.shape[:3]
        tokens = self.vision(pixel_values.flatten(0, 2).to(self.device))
        return tokens.view(B, M, F_, *tokens.shape[1:])

    def encode_media(self, pixel_values: torch.Tensor | None = None, frame_mask: torch.Tensor | None = None,
                     vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """Bridge output per media item: (B, M, L, D) (perceiver latents, Q-Former queries or projected tokens)."""
        if vision_features is None:
            vision_features = self.vision_features(pixel_values)
        p = next(self.resampler.parameters())
        if frame_mask is not None:
            frame_mask = frame_mask.to(p.device)
        return self.resampler(vision_features.to(device=p.device, dtype=p.dtype), frame_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                frame_mask: torch.Tensor | None = None, media: torch.Tensor | None = None,
                vision_features: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                media_offset: torch.Tensor | None = None, logits_to_keep: int = 0,
                return_logits: bool = True, prefix_hidden: torch.Tensor | None = None,
                prefix_layer: int | None = None, contrastive: bool = False, validate: bool = True) -> LMMOutput:
        """One LM forward with media. `attention_mask` covers past + current tokens when decoding with a cache;
        None means no padding (then pass `position_ids` when decoding with a cache);
        `media_offset` (B,) counts the images already consumed by earlier (cached) tokens.
        `prefix_hidden` (B, T, D): hidden states entering decoder layer `prefix_layer` (from `prefix_hidden_states`,
        right padding only); the layers below are skipped (frozen-prefix caching for training).
        `contrastive`: also return the image-text contrastive loss of the batch (needs labels and media).
        `validate=False` skips the `<image>`-count check, the forward's only host sync (decode steps after a
        checked prefill); the flamingo forward then runs without waiting for the device."""
        input_ids = input_ids.to(self.device)
        B, T = input_ids.shape
        unpadded = attention_mask is None  # no padding anywhere: the LM builds a plain causal mask, without syncs
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        is_img = input_ids == self.image_token_id
        n_img = is_img.sum(1)
        if media is None and (pixel_values is not None or vision_features is not None):
            media = self.encode_media(pixel_values, frame_mask, vision_features)
        if validate and not torch.compiler.is_compiling():
            self.check_media_count(n_img, media)
        if segment_ids is not None:
            segment_ids = segment_ids.to(self.device)
        if contrastive and (self.contrastive is None or labels is None or prefix_hidden is not None):
            raise ValueError("contrastive=True needs a model with a contrastive head (bridge.contrastive_dim > 0), "
                             "labels, and the full forward (not prefix_hidden)")
        embeds = self.embed(input_ids)
        ctx = None
        if media is not None and self.config.bridge.kind != "flamingo" and bool(n_img.any()):
            embeds, attention_mask, labels, segment_ids = self._splice(embeds, is_img, media, attention_mask,
                                                                      labels, segment_ids)
            position_ids, unpadded = None, False
        elif media is not None and self.config.bridge.kind == "flamingo":
            text_idx = is_img.long().cumsum(1)
            if media_offset is not None:
                text_idx = text_idx + media_offset.to(self.device).view(B, 1)
            media_seg = None
            if segment_ids is not None:
                # segment of each media item: scattered from its `<image>` token; other tokens write -1 into a
                # spare last slot (no nonzero(), so no host sync)
                M = media.shape[1]
                slot = torch.where(is_img, text_idx - 1, M).clamp(max=M)
                media_seg = torch.full((B, M + 1), -1, dtype=torch.long, device=self.device)
                media_seg = media_seg.scatter(1, slot, torch.where(is_img, segment_ids, -1))[:, :M]
            visible = media_mask(text_idx, media.shape[1], self.config.bridge.cross_attn.only_previous_image,
                                 segment_ids, media_seg)
            ctx = MediaContext(media=media, visible=visible)
        Tn = embeds.shape[1]
        if position_ids is None:
            if segment_ids is not None:
                position_ids = positions_from_segments(segment_ids)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -Tn:]
        lm_mask = None if segment_ids is not None or unpadded else attention_mask
        kwargs = dict(inputs_embeds=embeds, attention_mask=lm_mask,
                      position_ids=position_ids.to(self.device), past_key_values=past_key_values, use_cache=use_cache)
        if ctx is not None:
            kwargs[MEDIA_KWARG] = ctx
        if prefix_hidden is not None:
            if segment_ids is not None or past_key_values is not None or self.config.bridge.kind != "flamingo":
                raise ValueError("prefix_hidden works with the flamingo bridge, unpacked rows and no cache")
            replay = self._decoder_replay()
            layer_kwargs = dict(replay.layer_kwargs(T, self.device))
            if ctx is not None:
                layer_kwargs[MEDIA_KWARG] = ctx
            h = replay.run(prefix_hidden.to(self.device), prefix_layer, layer_kwargs)
            out = None
        else:
            out = self.lm.base_model(**kwargs)
            h = out.last_hidden_state
        loss = token_losses = None
        if labels is not None:
            labels = labels.to(self.device)
            loss, token_losses = next_token_losses(self.head, h, labels)
        logits = None
        if return_logits:
            logits = self.head(h[:, -logits_to_keep:] if logits_to_keep else h)
        contrastive_loss = None
        if contrastive:
            contrastive_loss = (self._contrastive_loss(media, n_img, input_ids, attention_mask, labels)
                                if media is not None else torch.zeros((), device=self.device))
        return LMMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values if use_cache and out else None,
                         attention_mask=attention_mask, labels=labels, token_losses=token_losses,
                         contrastive_loss=contrastive_loss)

    def check_media_count(self, n_img: torch.Tensor, media: torch.Tensor | None) -> None:
        """Every `<image>` token needs a media item: n_img (B,) tokens per row against media (B, M, ...).
        Reads a device value (a host sync), so decode steps after the checked prefill skip it."""
        if media is None and bool(n_img.any()):
            raise ValueError(f"the input has {IMAGE_TOKEN} tokens but no images were given")
        if media is not None and bool((n_img > media.shape[1]).any()):
            raise ValueError(f"a row has {int(n_img.max())} {IMAGE_TOKEN} tokens but only {media.shape[1]} images")

    def _contrastive_loss(self, media: torch.Tensor, n_img: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """InfoNCE between each row's media and its labelled text; the batch's other rows are the negatives.
        Rows without media or without labelled tokens take no part; fewer than two rows give 0."""
        valid = torch.arange(media.shape[1], device=media.device) < n_img.to(media.device)[:, None]  # (B, M)
        positions = labels != -100  # (B, T)
        rows = valid.any(1) & positions.any(1)
        if int(rows.sum()) < 2:
            return torch.zeros((), device=media.device)
        text = self.contrastive_text_states(input_ids[rows], attention_mask[rows])
        img = self.contrastive.embed_media(media[rows], valid[rows])
        txt = self.contrastive.embed_text(text, positions[rows].to(text.device))
        return info_nce(img, txt, self.contrastive.scale())

    def contrastive_text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                                ) -> torch.Tensor:
        """The contrastive head's text side: (B, T, D) hidden states entering decoder layer
        `bridge.contrastive_text_layer` (default: the middle one) in a text-only pass, so they never depend on
        the images. Frozen LM weights need no gradient here (only with LoRA does one flow)."""
        n_layers = len(find_layer_list(self.lm))
        layer = self.config.bridge.contrastive_text_layer
        layer = n_layers // 2 if layer is None else layer
        if not 0 <= layer < n_layers:
            raise ConfigError(f"bridge.contrastive_text_layer={layer} is not a decoder layer (0..{n_layers - 1})")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.lora.r > 0):
            h, _ = self._decoder_replay().capture(layer, inputs_embeds=self.embed(input_ids),
                                                  attention_mask=attention_mask, position_ids=position_ids,
                                                  use_cache=False)
        return h

    def _decoder_replay(self) -> DecoderReplay:
        if getattr(self, "_replay", None) is None:
            self._replay = DecoderReplay(self.lm)
        return self._replay

    def lowest_bridge_layer(self) -> int:
        """Index of the first decoder layer that reads media (flamingo), i.e. the frozen prefix depth."""
        idx = [i for i, m in enumerate(find_layer_list(self.lm)) if isinstance(m, FusedLayer)]
        if not idx:
            raise ValueError("prefix caching needs the flamingo bridge (cross-attention layers)")
        return idx[0]

    @torch.no_grad()
    def prefix_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             layer: int | None = None) -> torch.Tensor:
        """Hidden states entering decoder layer `layer` (default: the lowest bridge layer). They depend on the text
        only, so a trainer can compute them once per distinct text and pass them back as `prefix_hidden`."""
        layer = self.lowest_bridge_layer() if layer is None else layer
        if layer > self.lowest_bridge_layer():
            raise ValueError(f"layer {layer} is above the lowest bridge layer {self.lowest_bridge_layer()}: "
                             "its input would depend on the images")
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if bool((attention_mask[:, 0] == 0).any()):
            raise ValueError("prefix_hidden_states needs right padding")
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        h, _ = self._decoder_replay().capture(layer, inputs_embeds=self.embed(input_ids), position_ids=position_ids)
        return h

    def _splice(self, embeds, is_img, media, attention_mask, labels, segment_ids):
        """Expand each `<image>` token into the K media embeddings (Q-Former / projector bridges)."""
        B, T, D = embeds.shape
        K = media.shape[2]
        counts = torch.where(is_img, K, 1)
        total = counts.sum(1)
        Tn = int(total.max())
        left_padded = bool((attention_mask[:, 0] == 0).any()) and bool((attention_mask[:, -1] == 1).all())
        shift = (Tn - total) if left_padded else torch.zeros_like(total)
        start = counts.cumsum(1) - counts + shift[:, None]
        new_embeds = embeds.new_zeros(B, Tn, D)
        new_mask = attention_mask.new_zeros(B, Tn)
        bt, tt = (~is_img).nonzero(as_tuple=True)
        new_embeds[bt, start[bt, tt]] = embeds[bt, tt]
        new_mask[bt, start[bt, tt]] = attention_mask[bt, tt]
        bi, ti = is_img.nonzero(as_tuple=True)
        m_idx = (is_img.long().cumsum(1) - 1)[bi, ti]
        pos = start[bi, ti][:, None] + torch.arange(K, device=embeds.device)
        new_embeds[bi[:, None], pos] = media[bi, m_idx].to(embeds.dtype)
        new_mask[bi[:, None], pos] = attention_mask[bi, ti][:, None]
        new_labels = None
        if labels is not None:
            new_labels = labels.new_full((B, Tn), -100)
            new_labels[bt, start[bt, tt]] = labels[bt, tt]
        new_seg = None
        if segment_ids is not None:
            new_seg = segment_ids.new_full((B, Tn), -1)
            new_seg[bt, start[bt, tt]] = segment_ids[bt, tt]
            new_seg[bi[:, None], pos] = segment_ids[bi, ti][:, None]
            fresh = segment_ids.max() + 1  # padding slots form their own segment
            new_seg = torch.where(new_seg < 0, fresh, new_seg)
        return new_embeds, new_mask, new_labels, new_seg

    # ------------------------------------------------------------------ inference helpers

    def generate(self, prompts: str | Sequence[str], images=None, **kwargs) -> str | list[str]:
        """Generate continuations; one prompt -> str, a list -> list (batched with left padding).

        images: for one prompt a list of PIL images (or paths); for a list of prompts a list of such lists."""
        from lmm.generation import generate_text

        return generate_text(self, prompts, images, **kwargs)

    def stream(self, prompt: str, images=None, **kwargs) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are decoded (batch of one)."""
        from lmm.generation import stream_text

        return stream_text(self, prompt, images, **kwargs)

    def chat(self, messages, **kwargs):
        """Answer a conversation (OpenAI-style messages, images as content parts); a list of conversations
        gives a list of answers."""
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        convs = messages if batched else [messages]
        rendered = [self.render_chat(c) for c in convs]
        kwargs.setdefault("stop_at_end_of_chunk", False)
        kwargs.setdefault("add_special_tokens", False)  # the chat template writes its own special tokens
        out = self.generate([r[0] for r in rendered], [r[1] for r in rendered], **kwargs)
        return out if batched else out[0]

    def render_chat(self, messages: list[dict]) -> tuple[str, list]:
        """(prompt, images) for a conversation, with this model's default system prompt: what `chat` feeds
        `generate` (with add_special_tokens=False, stop_at_end_of_chunk=False)."""
        from lmm.chat import render_messages

        return render_messages(self.tokenizer, messages, system_prompt=self.config.system_prompt)

    def score(self, prompts: Sequence[str], images, candidates: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Summed log-likelihood of each candidate continuation after each prompt: (len(prompts), len(candidates))."""
        from lmm.generation import score_candidates

        return score_candidates(self, prompts, images, candidates, batch_size=batch_size)

    def similarity(self, images, texts: Sequence[str]) -> torch.Tensor:
        """Image-text cosine similarities (len(images), len(texts)) from the contrastive head (see lmm.retrieval)."""
        from lmm.retrieval import similarity

        return similarity(self, images, texts)

    def pixel_values(self, images) -> torch.Tensor:
        """(N, C, H, W) normalised pixels on the CPU for PIL images or image paths (one image per item)."""
        from lmm.generation import load_images

        return torch.stack([self.image_processor(im) for im in load_images(images)])

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """Pooled, L2-normalised frozen vision features (N, Dv), e.g. for RICES retrieval."""
        pix = self.pixel_values(images)
        feats = self.vision(pix.to(self.device)).float().mean(1)
        return F.normalize(feats, dim=-1).cpu()


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, each tensor once under its first name."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out[n] = t
    return out


def _inject_lora(lm: nn.Module, config: LMMConfig) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    lc = config.lora
    peft_cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules))
    try:
        lm = inject_adapter_in_model(peft_cfg, lm)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules {lc.target_modules} do not match modules of this LM: {e}") from e
    # peft creates the adapters in the frozen weights' dtype; trainable weights are fp32 masters whatever that
    # is (a bf16 master loses updates smaller than 1/256 of the weight). peft casts each adapter's input to the
    # adapter's dtype and the sum back to the layer's, and autocast runs the matmuls in bf16 on a GPU.
    for name, p in lm.named_parameters():
        if "lora_" in name and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return lm
