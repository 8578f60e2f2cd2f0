"""Multimodal causal attention (DeepSpeed-VisualChat): visual tokens in the sequence, with attention that keeps
the frozen LM's text-to-text attention unchanged.

- The LM's own attention: an image token attends only to the tokens of its own image (both ways); a text token
  attends causally to earlier text only. Text positions count text tokens only, so with the new part at zero the
  text runs exactly as in the bare LM (the image tokens are invisible to it).
- Text-to-image: a `TextToImageAttention` block with its own projections in front of every `mmca.every`-th
  decoder layer reads the image tokens of every earlier image at that layer's input (tanh gate, zero at init).

Layers are wrapped from outside (`MMCALayer`, a `FusedLayer`); the mask reaches the LM as a 4-D attention mask
and the block's inputs as the `lmm_media` keyword argument. The attention mask handed back has 0 at image
positions, so cached decode steps see text only through the LM, and read the images through the keys/values
kept in `media_kv`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmm.adapters import Projector
from lmm.adapters.mmca import TextToImageAttention
from lmm.bridges.common import FusionInputs, positions_from_mask
from lmm.bridges.early_fusion import splice
from lmm.config import BridgeConfig
from lmm.fusion import MEDIA_KWARG, FusedLayer, find_layer_list, fuse_layers

IMAGE_KEYS = "mmca_image_keys"  # media_kv entry: bool (B, S) which kept keys are image tokens


@dataclass
class MMCAContext:
    """What the text-to-image blocks read in one forward call."""

    visible: torch.Tensor  # bool (B, T, S): query t may read key s (kept keys first, then this call's tokens)
    fresh: bool  # this call's tokens are keys too (they hold images)
    kv_cache: dict | None = None  # per-block keys/values, kept by the caller across decode steps


class MMCALayer(FusedLayer):
    """A text-to-image block on the hidden states entering an original decoder layer."""

    def forward(self, *args, **kwargs):
        ctx = kwargs.get(MEDIA_KWARG)
        if isinstance(ctx, MMCAContext):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            h = hidden.to(next(self.block.parameters()).dtype) if not torch.is_autocast_enabled() else hidden
            kept = ctx.kv_cache.get(id(self)) if ctx.kv_cache is not None else None
            kv = self.block.keys_values(h) if ctx.fresh else None
            if kept is not None:  # keys of earlier calls first, as `visible` orders them
                kv = kept if kv is None else tuple(torch.cat(p, 2) for p in zip(kept, kv))
            if ctx.kv_cache is not None:
                ctx.kv_cache[id(self)] = kv
            out = self.block(h, ctx.visible, kv).to(hidden.dtype)
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = out
            else:
                args = (out, *args[1:])
        return self.layer(*args, **kwargs)


def lm_attention_mask(kind: torch.Tensor, past_text: torch.Tensor) -> torch.Tensor:
    """bool (B, T, P + T): which keys each query may attend to in the LM's own attention.

    kind (B, T): image slot (>= 0) of each token, -1 text, -2 padding; past_text (B, P): cached keys that are text.
    Text -> earlier text (causal), image -> its own image's tokens; a padding query sees only itself."""
    B, T = kind.shape
    idx = torch.arange(T, device=kind.device)
    is_text, is_img = kind == -1, kind >= 0
    causal = idx[None, :, None] >= idx[None, None, :]
    now = (is_text[:, :, None] & is_text[:, None, :] & causal) | (
        is_img[:, :, None] & (kind[:, :, None] == kind[:, None, :])
    )
    now = now | ((kind == -2)[:, :, None] & (idx[:, None] == idx[None, :]))
    past = is_text[:, :, None] & past_text.bool()[:, None, :]
    return torch.cat([past, now], dim=2)


def text_to_image_visible(kind: torch.Tensor, kept_images: torch.Tensor | None, fresh: bool = True) -> torch.Tensor:
    """bool (B, T, S): which keys each text query may read in the text-to-image attention: every kept image key
    (from earlier calls) and, when this call holds images (`fresh`), its tokens of images placed before the
    query. S = kept + (T if fresh)."""
    B, T = kind.shape
    idx = torch.arange(T, device=kind.device)
    parts = [] if kept_images is None else [kept_images.bool()[:, None, :].expand(B, T, -1)]
    if fresh:
        parts.append((kind >= 0)[:, None, :] & (idx[None, None, :] < idx[None, :, None]))
    return torch.cat(parts, dim=2) & (kind == -1)[:, :, None]


