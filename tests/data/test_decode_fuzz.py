"""Hostile image bytes never take the process down: the 164-byte PNG that crashed `torchvision.io.decode_png`
(SIGSEGV) and thousands of mutated JPEG/PNG/WebP/GIF files, through the data loader's decode paths and the
server's. Decoding runs in a subprocess, so a crash shows up as an exit code instead of killing pytest."""

import collections
import json
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parents[1] / "fixtures" / "png-crashes-torchvision-decode.png"
FUZZ = Path(__file__).with_name("fuzz_images.py")
COUNT = 6000  # files; ~10-20 s on 2 cores, most of it the three decoders
DATA_OK = {"ok", "corrupt_image", "image_too_large"}
SERVER_OK = {"ok", "APIError 400 invalid_image", "APIError 413 image_too_large"}


def test_png_that_crashed_torchvision_is_a_counted_corrupt_image():
    code = (
        "import sys\n"
        "from lmm.data.media import decode_image, decode_image_tensor\n"
        "from lmm.data.errors import BadSample\n"
        "from lmm.serve.protocol import APIError, decode_image as serve_decode\n"
        "import base64\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "for fn in (decode_image_tensor, decode_image):\n"
        "    try:\n"
        "        fn(data)\n"
        "        print('decoded')\n"
        "    except BadSample as e:\n"
        "        print(e.reason)\n"
        "try:\n"
        "    serve_decode('data:image/png;base64,' + base64.b64encode(data).decode(), None)\n"
        "    print('decoded')\n"
        "except APIError as e:\n"
        "    print(e.status, e.code)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(FIXTURE)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"the decoder crashed (exit {r.returncode}): {r.stderr[-2000:]}"
    assert r.stdout.split("\n")[:3] == ["corrupt_image", "corrupt_image", "400 invalid_image"], r.stdout


def run_fuzz(tmp_path, count: int, seed: int) -> tuple[list[tuple[str, int]], list[dict]]:
    """Runs fuzz_images.py until it has seen every file; returns (crashes as (file, exit code), outcomes)."""
    progress, out = tmp_path / "progress", tmp_path / "out.jsonl"
    start, crashes = 0, []
    while True:
        r = subprocess.run(
            [
                sys.executable,
                str(FUZZ),
                "--count",
                str(count),
                "--seed",
                str(seed),
                "--start",
                str(start),
                "--progress",
                str(progress),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        state = progress.read_text() if progress.exists() else ""
        if r.returncode == 0 and state == "done":
            break
        if not state.isdigit():  # it failed before the first file: a broken harness, not a crash to count
            raise AssertionError(f"fuzz_images.py failed (exit {r.returncode}): {r.stderr[-3000:]}")
        crashes.append((int(state), r.returncode))
        if len(crashes) >= 25:
            break
        start = int(state) + 1
    outcomes = [json.loads(line) for line in out.read_text().splitlines()]
    return crashes, outcomes


def test_thousands_of_mutated_images_never_crash_either_decode_path(tmp_path):
    crashes, outcomes = run_fuzz(tmp_path, COUNT, seed=0)
    assert crashes == [], f"{len(crashes)} decoder crashes (file index, exit code): {crashes}"
    assert [o["i"] for o in outcomes] == list(range(COUNT))
    unexpected = [
        (o["name"], o[path])
        for o in outcomes
        for path in ("data_fast", "data_pil", "server")
        if o[path] not in (DATA_OK if path != "server" else SERVER_OK)
    ]
    assert unexpected == [], unexpected[:20]
    # every file is either decoded or a counted skip, and the mutations really do break files of each format
    for path in ("data_fast", "data_pil", "server"):
        counts = collections.Counter(o[path] for o in outcomes)
        print(path, dict(counts))
        assert counts["ok"] > COUNT // 10 and sum(counts.values()) - counts["ok"] > COUNT // 4, counts
    for fmt in ("JPEG", "PNG", "WEBP", "GIF"):
        broken = [o for o in outcomes if o["name"].split("-")[1] == fmt and o["data_fast"] != "ok"]
        assert len(broken) > 50, fmt
    # the loader's two paths agree on what is corrupt wherever PIL decides (everything but JPEG/WebP)
    for o in outcomes:
        if o["name"].split("-")[1] in ("PNG", "GIF"):
            assert (o["data_fast"] == "ok") == (o["data_pil"] == "ok"), o
