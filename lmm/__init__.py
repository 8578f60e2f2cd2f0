"""lmm: Flamingo-style large multimodal models on frozen vision + frozen LM backbones."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lmm.config import LMMConfig  # noqa: E402
from lmm.model import LMM  # noqa: E402

__all__ = ["LMM", "LMMConfig"]
__version__ = "0.1.0"
