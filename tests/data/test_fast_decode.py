"""The fast image path: torchvision.io decoding is pixel-identical to PIL's, errors stay PIL's, and a loader
given an ImageTransform ships uint8 pixels that the model turns into the same logits as float pixels."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.backbones.image_transform import ImageTransform
from lmm.data import BadSample, DataConfig, build_loader
from lmm.data.media import decode_image, decode_image_tensor


def _noise(mode: str, size=(37, 29)) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


CASES = {
    "jpeg-rgb": lambda: _encode(_noise("RGB"), "JPEG"),
    "jpeg-gray": lambda: _encode(_noise("L"), "JPEG"),
    "jpeg-cmyk": lambda: _encode(_noise("CMYK"), "JPEG"),
    "jpeg-progressive": lambda: _encode(_noise("RGB"), "JPEG", progressive=True),
    "png-rgb": lambda: _encode(_noise("RGB"), "PNG"),
    "png-rgba": lambda: _encode(_noise("RGBA"), "PNG"),
    "png-palette": lambda: _encode(_noise("P"), "PNG"),
    "png-gray-alpha": lambda: _encode(_noise("LA"), "PNG"),
    "png-16bit": lambda: _encode(Image.fromarray(np.arange(37 * 29, dtype=np.uint16).reshape(29, 37) * 60), "PNG"),
    "webp": lambda: _encode(_noise("RGB"), "WEBP"),
    "gif": lambda: _encode(_noise("P"), "GIF"),
    "bmp": lambda: _encode(_noise("RGB"), "BMP"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_decode_is_pixel_identical_to_pil(case):
    data = CASES[case]()
    x = decode_image_tensor(data)
    ref = torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)
    assert x.dtype == torch.uint8 and x.shape == (3, 29, 37)
    assert torch.equal(x, ref)


def test_corrupt_and_truncated_files_are_bad_samples_with_pil_reasons():
    jpeg, png = CASES["jpeg-rgb"](), CASES["png-rgb"]()
    for data in (jpeg[: len(jpeg) // 2], png[:60], b"\xff\xd8 not a jpeg" * 8, b"garbage" * 20):
        with pytest.raises(BadSample) as e:
            decode_image_tensor(data)
        assert e.value.reason == "corrupt_image"
    with pytest.raises(BadSample) as e:
        decode_image_tensor(b"")
    assert e.value.reason == "empty_image"


def test_decompression_bomb_is_refused_before_torchvision_decodes_it(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 37 x 29 > 2 x 100: PIL's bomb error
    with pytest.raises(BadSample) as e:
        decode_image_tensor(CASES["jpeg-rgb"]())
    assert e.value.reason == "image_too_large" and "decompression bomb" in str(e.value).lower()


def test_pixel_limit_is_read_from_the_header_before_decoding(monkeypatch):
    """A 20000 x 20000 PNG of 60 KB is refused from its header (LMM_MAX_IMAGE_PIXELS, default 64 MP): nothing
    is decoded, so it costs no memory; the limit is configurable and counted as image_too_large."""
    import zlib

    from lmm.data.media import DEFAULT_MAX_IMAGE_PIXELS, max_image_pixels

    huge, big = _png_of_zeros(20_000, 20_000), _png_of_zeros(9_000, 9_000)  # 400 MP (past PIL's own bomb limit), 81 MP
    assert len(huge) < 1_000_000 and DEFAULT_MAX_IMAGE_PIXELS == max_image_pixels() < 9_000 * 9_000
    for decode in (decode_image, decode_image_tensor):
        for data in (huge, big):
            with pytest.raises(BadSample) as e:
                decode(data)
            assert e.value.reason == "image_too_large"
        assert "9000x9000" in str(e.value) and "nothing decoded" in str(e.value)
    small = CASES["png-rgb"]()  # 37 x 29 = 1073 pixels
    monkeypatch.setenv("LMM_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(BadSample, match="image_too_large"):
        decode_image_tensor(small)
    assert decode_image_tensor(small, max_pixels=2000).shape == (3, 29, 37)
    monkeypatch.setenv("LMM_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="LMM_MAX_IMAGE_PIXELS"):
        decode_image_tensor(small)
    assert zlib  # (used by _png_of_zeros)


def _png_of_zeros(w: int, h: int) -> bytes:
    """A valid w x h greyscale PNG of zeros built chunk by chunk (PIL would need w*h bytes of memory)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (w + 1)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def test_uint8_batches_give_the_same_logits_as_float_pixels(tmp_path, write_tar, img):
    """Loader (torchvision decode, uint8 crops, model-side normalisation) == the PIL-in, float path of chat."""
    import re

    from lmm.testing import tiny_lmm

    model = tiny_lmm(gates=0.5)
    assert isinstance(model.image_processor, ImageTransform)
    jpegs = [_encode(img.draw(i, size=48), "JPEG") for i in range(4)]
    samples = [{"__key__": f"k{i}", "jpg": j, "txt": f"cap {i}"} for i, j in enumerate(jpegs)]
    (path,) = write_tar(str(tmp_path / "p-%03d.tar"), samples)
    cfg = DataConfig.from_dict({"datasets": [{"path": path}], "batch_size": 4, "epochs": 1})
    (batch,) = list(build_loader(cfg, model.tokenizer, model.image_processor))
    batch.pop("task_ids")
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape[-2:] == (32, 32)
    order = [int(m) for m in re.findall(r"cap (\d)", " ".join(model.tokenizer.batch_decode(batch["input_ids"])))]
    floats = torch.stack([model.image_processor(Image.open(io.BytesIO(jpegs[k]))) for k in order])
    with torch.no_grad():
        out_u8 = model(**batch).logits
        out_f = model(**{**batch, "pixel_values": floats[:, None, None]}).logits  # (B, M=1, F=1, C, H, W)
        out_black = model(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}).logits
    assert torch.allclose(out_u8, out_f, atol=1e-6)
    assert not torch.allclose(out_u8, out_black, atol=1e-3)  # the pixels do reach the logits (gates 0.5)


def test_tower_without_an_image_transform_refuses_uint8_pixels():
    from lmm.testing import tiny_lmm

    model = tiny_lmm()
    model.vision.preprocess = lambda im: im  # e.g. a user's own torchvision Compose
    with pytest.raises(ValueError, match="normalised float pixels"):
        model.vision_features(torch.zeros(1, 1, 1, 3, 32, 32, dtype=torch.uint8))
