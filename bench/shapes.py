"""Named benchmark shapes (random weights, nothing downloaded) shared by the bench scripts.

small: a few-second CPU shape for regressions; 3b / 9b: the reference shapes of issue 8 (run on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmm.config import BridgeConfig, CrossAttnConfig, LanguageConfig, LMMConfig, PerceiverConfig, VisionConfig
from lmm.testing import TINY_VIT, tiny_tokenizer


@dataclass
class Shape:
    name: str
    lmm: LMMConfig
    batch: int
    images: int
    tokens: int
    image_size: int


def _llama(hidden, layers, heads, inter, vocab) -> dict:
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }


def get_shape(name: str, dtype: str = "auto") -> Shape:
    if name == "small":
        cfg = LMMConfig(
            vision=VisionConfig(name="lmm-tiny-vit", model_cfg=TINY_VIT),
            language=LanguageConfig(hf_config=_llama(128, 4, 4, 344, 2048)),
            bridge=BridgeConfig(
                perceiver=PerceiverConfig(num_latents=16, depth=2, heads=4, head_dim=32),
                cross_attn=CrossAttnConfig(every=1, heads=4, head_dim=32),
            ),
            dtype=dtype,
        )
        return Shape("small", cfg, batch=4, images=2, tokens=64, image_size=32)
    if name in ("3b", "9b"):
        lm = _llama(2048, 24, 16, 5632, 50280) if name == "3b" else _llama(4096, 32, 32, 11008, 32000)
        cfg = LMMConfig(
            vision=VisionConfig(name="ViT-L-14", include_cls=True),
            language=LanguageConfig(hf_config=lm),
            bridge=BridgeConfig(
                perceiver=PerceiverConfig(num_latents=64, depth=6, heads=8, head_dim=64),
                cross_attn=CrossAttnConfig(every=1 if name == "3b" else 4, heads=8, head_dim=64),
            ),
            dtype=dtype,
        )
        return Shape(name, cfg, batch=16 if name == "3b" else 8, images=5, tokens=256, image_size=224)
    raise SystemExit(f"unknown shape {name!r}: small, 3b or 9b")


def build(shape: Shape, device: str):
    from lmm.model import LMM
    from lmm.runtime import enable_tf32

    enable_tf32()
    torch.manual_seed(0)
    return LMM.from_config(shape.lmm, tokenizer=tiny_tokenizer(), device=device)


def random_batch(model, shape: Shape, device: str, batch: int | None = None) -> dict:
    """Interleaved rows: `<image>` followed by a text chunk, `images` times, `tokens` tokens in all."""
    B = batch or shape.batch
    V = model.lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(402, V, (B, shape.tokens), generator=g)
    chunk = shape.tokens // shape.images
    ids[:, ::chunk][:, : shape.images] = model.image_token_id
    # uint8 crops, as the data loader ships them (the vision tower normalises them on the device); float
    # pixels for a tower that keeps its own transform
    size = (B, shape.images, 1, 3, shape.image_size, shape.image_size)
    uint8 = callable(getattr(model.image_processor, "normalize", None))
    pix = torch.randint(0, 256, size, generator=g, dtype=torch.uint8) if uint8 else torch.randn(size, generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids.masked_fill(ids == model.image_token_id, -100).to(device),
        "pixel_values": pix.to(device),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str) -> float:
    """Measured dense matmul FLOP/s: bf16 8192^3 on CUDA, fp32 2048^3 on CPU."""
    import time

    n, dt = (8192, torch.bfloat16) if device.startswith("cuda") else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    reps = 10 if device.startswith("cuda") else 3
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def peak_memory_gib(device: str) -> float | None:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB -> GiB)
