"""lmm: Flamingo-style large multimodal models on frozen vision + frozen LM backbones.

`from lmm import LMM, LMMConfig`; heavy modules load on first use, so `lmm --help` stays fast. Importing lmm
changes nothing in the process: entry points (the `lmm` CLI, train.py) call `lmm.runtime.offline()`.
"""

__all__ = ["LMM", "LMMConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LMM":
        from lmm.model import LMM

        return LMM
    if name == "LMMConfig":
        from lmm.config import LMMConfig

        return LMMConfig
    raise AttributeError(f"module 'lmm' has no attribute {name!r}")
