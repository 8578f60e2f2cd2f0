"""Trainable bridges between a frozen vision tower and a frozen LM: plain nn.Modules over tensors."""

from .contrastive import ContrastiveHead, info_nce
from .perceiver import PerceiverResampler
from .projector import MediaFlatten, Projector
from .qformer import QFormer
from .xattn import GatedCrossAttentionBlock, media_mask

__all__ = [
    "PerceiverResampler",
    "GatedCrossAttentionBlock",
    "media_mask",
    "QFormer",
    "Projector",
    "MediaFlatten",
    "ContrastiveHead",
    "info_nce",
]