def spliced_kind(x: FusionInputs, K: int) -> torch.Tensor:
    """(B, Tn) after `splice`: the image slot of each media token, -1 text, -2 padding (same layout as splice)."""
    B, T = x.is_media.shape
    M = x.media.shape[1]
    slots = (torch.arange(M, device=x.embeds.device, dtype=x.embeds.dtype) + 1).view(1, M, 1, 1).expand(B, M, K, 1)
    probe = x.replace(embeds=x.embeds.new_zeros(B, T, 1), media=slots, labels=None, segment_ids=None)
    out = splice(probe)
    kind = out.embeds[..., 0].round().long() - 1
    return torch.where(out.attention_mask.bool() | (kind >= 0), kind, -2)


def layout(x: FusionInputs, fresh: bool) -> tuple[FusionInputs, torch.Tensor, torch.Tensor]:
    """(inputs with the images spliced in, kind (B, T) as in `lm_attention_mask`, the cached part of the mask).
    The inputs' attention mask has 0 at image tokens (later decode steps then see text only through the LM) and
    their positions count text tokens only; an image token's position is its index within its image."""
    T0 = x.embeds.shape[1]
    past_mask = x.attention_mask[:, : x.attention_mask.shape[1] - T0]
    if fresh:
        kind, K = spliced_kind(x, x.media.shape[2]), x.media.shape[2]
        x = splice(x)
    else:
        kind, K = torch.where(x.attention_mask[:, -T0:].bool(), -1, -2), 1
    is_img = kind >= 0
    full = torch.cat([past_mask, (kind == -1).to(past_mask.dtype)], dim=1)
    pos = positions_from_mask(full)[:, -kind.shape[1] :]
    within = (is_img.long().cumsum(1) - 1) - kind.clamp(min=0) * K  # an image token's index in its image
    x = x.replace(attention_mask=full, position_ids=torch.where(is_img, within, pos), unpadded=False)
    return x, kind, past_mask


class MultimodalCausalAttention(nn.Module):
    """Projected visual tokens spliced in at their markers (as the projector bridge), the LM's attention
    restricted as described above, and text-to-image blocks wrapped around chosen decoder layers."""

    static_cache = False  # its own LM mask spans exactly the cached keys: a preallocated cache does not fit it

    def __init__(self, cfg: BridgeConfig, lm: nn.Module, media_dim: int):
        super().__init__()
        self.cfg, self.lm_dim = cfg, lm.get_input_embeddings().embedding_dim

    def resampler(self, in_dim: int) -> nn.Module:
        c = self.cfg
        return Projector(in_dim, self.lm_dim, c.projector.depth, c.projector.hidden_mult, c.perceiver.max_frames)

    def attach(self, lm: nn.Module) -> None:
        m, dim = self.cfg.mmca, lm.config.hidden_size
        if m.every < 1:
            raise ValueError(f"bridge.mmca.every must be >= 1, got {m.every}")
        idx = range(0, len(find_layer_list(lm)), m.every)
        fuse_layers(lm, {i: TextToImageAttention(dim, m.heads, m.head_dim) for i in idx}, wrapper=MMCALayer)

    def forward(
        self, lm: nn.Module, x: FusionInputs, prefix_hidden: torch.Tensor | None = None, prefix_layer: int | None = None
    ):
        """(last hidden states, the LM's output, inputs as used: expanded embeddings, mask with 0 at images)."""
        if prefix_hidden is not None:
            raise ValueError("prefix_hidden (frozen-prefix replay) works with the flamingo bridge only")
        cache = x.media_kv
        kept = cache.get(IMAGE_KEYS) if cache is not None else None
        fresh = x.media is not None and bool(x.is_media.any())
        if x.segment_ids is not None and (fresh or kept is not None):
            raise ValueError("the mmca bridge does not take packed rows with images yet: set data.packing=false")
        if x.past_key_values is not None and x.media is not None and cache is None:
            raise ValueError(
                "mmca decoding with a KV cache needs media_kv (a dict kept across steps, as generate does)"
            )
        if not fresh and kept is None:  # no image anywhere: the plain LM
            out = lm.base_model(**x.lm_kwargs())
            return out.last_hidden_state, out, x
        x, kind, past_mask = layout(x, fresh)
        ctx = MMCAContext(text_to_image_visible(kind, kept, fresh), fresh, cache)
        if cache is not None and fresh:
            cache[IMAGE_KEYS] = kind >= 0 if kept is None else torch.cat([kept, kind >= 0], 1)
        kwargs = x.lm_kwargs()
        if fresh:
            allowed = lm_attention_mask(kind, past_mask)
            neg = torch.finfo(x.embeds.dtype).min
            kwargs["attention_mask"] = torch.zeros(
                allowed.shape, dtype=x.embeds.dtype, device=allowed.device
            ).masked_fill(~allowed, neg)[:, None]
        out = lm.base_model(**kwargs, **{MEDIA_KWARG: ctx})
        return out.last_hidden_state, out, x
