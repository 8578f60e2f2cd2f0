"""LMM: frozen media encoders and a frozen causal LM, bridged by trainable resamplers and a fusion bridge.

    from lmm import LMM
    model = LMM.from_pretrained("runs/demo")           # a save_pretrained directory (presets: lmm.presets.load)
    model.generate("<image>Question: what shape? Answer:", images=[img])
    model.chat([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What?"}]}])

The parts: `encoders` (one frozen encoder per modality, lmm.encoders; "image" from `config.vision`),
`resamplers` (one per modality, made by the bridge), `bridge` (lmm.bridges: deep fusion = gated cross-attention
inside the decoder, early fusion = media tokens in the input), the LM, and the new-token rows `embed` / `head`.
Losses are functions over the outputs (lmm.losses). Nothing here switches on the bridge kind.

Batch contract of `forward`: input_ids/attention_mask/labels (B, T); pixel_values (B, M, F, C, H, W) where the
k-th `<image>` token of row b is media b, k (other modalities: `media_inputs={name: (B, M, F, ...)}`, placed by
their own marker tokens); optional segment_ids/position_ids for packed rows (attention stays within a segment,
position ids restart) and frame_mask (B, M, F) for padded video frames.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmm.adapters import ContrastiveHead
from lmm.backbones.language import load_language_model, load_tokenizer
from lmm.backbones.vision import build_vision_tower
from lmm.bridges import FusionInputs, build_bridge, positions_from_mask
from lmm.config import ConfigError, LMMConfig, from_dict
from lmm.encoders import build_encoder
from lmm.fusion import (
    DecoderReplay,
    ExtendedEmbedding,
    ExtendedHead,
    FusedLayer,
    checkpoint_modules,
    find_layer_list,
    head_logit_transform,
)
from lmm.losses import contrastive_loss, itm_candidates, itm_loss, next_token_losses, sample_negatives
from lmm.tokens import IMAGE_TOKEN, add_media_tokens, add_tokens

CONFIG_FILE = "lmm_config.json"
WEIGHTS_FILE = "trainable.safetensors"
FROZEN_FILE = "frozen.safetensors"
# parameter names of directories saved before the encoders/resamplers became per-modality dicts
LEGACY_NAMES = {"vision.": "encoders.image.", "resampler.": "resamplers.image."}


@dataclass
class LMMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None
    past_key_values: Any = None
    attention_mask: torch.Tensor | None = None  # after media-token expansion (early fusion)
    labels: torch.Tensor | None = None  # idem
    token_losses: torch.Tensor | None = None  # (B, T-1) next-token losses, 0 where labels are -100
    contrastive_loss: torch.Tensor | None = None  # image-text InfoNCE over the batch (bridge.contrastive_dim > 0)
    itm_loss: torch.Tensor | None = None  # image-text matching cross-entropy, hard negatives (bridge.itm)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if name not in table:
        raise ConfigError(f"dtype must be auto, fp32, bf16 or fp16; got {name!r}")
    return table[name]


def upgrade_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename tensors saved under the old single-modality names (`vision.*`, `resampler.*`)."""
    out = {}
    for k, v in tensors.items():
        for old, new in LEGACY_NAMES.items():
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


