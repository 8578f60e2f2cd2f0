"""Analytic peak GPU memory of one training step at a named shape, per component, for several option sets.

    python bench/memory_model.py --shape 3b
    python bench/memory_model.py --shape 9b --limit-gib 40

No GPU needed: parameter counts are exact (the model is built on the `meta` device, so nothing is allocated),
activation bytes follow the per-token terms written out below for bf16 autocast with fp32 trainable weights and
flash/SDPA attention (no T^2 term). Prints a table, then one JSON line. Compare with `bench/train_step.py`'s
measured `peak_mem_gib` on a GPU (the README table shows both).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from shapes import get_shape  # noqa: E402

from lmm.losses import LOSS_CHUNK  # noqa: E402

GIB = 2**30


@dataclass(frozen=True)
class Options:
    name: str
    optimizer_bytes: float = 8.0  # per trainable parameter: AdamW fp32 (exp_avg + exp_avg_sq); 8-bit AdamW: 2
    checkpointing: bool = False  # activation checkpointing of decoder layers, their blocks and perceiver layers
    lm_bits: int = 16  # frozen LM weights: 16 (bf16) or 4 (QLoRA nf4, ~4.5 bits with scales)


OPTION_SETS = [
    Options("baseline (AdamW fp32)"),
    Options("8-bit AdamW", optimizer_bytes=2.0),
    Options("checkpointing", checkpointing=True),
    Options("8-bit AdamW + checkpointing", optimizer_bytes=2.0, checkpointing=True),
    Options("8-bit AdamW + checkpointing + 4-bit LM", optimizer_bytes=2.0, checkpointing=True, lm_bits=4),
]


def parameter_counts(shape) -> dict[str, int]:
    """Exact parameter counts per part, from the model built on the meta device (nothing allocated)."""
    from lmm.model import LMM
    from lmm.testing import tiny_tokenizer

    model = LMM.from_config(shape.lmm, tokenizer=tiny_tokenizer(), device="meta")
    trainable = {id(p) for p in model.trainable_parameters()}
    count = lambda mod, train: sum(p.numel() for p in mod.parameters() if (id(p) in trainable) == train)  # noqa: E731
    blocks = model.xattn_blocks()
    return {
        "vision": count(model.vision, False),
        "lm_frozen": count(model.lm, False),
        "xattn": sum(count(b, True) for b in blocks),
        "resampler": count(model.resampler, True),
        "other_trainable": count(model.embed, True) + count(model.head, True),
        "n_xattn": len(blocks),
        "vision_tokens": _vision_tokens(model, shape),
    }


def _vision_tokens(model, shape) -> int:
    v = model.vision
    grid = shape.image_size // v.patch_size if getattr(v, "patch_size", None) else None
    if grid is None:
        return 257
    return grid * grid + (1 if shape.lmm.vision.include_cls else 0)


def activation_bytes(shape, counts: dict, opt: Options) -> dict[str, float]:
    """Bytes autograd keeps for backward, per component (bf16 = 2 B, fp32 = 4 B)."""
    lm = shape.lmm.language.hf_config
    D, I, V, L = lm["hidden_size"], lm["intermediate_size"], lm["vocab_size"], lm["num_hidden_layers"]
    Dkv = D * lm["num_key_value_heads"] // lm["num_attention_heads"]
    x, p = shape.lmm.bridge.cross_attn, shape.lmm.bridge.perceiver
    Hd, xHd, Dv = p.heads * p.head_dim, x.heads * x.head_dim, 1024
    tokens = shape.batch * shape.tokens
    images = shape.batch * shape.images
    # frozen decoder layer (gradients flow through it to the bridge below): RMSNorm fp32 input copies (2 x 4D),
    # norm outputs (2 x 2D), q/k/v (2(D + 2Dkv)), attention output (2D), SwiGLU gate/up/act/product (4 x 2I)
    per_layer = 8 * D + 4 * D + 2 * (D + 2 * Dkv) + 2 * D + 8 * I
    # cross-attention block per text token: LayerNorm in (2D) and fp32 out (4D), bf16 cast (2D), q and attention
    # out (2 x 2 xHd), out-proj (2D) ... then the FFN: LN (2D + 4D + 2D), fc1 and GELU outputs (2 x 2 x ff D)
    per_block = 2 * D + 4 * D + 2 * D + 4 * xHd + 2 * D + 8 * D + 4 * x.ff_mult * D
    per_block_media = 2 * Dv + 4 * xHd  # per media latent per block: bf16 media copy, k and v
    n_lat = p.num_latents
    # perceiver layer per image: media LN in/out (4 + 4) Dv N, bf16 casts of media+latents (2Dv (N + n)), k/v over
    # N + n (4 Hd (N + n)), latent-side attention and FFN (~(16 + 8 ff) Dv n)
    N = counts["vision_tokens"]
    per_perc = 8 * Dv * N + 2 * Dv * (N + n_lat) + 4 * Hd * (N + n_lat) + (16 + 8 * p.ff_mult) * Dv * n_lat
    media_latents = images * n_lat
    out = {}
    if opt.checkpointing:
        # only each layer's input (2D per token) is kept; one layer (and its block) is recomputed at a time
        out["decoder layers (inputs kept)"] = tokens * L * 2 * D
        out["recompute of one layer (transient)"] = tokens * (per_layer + per_block)
        out["cross-attn media k/v"] = media_latents * per_block_media * counts["n_xattn"]
    else:
        out["decoder layers"] = tokens * L * per_layer
        out["cross-attn blocks"] = tokens * counts["n_xattn"] * per_block
        out["cross-attn media k/v"] = media_latents * per_block_media * counts["n_xattn"]
    if opt.checkpointing:  # each layer keeps its latents (fp32); the media tensor is kept once
        out["perceiver (inputs kept)"] = images * (4 * Dv * N + p.depth * 4 * Dv * n_lat)
        out["perceiver recompute of one layer (transient)"] = images * per_perc
    else:
        out["perceiver"] = images * p.depth * per_perc
    # chunked next-token loss: bf16 logits, fp32 copy and its gradient for one chunk of positions at a time
    out["loss chunk (transient)"] = min(tokens, LOSS_CHUNK) * V * (2 + 4 + 4)
    # frozen vision forward (no grad): about one block's activations of all images at a time
    out["vision forward (transient)"] = images * N * Dv * 2 * 8
    return out


def estimate(shape, counts: dict, opt: Options) -> dict[str, float]:
    trainable = counts["xattn"] + counts["resampler"] + counts["other_trainable"]
    rows = {
        "frozen vision (bf16)": counts["vision"] * 2,
        f"frozen LM ({'bf16' if opt.lm_bits == 16 else 'nf4'})": counts["lm_frozen"]
        * (2 if opt.lm_bits == 16 else 4.5 / 8),
        "trainable weights (fp32)": trainable * 4,
        "gradients (fp32)": trainable * 4,
        "optimizer state": trainable * opt.optimizer_bytes,
        "autocast bf16 weight copies": trainable * 2,
    }
    rows.update(activation_bytes(shape, counts, opt))
    rows["CUDA context + allocator slack (~1 GiB + 5%)"] = GIB + 0.05 * sum(rows.values())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="3b", choices=["small", "3b", "9b"])
    ap.add_argument("--limit-gib", type=float, default=20.0)
    args = ap.parse_args()
    shape = get_shape(args.shape, dtype="bf16")
    counts = parameter_counts(shape)
    results = {}
    for opt in OPTION_SETS:
        rows = estimate(shape, counts, opt)
        results[opt.name] = {
            "components_gib": {k: round(v / GIB, 3) for k, v in rows.items()},
            "total_gib": round(sum(rows.values()) / GIB, 2),
        }
    width = max(len(k) for r in results.values() for k in r["components_gib"])
    print(
        f"shape {args.shape}: batch {shape.batch} x {shape.tokens} tokens, {shape.images} images/row; "
        f"trainable {(counts['xattn'] + counts['resampler'] + counts['other_trainable']) / 1e6:.0f} M, "
        f"frozen LM {counts['lm_frozen'] / 1e6:.0f} M, vision {counts['vision'] / 1e6:.0f} M"
    )
    for name, r in results.items():
        print(f"\n{name}: {r['total_gib']:.1f} GiB {'(fits)' if r['total_gib'] <= args.limit_gib else ''}")
        for k, v in r["components_gib"].items():
            print(f"  {k:<{width}} {v:8.2f}")
    fits = [n for n, r in results.items() if r["total_gib"] <= args.limit_gib]
    print(f"\nunder {args.limit_gib:g} GiB: {', '.join(fits) if fits else 'none of these option sets'}")
    print(
        json.dumps(
            {
                "bench": "memory_model",
                "shape": args.shape,
                "limit_gib": args.limit_gib,
                "params": counts,
                "estimates": results,
                "fits": fits,
            }
        )
    )


if __name__ == "__main__":
    main()
