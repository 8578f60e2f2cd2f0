"""Write a small spoken-digit example from real recordings: "Which number is said?" -> "seven".

    python examples/spoken_digits.py --out datasets/spoken-digits
    python train.py --config configs/spoken_digits.yaml

Training clips: the ten digits of Debian's `asterisk-core-sounds-en-wav` (one voice, Allison, 8 kHz telephone
recordings; CC-BY-SA-3.0; `apt-get install asterisk-core-sounds-en-wav`), each recording plus augmented copies:
random gain, leading/trailing silence (time shift), added noise, and a small speed change by resampling. Test
clips: the ten digits of pip `spokennumbers` (MIT): another speaker, recorded at 44.1 kHz, that training never
hears, each as recorded plus augmented copies of its own. Every clip is a real 16 kHz mono WAV under --out, named
in LLaVA-style conversations (train.json, test.json, paths relative to --out). The question alone never tells the
digit, so the blind baseline (the same model without the audio) is chance, 10%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION = "Which number is said?"
RATE = 16_000
ALLISON = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")


def sources() -> tuple[list[Path], list[Path]]:
    """(Allison's digit recordings, spokennumbers' digit recordings), 0-9 each; a clear error when missing."""
    import importlib.util

    spec = importlib.util.find_spec("spokennumbers")  # its files only: importing it pulls in pydub
    if spec is None or spec.origin is None:
        raise SystemExit("the test voice comes from pip: pip install spokennumbers")
    if not ALLISON.is_dir():
        raise SystemExit(f"{ALLISON} not found: apt-get install asterisk-core-sounds-en-wav")
    other = Path(spec.origin).parent / "default"
    return [ALLISON / f"{d}.wav" for d in range(10)], [other / f"{d}.wav" for d in range(10)]


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A variant of a 16 kHz clip: speed x0.75-1.3 (resampled, so pitch moves too), gain -12..+3 dB, 0-0.8 s of
    silence before and 0-0.4 s after, white noise at 12-40 dB SNR."""
    from lmm.data.audio import resample

    x = resample(x, int(RATE * rng.uniform(0.75, 1.3)), RATE)  # played at another speed and pitch
    x = x * 10 ** (rng.uniform(-12, 3) / 20)
    x = np.concatenate([np.zeros(int(rng.uniform(0, 0.8) * RATE)), x, np.zeros(int(rng.uniform(0, 0.4) * RATE))])
    rms = np.sqrt(np.mean(x**2)) + 1e-8
    x = x + rng.normal(0, rms / 10 ** (rng.uniform(12, 40) / 20), x.shape)
    return np.clip(x, -1, 1).astype(np.float32)


def write(out: Path, split: str, recordings: list[Path], copies: int, seed: int) -> int:
    from lmm.data.audio import decode_audio, write_audio

    rng = np.random.default_rng(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for digit, path in enumerate(recordings):
        clean = decode_audio(str(path), sampling_rate=RATE)  # mono, resampled from 8 / 44.1 kHz
        for k in range(copies + 1):
            rel = f"{split}/{digit}-{k:02d}.wav"
            write_audio(out / rel, clean if k == 0 else augment(clean, rng), RATE)
            conv = [{"from": "human", "value": f"<audio>\n{QUESTION}"}, {"from": "gpt", "value": WORDS[digit]}]
            rows.append({"id": f"{split}-{digit}-{k}", "audio": rel, "conversations": conv})
    (out / f"{split}.json").write_text(json.dumps(rows, indent=1))
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="datasets/spoken-digits")
    ap.add_argument("--train-copies", type=int, default=15, help="augmented copies per training recording")
    ap.add_argument("--test-copies", type=int, default=2, help="augmented copies per test recording")
    args = ap.parse_args()
    out = Path(args.out)
    allison, other = sources()
    n_train = write(out, "train", allison, args.train_copies, seed=0)
    n_test = write(out, "test", other, args.test_copies, seed=1)
    print(f"wrote {out}/train.json ({n_train} clips, one voice) and {out}/test.json ({n_test} clips, another voice)")


if __name__ == "__main__":
    main()
