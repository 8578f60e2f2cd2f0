"""Trainable bridges between a frozen vision tower and a frozen LM: plain nn.Modules over tensors."""

from .perceiver import PerceiverResampler
from .projector import Projector
from .qformer import QFormer
from .xattn import GatedCrossAttentionBlock, media_mask

__all__ = ["PerceiverResampler", "GatedCrossAttentionBlock", "media_mask", "QFormer", "Projector"]
