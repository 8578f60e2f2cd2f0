"""Write a small own-data example: "how many circles?" and "what color are they?" about generated 64 px images.

    python examples/counting_data.py --out datasets/counting          # 3,000 train + 300 test images
    python train.py --config configs/counting.yaml

Each image holds 1-4 filled circles of one of six colours at random places and sizes; every image gets both
questions, as LLaVA-style conversations (train.json, test.json; image paths relative to --out). Neither the
question nor the text alone tells the answer, so the blind baseline shows what the image adds.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
}
NUMBERS = ["one", "two", "three", "four"]


def draw(rng: random.Random, n: int, colour: str, size: int = 64):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (250, 250, 250))
    d = ImageDraw.Draw(im)
    placed: list[tuple[int, int, int]] = []
    while len(placed) < n:
        r = rng.randint(5, 9)
        x, y = rng.randint(r + 1, size - r - 2), rng.randint(r + 1, size - r - 2)
        if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 3) ** 2 for a, b, c in placed):  # no overlaps
            placed.append((x, y, r))
            d.ellipse([x - r, y - r, x + r, y + r], fill=COLORS[colour])
    return im


def write(out: Path, split: str, n_images: int, seed: int) -> None:
    rng = random.Random(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        n, colour = rng.randint(1, 4), rng.choice(list(COLORS))
        rel = f"{split}/{i:05d}.png"
        draw(rng, n, colour).save(out / rel)
        for q, a in (("How many circles are there?", NUMBERS[n - 1]), ("What color are the circles?", colour)):
            rows.append(
                {
                    "id": f"{split}{i}-{len(rows)}",
                    "image": rel,
                    "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                }
            )
    (out / f"{split}.json").write_text(json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="datasets/counting")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=300)
    args = ap.parse_args()
    out = Path(args.out)
    write(out, "train", args.train, seed=0)
    write(out, "test", args.test, seed=1)
    print(f"wrote {out}/train.json ({2 * args.train} questions) and {out}/test.json ({2 * args.test})")


if __name__ == "__main__":
    main()
