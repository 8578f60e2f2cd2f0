"""`lmm web` budgets without a browser: uploads are downscaled to the model's input size when they arrive (a session
never keeps a full-size image), oversized ones are refused from their header, and the command says that the
page has no authentication (loopback by default, a warning otherwise)."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from lmm.web import input_side, load_upload


def zero_png(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(b"\x00" * (w + 1)) for _ in range(h)) + z.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def test_uploads_are_downscaled_to_the_model_input_on_arrival(tmp_path):
    from lmm.testing import tiny_lmm

    side = input_side(tiny_lmm())
    assert side == 32
    big = Image.new("RGB", (4000, 3000), (200, 30, 60))
    big.save(tmp_path / "big.jpg", quality=95)
    big.save(tmp_path / "big.png")
    for name in ("big.jpg", "big.png"):
        im = load_upload(tmp_path / name, side)
        assert im.mode == "RGB" and im.size == (43, 32), (name, im.size)
        assert np.abs(np.asarray(im, dtype=int).mean((0, 1)) - (200, 30, 60)).max() < 6
    small = np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    assert np.array_equal(np.asarray(load_upload(tmp_path / "small.png", side)), small)  # left as it is


def test_oversized_odd_and_broken_uploads_are_refused_with_a_message(tmp_path):
    (tmp_path / "huge.png").write_bytes(zero_png(10_000, 10_000))  # 100 MP in ~100 KB: refused from the header
    with pytest.raises(ValueError, match="pixels"):
        load_upload(tmp_path / "huge.png", 32)
    with pytest.raises(ValueError, match="pixels"):
        load_upload(tmp_path / "huge.png", 32, max_pixels=1_000_000)
    (tmp_path / "strip.png").write_bytes(zero_png(100_000, 1))
    with pytest.raises(ValueError, match="unequal"):
        load_upload(tmp_path / "strip.png", 32)
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot decode"):
        load_upload(tmp_path / "text.png", 32)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="cannot decode"):
        load_upload(tmp_path / "cut.png", 32)


def test_web_help_says_no_authentication_and_a_public_host_warns(tmp_path):
    from lmm.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["web", "--help"], env={"COLUMNS": "200"}).output
    assert "NO authentication" in out and "127.0.0.1" in out and "--max-image-pixels" in out
    pytest.importorskip("gradio", reason="lmm web needs gradio before it warns")
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    r = runner.invoke(app, ["web", "--model", str(missing), "--host", "0.0.0.0"])
    assert r.exit_code != 0 and "no authentication" in r.output and "0.0.0.0" in r.output, r.output
    r = runner.invoke(app, ["web", "--model", str(missing)])
    assert "no authentication" not in r.output, r.output
