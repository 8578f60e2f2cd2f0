"""An audio example on real recordings: what kind of word is spoken (a number, an ordinal, a weekday or a month)?

    python examples/spoken_words.py write --out datasets/spoken              # train.json / test.json
    python train.py --config configs/spoken_words.yaml                       # lmm-tiny-audio, frozen cache
    python examples/spoken_words.py evaluate runs/spoken_words --data datasets/spoken/test.json

The clips are Debian's asterisk-core-sounds-en-wav recordings (one voice, 8 kHz, CC-BY-SA-3.0:
`apt-get install asterisk-core-sounds-en-wav`): "seven" (digits/7.wav), "seventh" (digits/h-7.wav), "Tuesday"
(digits/day-2.wav), "March" (digits/mon-2.wav) ... 75 words. A quarter of each kind is held out, so the test
words are recordings the model never trained on. The question is the same for every clip, so without the audio
the best a model can do is the most common answer; `evaluate` prints the accuracy with and without the clip.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")
QUESTION = "Is this a number, an ordinal, a weekday or a month?"
NUMBERS = [*range(21), 30, 40, 50, 60, 70, 80, 90]
KINDS = {
    "number": [f"{n}.wav" for n in NUMBERS],
    "ordinal": [f"h-{n}.wav" for n in NUMBERS if n > 0],
    "weekday": [f"day-{d}.wav" for d in range(7)],
    "month": [f"mon-{m}.wav" for m in range(12)],
}


def conversation(path: Path, answer: str | None = None, with_audio: bool = True) -> list[dict]:
    user = f"<audio>\n{QUESTION}" if with_audio else QUESTION
    return [{"from": "human", "value": user}] + ([{"from": "gpt", "value": answer}] if answer else [])


def write(out: Path, seed: int = 0) -> dict[str, int]:
    """train.json / test.json under `out`: LLaVA-style conversations with absolute audio paths."""
    if not SOUNDS.is_dir():
        raise SystemExit(f"{SOUNDS} not found: apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en")
    rng = random.Random(seed)
    splits: dict[str, list] = {"train": [], "test": []}
    for kind, names in KINDS.items():
        names = sorted(names)
        rng.shuffle(names)
        held = max(1, len(names) // 4)
        for i, name in enumerate(names):
            row = {"id": name[:-4], "audio": str(SOUNDS / name), "conversations": conversation(SOUNDS / name, kind)}
            splits["test" if i < held else "train"].append(row)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        rng.shuffle(rows)
        (out / f"{split}.json").write_text(json.dumps(rows, indent=1))
    return {k: len(v) for k, v in splits.items()}


def evaluate(model_dir: str, data: str) -> dict:
    """Held-out accuracy of the trained model with the clip, and of the same model asked without it."""
    from lmm import presets

    model = presets.load(model_dir, device="cpu").eval()
    rows = json.loads(Path(data).read_text())
    answers = [r["conversations"][-1]["value"] for r in rows]
    kw = dict(max_new_tokens=4, num_beams=1)

    said: dict[bool, dict] = {}

    def accuracy(with_audio: bool) -> float:
        convs = []
        for r in rows:
            text = {"type": "text", "text": QUESTION}
            content = [{"type": "audio", "audio": r["audio"]}, text] if with_audio else [text]
            convs.append([{"role": "user", "content": content}])
        outs = []
        for i in range(0, len(convs), 8):
            outs += model.chat(convs[i : i + 8], **kw)
        outs = [o.strip().lower().rstrip(".") for o in outs]
        said[with_audio] = dict(Counter(outs).most_common(4))
        return sum(o == a for o, a in zip(outs, answers)) / len(rows)

    majority = max(answers.count(k) for k in KINDS) / len(answers)
    out = {"with_audio": accuracy(True), "without_audio": accuracy(False), "majority": majority, "n": len(rows)}
    return {**out, "answers_with_audio": said[True], "answers_without_audio": said[False]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", default="datasets/spoken")
    e = sub.add_parser("evaluate")
    e.add_argument("model")
    e.add_argument("--data", default="datasets/spoken/test.json")
    args = p.parse_args()
    if args.cmd == "write":
        print(json.dumps(write(Path(args.out))))
    else:
        print(json.dumps(evaluate(args.model, args.data)))


if __name__ == "__main__":
    main()
