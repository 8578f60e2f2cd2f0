"""Deep fusion (Flamingo): gated cross-attention blocks in front of chosen decoder layers, reading the media."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from lmm.adapters import GatedCrossAttentionBlock, MediaFlatten, PerceiverResampler, media_mask
from lmm.bridges.common import FusionInputs
from lmm.config import BridgeConfig
from lmm.fusion import (
    MEDIA_KWARG,
    DecoderReplay,
    MediaContext,
    cross_attn_layer_indices,
    find_layer_list,
    fuse_layers,
    kwargs_reach_layers,
    media_scope,
)


class DeepFusion(nn.Module):
    """Wraps decoder layers with `FusedLayer(block, layer)` at construction; in forward the media reach the
    blocks as a keyword argument of the LM call. Holds no weights itself (the blocks live in the LM's layer
    list, so parameter names stay `lm....layers.N.block.*`)."""

    supports_contrastive = True  # its media keep the encoder's width: the contrastive head can pool them
    media_in_sequence = False  # media reach the blocks, never the LM's sequence: T prompt tokens = T positions

    def __init__(self, cfg: BridgeConfig, lm: nn.Module, media_dim: int):
        super().__init__()
        self.cfg, self.media_dim = cfg, media_dim
        self.replayer: DecoderReplay | None = None  # built on first use (frozen-prefix replay)
        self.scoped: bool | None = None  # the LM drops **kwargs before its layers (MPT): probed on first use

    def needs_scope(self, lm: nn.Module) -> bool:
        """Whether the media must reach the fused layers through `media_scope` (a decoder whose forward does not
        pass keyword arguments to its layers). Probed once, outside compilation (compiled: the argument path)."""
        if self.scoped is None:
            if torch.compiler.is_compiling():
                return False
            self.scoped = not kwargs_reach_layers(lm)
        return self.scoped

    def attach(self, lm: nn.Module) -> None:
        """Put a gated cross-attention block in front of each chosen decoder layer (after the resamplers are
        made, so that a seed gives the same weights as before the bridges became classes)."""
        x = self.cfg.cross_attn
        idx = cross_attn_layer_indices(len(find_layer_list(lm)), x.every, x.first_layer, x.layers)
        fuse_layers(
            lm,
            {
                i: GatedCrossAttentionBlock(
                    lm.config.hidden_size,
                    self.media_dim,
                    x.heads,
                    x.head_dim,
                    x.ff_mult,
                    x.qk_norm,
                    x.cosine_attn,
                    norm=x.norm,
                    norm_eps=x.norm_eps,
                    ff_act=x.ff_act,
                    ff_hidden=x.ff_hidden,
                    vector_gates=x.vector_gates,
                )
                for i in idx
            },
        )

    def resampler(self, in_dim: int) -> nn.Module:
        """Per-modality resampler: media of width `in_dim` -> (B, M, L, media_dim)."""
        p = self.cfg.perceiver
        if self.cfg.use_perceiver:
            r = PerceiverResampler(
                in_dim,
                p.num_latents,
                p.depth,
                p.heads,
                p.head_dim,
                p.ff_mult,
                p.max_media,
                p.max_frames,
                p.qk_norm,
                cosine=p.cosine_attn,
                rope=p.rope_2d,
                ff_act=p.ff_act,
            )
        else:
            r = MediaFlatten(in_dim)
        return r if in_dim == self.media_dim else ProjectedResampler(r, in_dim, self.media_dim)

    def context(self, x: FusionInputs) -> MediaContext:
        """Which media each token may attend to: Flamingo masking, within its own segment when packed."""
        B, M = x.media.shape[:2]
        text_idx = x.is_media.long().cumsum(1)  # media seen so far, 1-based
        if x.media_offset is not None:
            text_idx = text_idx + x.media_offset.to(text_idx.device).view(B, 1)
        media_seg = None
        if x.segment_ids is not None:  # a media item's segment, scattered from its marker (no nonzero: no sync)
            slot = torch.where(x.is_media, text_idx - 1, M).clamp(max=M)
            media_seg = torch.full((B, M + 1), -1, dtype=torch.long, device=text_idx.device)
            media_seg = media_seg.scatter(1, slot, torch.where(x.is_media, x.segment_ids, -1))[:, :M]
        visible = media_mask(text_idx, M, self.cfg.cross_attn.only_previous_image, x.segment_ids, media_seg)
        return MediaContext(media=x.media, visible=visible, kv_cache=x.media_kv)

    def text_only_context(self, x: FusionInputs) -> MediaContext:
        """No media at all: one zero media item that no token sees, so each block adds its gated dense FFN only
        (OpenFlamingo and IDEFICS run it on every token, with or without images)."""
        B, T = x.embeds.shape[:2]
        media = torch.zeros(B, 1, 1, self.media_dim, device=x.embeds.device)
        return MediaContext(media=media, visible=torch.zeros(B, T, 1, dtype=torch.bool, device=x.embeds.device))

    def forward(
        self, lm: nn.Module, x: FusionInputs, prefix_hidden: torch.Tensor | None = None, prefix_layer: int | None = None
    ):
        """(last hidden states, the LM's output or None, inputs as used)."""
        extra = {} if x.media is None else {MEDIA_KWARG: self.context(x)}
        if x.media is None and self.cfg.cross_attn.dense_without_media:
            extra = {MEDIA_KWARG: self.text_only_context(x)}
        if prefix_hidden is not None:  # frozen-prefix replay: run only the layers from `prefix_layer` up
            return self.replay(lm, x, prefix_hidden, prefix_layer, extra), None, x
        ctx = extra.get(MEDIA_KWARG)
        with media_scope(ctx) if ctx is not None and self.needs_scope(lm) else contextlib.nullcontext():
            out = lm.base_model(**x.lm_kwargs(), **extra)
        return out.last_hidden_state, out, x

    def replay(self, lm: nn.Module, x: FusionInputs, hidden: torch.Tensor, layer: int, extra: dict) -> torch.Tensor:
        if x.segment_ids is not None or x.past_key_values is not None:
            raise ValueError("prefix_hidden works with unpacked rows and no cache")
        replayer = self.decoder_replay(lm)
        kwargs = {**replayer.layer_kwargs(x.embeds.shape[1], hidden.device), **extra}
        return replayer.run(hidden.to(x.embeds.device), layer, kwargs)

    def decoder_replay(self, lm: nn.Module) -> DecoderReplay:
        """The LM's layer-by-layer runner (capture hidden states entering a layer; replay from one)."""
        if self.replayer is None:
            self.replayer = DecoderReplay(lm)
        return self.replayer


class ProjectedResampler(nn.Module):
    """A modality's resampler followed by a linear map to the cross-attention's media width."""

    def __init__(self, resampler: nn.Module, in_dim: int, out_dim: int):
        super().__init__()
        self.resampler, self.proj = resampler, nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.resampler(x, frame_mask))
