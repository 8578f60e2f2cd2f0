"""Process-wide settings that only entry points apply (the `lmm` CLI, train.py, bench scripts); importing
lmm changes nothing."""

from __future__ import annotations

import os


def offline() -> None:
    """Never reach a model or dataset hub: lmm loads local folders only (transformers otherwise retries the hub)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")


def enable_tf32() -> bool:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (frozen fp32 towers, fp32 bridge weights
    outside autocast): ~8x the fp32 rate on Ampere/Hopper at ~1e-3 relative error. Returns whether CUDA is on."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.set_float32_matmul_precision("high")  # cuDNN convolutions already use TF32 by default
    return True
