"""Labelling throughput of `lmm data label` (lmm.label.run_label) per process: real JPEG shards written to a temp
folder, greedy captions in left-padded batches, scoring and atomic shard writes included; model build excluded.

    python bench/label.py --shape small --device cpu
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from shapes import build, get_shape, sync  # noqa: E402

from lmm.label import LabelConfig, run_label  # noqa: E402


def write_shards(folder: Path, samples: int, per_shard: int, size: int) -> None:
    rng = np.random.RandomState(0)
    for s in range(0, samples, per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tf:
            for i in range(s, min(s + per_shard, samples)):
                buf = io.BytesIO()
                Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"sample {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="small", choices=["small", "3b", "9b"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    shape = get_shape(args.shape)
    model = build(shape, args.device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in", Path(tmp) / "out"
        inp.mkdir()
        write_shards(inp, args.samples, args.per_shard, 2 * shape.image_size)
        cfg = LabelConfig(
            model=shape.name,
            input=str(inp),
            output=str(out),
            task="caption",
            batch_size=args.batch,
            max_new_tokens=args.new_tokens,
            progress=False,
        )
        sync(args.device)
        t0 = time.perf_counter()
        result = run_label(cfg, model=model)
        sync(args.device)
        seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "bench": "label",
                "shape": shape.name,
                "device": args.device,
                "threads": torch.get_num_threads(),
                "samples": result["samples"],
                "batch": args.batch,
                "new_tokens": args.new_tokens,
                "kept": result["summary"]["kept"],
                "seconds": round(seconds, 3),
                "samples_per_s": round(result["samples"] / seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
