"""Data pipeline speed per CPU worker: MMC4-style interleaved webdataset shards (JPEG images as base64 in the
json, as MMC4 ships them) -> decode + preprocess + tokenise + pack into batches.

    python bench/data.py --shape 3b --workers 1     # 224 px JPEGs in, 224 px crops out (issue 8's target)
    python bench/data.py --shape small --workers 1  # CI smoke shape

Images are random noise (the slowest kind of JPEG to decode: photos compress 3-5x better). Rates are steady
state, after the first batch (worker start-up is reported apart as startup_s).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def write_shards(root: str, docs: int, images_per_doc: int, image_px: int, shards: int = 4) -> str:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    words = "a photo of the red blue circle dog street park two people riding bikes on".split()
    with wds.ShardWriter(os.path.join(root, "docs-%03d.tar"), maxcount=max(1, docs // shards), verbose=0) as sink:
        for d in range(docs):
            infos, texts = [], []
            for _ in range(images_per_doc * 2):
                texts.append(" ".join(rng.choice(words, 12)) + ".")
            for i in range(images_per_doc):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8)).save(buf, "JPEG")
                infos.append(
                    {
                        "image_base64": base64.b64encode(buf.getvalue()).decode(),
                        "matched_text_index": 2 * i,
                        "matched_sim": 0.3,
                    }
                )
            sink.write(
                {"__key__": f"doc{d:06d}", "json": json.dumps({"text_list": texts, "image_info": infos}).encode()}
            )
    return os.path.join(root, f"docs-{{000..{shards - 1:03d}}}.tar")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=["small", "3b", "9b"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--docs", type=int, default=None)
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--image-px", type=int, default=None, help="side of the stored JPEGs (default: the shape's)")
    ap.add_argument(
        "--tokenizer",
        default=None,
        help="an HF tokenizer folder (default: lmm's tiny test tokenizer; "
        "'smollm2' = the packaged SmolLM2-135M tokenizer, 49k tokens)",
    )
    args = ap.parse_args()
    from shapes import get_shape

    from lmm.data import DataConfig, build_loader
    from lmm.testing import tiny_tokenizer
    from lmm.tokens import add_media_tokens

    shape = get_shape(args.shape)
    docs = args.docs or (64 if args.shape == "small" else 512)
    if args.tokenizer:
        from transformers import AutoTokenizer

        if args.tokenizer == "smollm2":
            from lmm.presets import smollm2_folder

            args.tokenizer = str(smollm2_folder())
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tok = tiny_tokenizer()
    add_media_tokens(tok)
    from lmm.backbones.image_transform import ImageTransform

    transform = ImageTransform(shape.image_size, (0.5,) * 3, (0.5,) * 3)
    with tempfile.TemporaryDirectory() as root:
        image_px = args.image_px or shape.image_size
        pattern = write_shards(root, docs, shape.images, image_px)
        cfg = DataConfig.from_dict(
            {
                "datasets": [{"path": pattern, "format": "mmc4"}],
                "batch_size": shape.batch,
                "max_tokens": shape.tokens,
                "max_images": shape.images,
                "num_workers": args.workers,
                "epochs": 1,
                "packing": args.packing,
            }
        )
        loader = build_loader(cfg, tok, transform)
        image_id = tok.convert_tokens_to_ids("<image>")
        t0 = time.perf_counter()
        samples = images = batches = 0
        for batch in loader:
            if batches == 0:
                startup, t = time.perf_counter() - t0, time.perf_counter()
            else:  # steady state: everything after the first batch
                samples += (
                    int(batch["input_ids"].shape[0])
                    if "segment_ids" not in batch
                    else int((batch["segment_ids"].max(1).values + 1).sum())
                )
                images += int((batch["input_ids"] == image_id).sum())
            batches += 1
            pixel_dtype = str(batch["pixel_values"].dtype)
        dt = time.perf_counter() - t
    if batches < 2:
        raise SystemExit(f"only {batches} batch: pass more --docs (rates are measured after the first batch)")
    per = max(args.workers, 1)
    out = {
        "bench": "data",
        "shape": args.shape,
        "workers": args.workers,
        "packing": args.packing,
        "image_px": image_px,
        "out_px": shape.image_size,
        "tokenizer": args.tokenizer or "tiny",
        "vocab": len(tok),
        "pixel_dtype": pixel_dtype,
        "batches": batches,
        "startup_s": startup,
        "samples_per_s": samples / dt,
        "images_per_s": images / dt,
        "samples_per_s_per_worker": samples / dt / per,
        "images_per_s_per_worker": images / dt / per,
        "bad_samples": loader.bad_sample_counts(),
    }
    for k, v in out.items():
        print(f"{k:>26}: {v:.4g}" if isinstance(v, float) else f"{k:>26}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
