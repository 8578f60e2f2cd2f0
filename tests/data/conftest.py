"""Fixtures for data tests: a real tokenizer, a small transform, and writers of real files."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from PIL import Image, ImageDraw


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    """Keep HF datasets' Arrow cache inside the test's folder."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from lmm.testing import tiny_tokenizer
    from lmm.tokens import add_media_tokens

    tok = tiny_tokenizer()
    add_media_tokens(tok)
    return tok


@pytest.fixture(scope="session")
def transform():
    import torchvision.transforms as T

    return T.Compose([T.Resize((32, 32)), T.ToTensor()])


def color_of(i: int) -> tuple[int, int, int]:
    """A distinct, JPEG-robust colour per index."""
    return ((i * 53) % 256, (i * 97 + 40) % 256, (i * 151 + 80) % 256)


def draw_image(i: int, size: int = 48) -> Image.Image:
    im = Image.new("RGB", (size, size), color_of(i))
    ImageDraw.Draw(im).rectangle([size // 4, size // 4, size // 4 + 4, size // 4 + 4], outline=(255, 255, 255))
    return im


def image_bytes(i: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    draw_image(i).save(buf, format=fmt, quality=95) if fmt == "JPEG" else draw_image(i).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def write_tar():
    """write_tar(path_pattern, samples, maxcount) with webdataset's ShardWriter; returns the shard paths."""
    import webdataset as wds

    def write(pattern: str, samples: list[dict], maxcount: int = 10**9) -> list[str]:
        with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
            for s in samples:
                sink.write(s)
        d = os.path.dirname(pattern)
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".tar"))

    return write


def mean_color(pixels) -> tuple[int, int, int]:
    """Mean RGB (0-255) of a (C, H, W) tensor in [0, 1], ignoring the small drawn outline."""
    return tuple(int(round(float(c) * 255)) for c in pixels[:, 20:, 20:].mean(dim=(1, 2)))


def close_color(a, b, tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture(scope="session")
def img():
    """Image helpers: img.bytes(i, fmt), img.draw(i), img.color(i), img.mean(pixels), img.close(a, b)."""
    from types import SimpleNamespace

    return SimpleNamespace(bytes=image_bytes, draw=draw_image, color=color_of, mean=mean_color, close=close_color)


@pytest.fixture(scope="session")
def decode_rows(tokenizer):
    """decode_rows(batch) -> the text of each row without padding (special tokens kept)."""

    def decode(batch):
        out = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            out.append(tokenizer.decode(ids[mask.bool()]))
        return out

    return decode