class LMM(nn.Module):
    """Frozen encoders + frozen LM + trainable resamplers and bridge (and optional LoRA)."""

    def __init__(
        self,
        config: LMMConfig,
        vision: nn.Module,
        lm: nn.Module,
        tokenizer,
        encoders: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        vision.token = IMAGE_TOKEN
        self.encoders = nn.ModuleDict({"image": vision, **(encoders or {})})
        self.image_token_id, self.eoc_token_id = add_media_tokens(tokenizer)
        others = [m for m in self.encoders if m != "image"]
        self.media_token_ids = {
            "image": self.image_token_id,
            **dict(zip(others, add_tokens(tokenizer, [self.encoders[m].token for m in others]))),
        }
        new_ids = [self.image_token_id, self.eoc_token_id, *(self.media_token_ids[m] for m in others)]
        if config.lora.r > 0:
            lm = _inject_lora(lm, config)
        self.lm = lm
        emb = lm.get_input_embeddings()
        vocab_out = max(emb.num_embeddings, max(new_ids) + 1)
        # Every new (trainable, fp32) tensor is created on the LM's device: nothing to move afterwards, so no
        # buffer or parameter can be left behind on another device (building on "meta" allocates nothing).
        with torch.device(emb.weight.device):
            self.embed = ExtendedEmbedding(emb, new_ids)
            self.head = ExtendedHead(lm.get_output_embeddings(), new_ids, vocab_out, *head_logit_transform(lm.config))
            if config.language.suppress_tokens:
                self.head.suppressed = torch.tensor(
                    add_tokens(tokenizer, list(config.language.suppress_tokens)), device=emb.weight.device
                )
            self.bridge = build_bridge(config.bridge, lm, vision.dim)
            self.resamplers = nn.ModuleDict({m: self.bridge.resampler(e.dim) for m, e in self.encoders.items()})
            self.bridge.attach(lm)
            self.contrastive = None
            if config.bridge.contrastive_dim > 0:
                if not getattr(self.bridge, "supports_contrastive", False):
                    raise ConfigError(
                        "bridge.contrastive_dim is built and tested for the flamingo bridge (its media "
                        "keep the vision width); set bridge.contrastive_dim=0 or bridge.kind=flamingo"
                    )
                self.contrastive = ContrastiveHead(vision.dim, lm.config.hidden_size, config.bridge.contrastive_dim)
            # image-text matching (FLAVA/BLIP-2 ITM): [not matched, matched] from the fused last token, any bridge
            self.itm = nn.Linear(lm.config.hidden_size, 2) if config.bridge.itm else None
        self.register_buffer(
            "media_ids", torch.tensor(list(self.media_token_ids.values()), device=emb.weight.device), persistent=False
        )
        self._freeze()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: LMMConfig | dict, tokenizer=None, device: str | torch.device | None = None) -> LMM:
        """Build from a config: frozen weights from the paths it names (or random from hf_config dicts)."""
        if isinstance(config, dict):
            config = from_dict(LMMConfig, config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = resolve_dtype(config.dtype, device)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.language)
        vision = build_vision_tower(config.vision).to(device=device, dtype=dtype)
        encoders = {m: build_encoder(m, c).to(device=device, dtype=dtype) for m, c in config.encoders.items()}
        lm = load_language_model(config.language, dtype, device)
        return cls(config, vision, lm, tokenizer, encoders)

    @classmethod
    def from_pretrained(cls, path_or_name: str | Path, device: str | torch.device | None = None) -> LMM:
        """Load a `save_pretrained` directory (named presets such as "lmm-tiny": `lmm.presets.load`, which also
        takes directories)."""
        from safetensors.torch import load_file

        path = Path(path_or_name)
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(
                f"{path_or_name}: not a saved lmm model directory (no {CONFIG_FILE} inside); for a "
                f"named preset use lmm.presets.load({str(path_or_name)!r})"
            )
        config = from_dict(LMMConfig, json.loads((path / CONFIG_FILE).read_text()))
        tokenizer = None
        if (path / "tokenizer").is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        frozen = upgrade_names(load_file(path / FROZEN_FILE)) if (path / FROZEN_FILE).is_file() else None
        model = cls.from_config(config, tokenizer=tokenizer, device=device)
        if frozen is not None:
            trainable = set(model.trainable_state_dict())
            own = unique_state(model)  # tied weights are saved under one name
            wanted = {n for n, _ in model.named_parameters() if n in own and n not in trainable} - set(frozen)
            if wanted:
                raise ConfigError(f"{path / FROZEN_FILE} lacks frozen weights of this model: {sorted(wanted)[:5]}")
            missing = model._load_named(frozen)
            if missing:
                raise ConfigError(f"{path / FROZEN_FILE}: tensors do not match the model: {missing[:5]}")
        trained = upgrade_names(load_file(path / WEIGHTS_FILE))
        expected = set(model.trainable_state_dict())
        if set(trained) != expected:
            raise ConfigError(
                f"{path / WEIGHTS_FILE} does not match the config: missing "
                f"{sorted(expected - set(trained))[:5]}, unexpected {sorted(set(trained) - expected)[:5]}"
            )
        model._load_named(trained)
        return model

    def save_pretrained(self, path: str | Path, include_frozen: bool | None = None) -> None:
        """Write the config, the trainable weights (safetensors) and the tokenizer; no pickles.

        Frozen weights are saved too when they do not come from a path (random-init from a config dict)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}, path / WEIGHTS_FILE
        )
        if include_frozen is None:
            c = self.config
            include_frozen = (
                c.language.path is None
                or (c.vision.kind == "open_clip" and c.vision.pretrained is None)
                or (c.vision.kind == "hf" and c.vision.path is None)
                or any(not getattr(e, "weights_from_path", False) for m, e in self.encoders.items() if m != "image")
            )
        if include_frozen:
            trainable = set(self.trainable_state_dict())
            frozen = {k: v.detach().contiguous().cpu() for k, v in unique_state(self).items() if k not in trainable}
            save_file(frozen, path / FROZEN_FILE)
        self.tokenizer.save_pretrained(path / "tokenizer")

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.resamplers.requires_grad_(True)
        for blk in self.xattn_blocks():
            blk.requires_grad_(True)
        self.embed.extra.requires_grad_(True)
        self.head.extra.requires_grad_(True)
        if self.contrastive is not None:
            self.contrastive.requires_grad_(True)
        if self.itm is not None:
            self.itm.requires_grad_(True)
        for n, p in self.lm.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        self.encoders.eval()
        self.lm.eval()

    def gradient_checkpointing_enable(self) -> int:
        """Recompute every decoder layer (with its cross-attention block) and every resampler layer in backward
        instead of storing their activations; the same for the trainer, the benchmarks and the API. Returns
        the number of decoder layers wrapped."""
        for resampler in self.resamplers.values():
            checkpoint_modules(getattr(resampler, "layers", []))
        return checkpoint_modules(find_layer_list(self.lm))

    def xattn_blocks(self) -> list[nn.Module]:
        return [m.block for m in find_layer_list(self.lm) if isinstance(m, FusedLayer)]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _load_named(self, tensors: dict[str, torch.Tensor]) -> list[str]:
        """Copy named tensors into this model (exact shapes); returns the names it does not have."""
        own = unique_state(self)
        missing = [k for k in tensors if k not in own]
        copy_exact({k: own[k] for k in tensors if k in own}, {k: v for k, v in tensors.items() if k in own})
        return missing

    def train(self, mode: bool = True):
        """Training mode for the trainable parts only: frozen towers never switch to training behaviour
        (dropout), while LoRA's own dropout (peft's `lora_dropout` modules) does."""
        super().train(mode)
        self.encoders.eval()
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

    @property
    def vision(self) -> nn.Module:
        """The image encoder (`encoders["image"]`)."""
        return self.encoders["image"]

    @property
    def resampler(self) -> nn.Module:
        """The image resampler (`resamplers["image"]`)."""
        return self.resamplers["image"]

    # ------------------------------------------------------------------ forward

    def media_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """bool (B, T): marker tokens of any modality (`<image>`, ...)."""
        return torch.isin(input_ids, self.media_ids.to(input_ids.device))

    def media_features(self, modality: str, items: torch.Tensor) -> torch.Tensor:
        """Frozen features (B, M, F, N, D) of preprocessed media (B, M, F, ...); no grad."""
        B, M, F_ = items.shape[:3]
        with torch.no_grad():
            feats = self.encoders[modality](items.flatten(0, 2).to(self.device))
        return feats.view(B, M, F_, *feats.shape[1:])

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen visual tokens (B, M, F, N, Dv) for pixel_values (B, M, F, C, H, W), or (B, C, H, W) or
        (B, M, C, H, W)."""
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None, None]
        elif pixel_values.ndim == 5:
            pixel_values = pixel_values[:, :, None]
        return self.media_features("image", pixel_values)

    def encode_media(
        self,
        pixel_values: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        modality: str = "image",
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Resampled media (B, M, L, D) of one modality (perceiver latents, Q-Former queries or projected tokens)
        from its raw items (`pixel_values` for images) or its frozen features."""
        if features is None:
            features = vision_features
        if features is None:
            features = (
                self.vision_features(pixel_values)
                if modality == "image"
                else self.media_features(modality, pixel_values)
            )
        resampler = self.resamplers[modality]
        p = next(resampler.parameters())
        if frame_mask is not None:
            frame_mask = frame_mask.to(p.device)
        return resampler(features.to(device=p.device, dtype=p.dtype), frame_mask)

    def gather_media(self, input_ids: torch.Tensor, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """One (B, M, L, D) tensor of every modality's media in text order: slot k of row b is the media of the
        row's k-th marker token. A single modality is returned as it is (no copy, no host sync)."""
        if len(encoded) == 1:
            return next(iter(encoded.values()))
        shapes = {m: tuple(e.shape[2:]) for m, e in encoded.items()}
        if len(set(shapes.values())) > 1:
            raise ConfigError(
                f"media of several modalities in one batch must resample to the same shape (same "
                f"perceiver num_latents); got {shapes}"
            )
        any_marker = self.media_token_mask(input_ids)
        slot = any_marker.long().cumsum(1) - 1
        first = next(iter(encoded.values()))
        out = first.new_zeros(first.shape[0], int(any_marker.sum(1).max()), *first.shape[2:])
        for m, enc in encoded.items():
            is_m = input_ids == self.media_token_ids[m]
            bi, ti = is_m.nonzero(as_tuple=True)
            j = (is_m.long().cumsum(1) - 1)[bi, ti]
            if bool((j >= enc.shape[1]).any()):
                raise ValueError(f"a row has more {self.encoders[m].token} tokens than {m} inputs")
            out[bi, slot[bi, ti]] = enc[bi, j]
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        media_inputs: dict[str, torch.Tensor] | None = None,
        media_frame_mask: dict[str, torch.Tensor] | None = None,
        media_features: dict[str, torch.Tensor] | None = None,
        past_key_values=None,
        use_cache: bool = False,
        media_offset: torch.Tensor | None = None,
        media_kv: dict | None = None,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        prefix_hidden: torch.Tensor | None = None,
        prefix_layer: int | None = None,
        contrastive: bool = False,
        validate: bool = True,
        itm: bool = False,
        gather_negatives: bool = False,
    ) -> LMMOutput:
        """One LM forward with media. `attention_mask` covers past + current tokens when decoding with a cache;
        None means no padding (then pass `position_ids` when decoding with a cache). `media`: already resampled
        media (B, M, L, D) in text order; `media_offset` (B,) counts media consumed by earlier (cached) tokens.
        `prefix_hidden` (B, T, D): hidden states entering decoder layer `prefix_layer` (from
        `prefix_hidden_states`, right padding only); the layers below are skipped (frozen-prefix caching).
        `contrastive`: also return the image-text contrastive loss of the batch (needs labels and media);
        `gather_negatives`: its negatives are every rank's rows (torch.distributed; each rank returns its share x
        world size, so the mean over ranks is the global batch's loss). `itm`: also the image-text matching loss
        (a second forward of hard-negative pairs; needs labels, unpacked rows and a model with bridge.itm).
        `media_kv`: a dict kept by the caller while `media` stays the same (a generation): deep fusion's blocks
        project the media to keys/values once and reuse them.
        `validate=False` skips the media-count check, the forward's only host sync (decode steps after a checked
        prefill); the deep-fusion forward then runs without waiting for the device.
        `media_frame_mask`: {modality: (B, M, F) bool} for padded frames of `media_inputs` (e.g. an audio clip's
        30 s chunks); `frame_mask` is the images' (video frames). `media_features`: {modality: (B, M, F, N, D)}
        frozen features in place of `media_inputs` (what `vision_features` is for images; the frozen cache)."""
        input_ids = input_ids.to(self.device)
        if media is None:
            media = self.encode_inputs(
                input_ids, pixel_values, vision_features, frame_mask, media_inputs, media_frame_mask, media_features
            )
        is_media = self.media_token_mask(input_ids)
        if validate and not torch.compiler.is_compiling():
            self.check_media_count(is_media.sum(1), media)
        x = FusionInputs(
            embeds=self.embed(input_ids),
            is_media=is_media,
            unpadded=attention_mask is None,
            attention_mask=(torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)),
            media=media,
            media_offset=media_offset,
            media_kv=media_kv,
            position_ids=position_ids,
            segment_ids=None if segment_ids is None else segment_ids.to(self.device),
            labels=None if labels is None else labels.to(self.device),
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        h, out, x = self.bridge(self.lm, x, prefix_hidden, prefix_layer)
        loss, token_losses = next_token_losses(self.head, h, x.labels) if x.labels is not None else (None, None)
        logits = self.head(h[:, -logits_to_keep:] if logits_to_keep else h) if return_logits else None
        contrastive_loss = None
        if contrastive:
            if self.contrastive is None or labels is None or prefix_hidden is not None:
                raise ValueError(
                    "contrastive=True needs a model with a contrastive head (bridge.contrastive_dim > "
                    "0), labels, and the full forward (not prefix_hidden)"
                )
            pair_embeds = self._contrastive_embeddings(media, is_media.sum(1), input_ids, x.attention_mask, x.labels)
            contrastive_loss = self._contrastive_loss(*pair_embeds, gather_negatives)
        matching_loss = None
        if itm:
            if self.itm is None or labels is None or prefix_hidden is not None or segment_ids is not None:
                raise ValueError(
                    "itm=True needs a model with a matching head (bridge.itm=true), labels, unpacked rows (no "
                    "segment_ids) and the full forward (not prefix_hidden)"
                )
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
            pairs = (media, is_media.sum(1), input_ids, mask, labels.to(self.device))
            matching_loss = self._itm_loss(h, x.attention_mask, *pairs, pair_embeds if contrastive else None)
        return LMMOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values if use_cache and out else None,
            attention_mask=x.attention_mask,
            labels=x.labels,
            token_losses=token_losses,
            contrastive_loss=contrastive_loss,
            itm_loss=matching_loss,
        )

    def encode_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        media_inputs: dict[str, torch.Tensor] | None = None,
        media_frame_mask: dict[str, torch.Tensor] | None = None,
        media_features: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Resampled media (B, M, L, D) of every modality given, gathered in text order (None if none is given):
        what `forward` computes from raw media, for callers that encode once and reuse it (generation)."""
        encoded = {}
        if pixel_values is not None or vision_features is not None:
            encoded["image"] = self.encode_media(pixel_values, frame_mask, vision_features)
        masks = media_frame_mask or {}
        for modality, items in (media_inputs or {}).items():
            if modality not in self.encoders:
                raise ConfigError(f"media_inputs has {modality!r}, but this model encodes {', '.join(self.encoders)}")
            encoded[modality] = self.encode_media(items, masks.get(modality), modality=modality)
        for modality, feats in (media_features or {}).items():  # precomputed frozen features (B, M, F, N, D)
            if modality not in self.encoders or modality in encoded:
                raise ConfigError(f"media_features has {modality!r}: not an encoder of this model, or given twice")
            encoded[modality] = self.encode_media(None, masks.get(modality), modality=modality, features=feats)
        return self.gather_media(input_ids, encoded) if encoded else None

    def check_media_count(self, n_media: torch.Tensor, media: torch.Tensor | None) -> None:
        """Every media marker token needs a media item: n_media (B,) markers per row against media (B, M, ...).
        Reads a device value (a host sync), so decode steps after the checked prefill skip it."""
        if media is None and bool(n_media.any()):
            raise ValueError(f"the input has {IMAGE_TOKEN} (or other media) tokens but no media were given")
        if media is not None and bool((n_media > media.shape[1]).any()):
            raise ValueError(
                f"a row has {int(n_media.max())} media tokens ({IMAGE_TOKEN} ...) but only {media.shape[1]} media items"
            )

    def _pair_rows(self, media: torch.Tensor | None, n_media: torch.Tensor, labels: torch.Tensor):
        """(rows, valid): the rows with media and labelled text (B,), and the real media slots (B, M)."""
        if media is None:
            return torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device), None
        valid = torch.arange(media.shape[1], device=media.device) < n_media.to(media.device)[:, None]
        return valid.any(1) & (labels != -100).any(1).to(media.device), valid

    def _contrastive_embeddings(self, media, n_media, input_ids, attention_mask, labels):
        """(image, text) unit vectors (n, dim) of the n rows with media and labelled text: the media pooled, the
        labelled text's states from a text-only pass (the image never reaches its text)."""
        rows, valid = self._pair_rows(media, n_media, labels)
        head = self.contrastive
        if not bool(rows.any()):
            empty = head.media_proj.weight.new_zeros(0, head.media_proj.out_features)
            return empty, empty
        text = self.contrastive_text_states(input_ids[rows], attention_mask[rows])
        img = head.embed_media(media[rows], valid[rows])
        txt = head.embed_text(text, (labels != -100)[rows].to(text.device))
        return img, txt

    def _contrastive_loss(self, img: torch.Tensor, txt: torch.Tensor, gather: bool = False) -> torch.Tensor:
        """InfoNCE between each row's media and its labelled text; the other rows (of every rank with `gather`)
        are the negatives. Rows without media or without labelled tokens take no part; fewer than two give 0."""
        if not gather and img.shape[0] < 2:
            return torch.zeros((), device=img.device)
        return contrastive_loss(img, txt, self.contrastive.scale(), gather)

    def _itm_loss(self, h, fused_mask, media, n_media, input_ids, attention_mask, labels, pair_embeds=None):
        """Image-text matching over the rows with media and labelled text (BLIP-2/FLAVA ITM): each positive pair
        (the forward's own fused state `h` at its last token), a negative text per image and a negative image per
        text, drawn from the softmax of the contrastive similarities (uniformly without a contrastive head),
        among rows with as many media and another text and media. Fewer than two rows give 0."""
        rows, _ = self._pair_rows(media, n_media, labels)
        idx = rows.nonzero().squeeze(1)
        n = idx.numel()
        if n < 2:
            return torch.zeros((), device=h.device)
        ids, mask, med = input_ids[idx], attention_mask[idx], media[idx]
        with torch.no_grad():  # a pair with the same text or the same media is no negative
            flat = med.flatten(1).float()
            same = (ids[:, None] == ids[None]).all(-1) | (torch.cdist(flat, flat) == 0)
        allowed = itm_candidates(n_media.to(idx.device)[idx], same)
        sim = None
        if self.contrastive is not None:
            with torch.no_grad():
                if pair_embeds is None:
                    pair_embeds = self._contrastive_embeddings(media, n_media, input_ids, attention_mask, labels)
                img, txt = pair_embeds
                sim = self.contrastive.scale() * img @ txt.t()
        neg_text, neg_image = sample_negatives(sim, allowed)
        pos = self.itm(h[idx, last_token(fused_mask)[idx]].to(self.itm.weight.dtype))
        a, b = neg_image >= 0, neg_text >= 0  # texts that got a negative image, images that got a negative text
        neg = pos[:0]  # every row a duplicate of the others: positives only
        if bool(a.any() | b.any()):
            neg = self.matching_logits(
                torch.cat([ids[a], ids[neg_text[b]]]),
                torch.cat([mask[a], mask[neg_text[b]]]),
                torch.cat([med[neg_image[a]], med[b]]),
            )
        matched = torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(neg.shape[0], dtype=torch.bool)])
        return itm_loss(torch.cat([pos, neg]), matched.to(pos.device))

    def matching_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, media: torch.Tensor):
        """ITM logits (N, 2) [not matched, matched] of each row's text with its media (N, M, L, D), read from the
        bridge's fused output at the row's last real token (flamingo, projector, Q-Former alike)."""
        if self.itm is None:
            raise ValueError("this model has no image-text matching head: build it with bridge.itm=true")
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        x = FusionInputs(
            embeds=self.embed(input_ids),
            is_media=self.media_token_mask(input_ids),
            attention_mask=attention_mask,
            media=media,
        )
        h, _, x = self.bridge(self.lm, x)
        last = h[torch.arange(h.shape[0], device=h.device), last_token(x.attention_mask)]
        return self.itm(last.to(self.itm.weight.dtype))

    def contrastive_text_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
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
        position_ids = positions_from_mask(attention_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.lora.r > 0):
            h, _ = self._decoder_replay().capture(
                layer,
                inputs_embeds=self.embed(input_ids),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
        return h

    def _decoder_replay(self) -> DecoderReplay:
        if not hasattr(self.bridge, "decoder_replay"):
            raise ValueError("hidden-state capture and replay need the flamingo bridge (cross-attention layers)")
        return self.bridge.decoder_replay(self.lm)

    def lowest_bridge_layer(self) -> int:
        """Index of the first decoder layer that reads media (flamingo), i.e. the frozen prefix depth."""
        idx = [i for i, m in enumerate(find_layer_list(self.lm)) if isinstance(m, FusedLayer)]
        if not idx:
            raise ValueError("prefix caching needs the flamingo bridge (cross-attention layers)")
        return idx[0]

    @torch.no_grad()
    def prefix_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, layer: int | None = None
    ) -> torch.Tensor:
        """Hidden states entering decoder layer `layer` (default: the lowest bridge layer). They depend on the text
        only, so a trainer can compute them once per distinct text and pass them back as `prefix_hidden`."""
        layer = self.lowest_bridge_layer() if layer is None else layer
        if layer > self.lowest_bridge_layer():
            raise ValueError(
                f"layer {layer} is above the lowest bridge layer {self.lowest_bridge_layer()}: "
                "its input would depend on the images"
            )
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        if bool((attention_mask[:, 0] == 0).any()):
            raise ValueError("prefix_hidden_states needs right padding")
        position_ids = positions_from_mask(attention_mask)
        h, _ = self._decoder_replay().capture(layer, inputs_embeds=self.embed(input_ids), position_ids=position_ids)
        return h

    # ------------------------------------------------------------------ inference helpers

    def generate(self, prompts: str | Sequence[str], images=None, **kwargs) -> str | list[str]:
        """Generate continuations; one prompt -> str, a list -> list (batched with left padding).

        images: for one prompt a list of PIL images (or paths); for a list of prompts a list of such lists.
        `videos=` / `audios=` likewise, at `<video>` / `<audio>` markers (lmm.inputs says what items may be)."""
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

    def score(
        self, prompts: Sequence[str], images, candidates: Sequence[str], batch_size: int = 16, videos=None, audios=None
    ) -> torch.Tensor:
        """Summed log-likelihood of each candidate continuation after each prompt: (len(prompts), len(candidates))."""
        from lmm.generation import score_candidates

        return score_candidates(self, prompts, images, candidates, batch_size=batch_size, videos=videos, audios=audios)

    def similarity(self, images, texts: Sequence[str]) -> torch.Tensor:
        """Image-text cosine similarities (len(images), len(texts)) from the contrastive head (see lmm.retrieval)."""
        from lmm.retrieval import similarity

        return similarity(self, images, texts)

    def match(self, images, texts, batch_size: int = 16) -> torch.Tensor:
        """Image-text matching probabilities from the ITM head (bridge.itm): one text per image -> (N,), a list of
        K candidates per image -> (N, K), e.g. to re-rank retrieval's top K (see lmm.matching)."""
        from lmm.matching import match

        return match(self, images, texts, batch_size=batch_size)

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


def last_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token (left or right padding)."""
    return attention_mask.long().cumsum(1).argmax(1)


def copy_exact(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor]) -> None:
    """targets[k].copy_(sources[k]) for every k, refusing any shape difference (copy_ would broadcast a 0-dim
    or size-1 tensor over a whole parameter) with a ConfigError naming the tensor."""
    for k, v in sources.items():
        if tuple(v.shape) != tuple(targets[k].shape):
            raise ConfigError(f"tensor {k} has shape {tuple(v.shape)} but the model needs {tuple(targets[k].shape)}")
    with torch.no_grad():
        for k, v in sources.items():
            targets[k].copy_(v.to(targets[k].dtype))


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
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
