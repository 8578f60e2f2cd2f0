"""Image decoding from whatever a record holds (bytes, a path, an HF image dict, a PIL image).

Every failure becomes a `BadSample` with a precise reason, so a corrupt, oversized or missing image skips
its sample instead of stopping the run. Images are fully decoded here (PIL is lazy otherwise), so
a truncated file fails now, in the loader, not later in the model. `decode_image_tensor` is the fast
path (uint8 tensors, JPEG/WebP through torchvision.io); PIL stays the judge of what is corrupt.

Untrusted bytes, three rules:
  - the size is read from the header before anything is decoded: more than `max_image_pixels()` pixels
    (default 64 MP, env `LMM_MAX_IMAGE_PIXELS`) is a BadSample("image_too_large");
  - PNG is decoded by PIL only: libpng errors inside `torchvision.io.decode_png` (a corrupt deflate stream,
    a bad filter byte, a chunk edited with its CRC fixed) longjmp out of a C++ frame and kill the process
    (SIGSEGV), and ruling them all out beforehand costs as much as decoding with PIL;
  - any exception a decoder raises on hostile bytes is a BadSample("corrupt_image"), never a crash of the run.
Files and shard members above `max_member_bytes()` (default 256 MiB, env `LMM_MAX_MEMBER_BYTES`) are not
read at all: BadSample("member_too_large").
"""

from __future__ import annotations

import base64
import binascii
import io
import os

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

from .errors import BadSample

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # a 8000 x 8000 image: ~190 MB as RGB; bigger ones are skipped
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20
# decoded by torchvision.io (libjpeg-turbo / libwebp report errors as exceptions); PNG is not: see above
_TORCHVISION_FORMATS = {"JPEG", "WEBP"}


def env_limit(name: str, default, kind=int):
    """A positive limit from environment variable `name` (`kind` int or float), else `default`."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.replace("_", ""))
    except ValueError:
        value = 0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r}: expected a positive {'whole ' if kind is int else ''}number")
    return value


def max_image_pixels() -> int:
    """Most pixels (width x height, from the header) an image may have: env LMM_MAX_IMAGE_PIXELS, else 64 MP.

    PIL refuses images above twice its own `PIL.Image.MAX_IMAGE_PIXELS` (~179 MP) in any case; a limit above
    that also needs PIL's raised."""
    return env_limit("LMM_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)


def max_member_bytes() -> int:
    """Most bytes one shard member or media file may have: env LMM_MAX_MEMBER_BYTES, else 256 MiB."""
    return env_limit("LMM_MAX_MEMBER_BYTES", DEFAULT_MAX_MEMBER_BYTES)


def resolve_path(path: str, root: str | None) -> str:
    """A path as written in a record, made absolute against `root` when relative."""
    path = os.path.expanduser(path)
    if root and not os.path.isabs(path):
        return os.path.join(root, path)
    return path


def _b64decode(text, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise BadSample(f"corrupt_{what}", f"{what}_base64 is not valid base64: {e}") from None


def read_media_bytes(value, root: str | None = None, what: str = "image") -> bytes:
    """The raw bytes of an image/video field: bytes, a path, a `{"bytes", "path"}` dict or base64."""
    missing = f"missing_{what}"  # what: image, video or audio
    empty = {"image": "empty_image", "audio": "empty_audio"}.get(what, "corrupt_video")
    if isinstance(value, dict):  # HF Image(decode=False) / Video columns, MMC4 image_info
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("image_base64"):
            value = _b64decode(value["image_base64"], what)
        elif value.get("path") or value.get("image_name"):
            value = value.get("path") or value.get("image_name")
        elif value.get("bytes") == b"":
            raise BadSample(empty, f"zero-byte {what}")
        else:
            raise BadSample(missing, f"no bytes or path in {what} field")
    if value is None:
        raise BadSample(missing, f"no {what}")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise BadSample(empty, f"zero-byte {what}")
        return bytes(value)
    if isinstance(value, str):
        if value.startswith(("http://", "https://")):
            raise BadSample(missing, f"{value[:200]} is a URL; download the {what}s first (nothing is fetched)")
        if "\x00" in value:
            raise BadSample(missing, f"{what} path contains a NUL byte")
        path = resolve_path(value, root)
        try:
            if not os.path.isfile(path):
                raise BadSample(missing, f"{path[:300]} does not exist (set image_root for relative paths)")
            size = os.path.getsize(path)
            if size == 0:
                raise BadSample(empty, f"{path} is empty")
            limit = max_member_bytes()
            if size > limit:
                raise BadSample(
                    "member_too_large", f"{path} has {size} bytes, more than {limit} (LMM_MAX_MEMBER_BYTES)"
                )
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise BadSample(missing, f"cannot read {path[:300]}: {type(e).__name__}: {e.strerror or e}") from None
    raise BadSample(missing, f"cannot read a {what} from a {type(value).__name__}")


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """A lazily opened PIL image (only the header read) whose size is within `max_pixels`
    (default `max_image_pixels()`); BadSample("image_too_large" / "corrupt_image") otherwise."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", str(e)) from None
    except Exception as e:  # PIL raises many types on hostile headers; none of them may end a run
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        im.close()
        raise BadSample("corrupt_image", f"image size {w}x{h}")
    if w * h > limit:
        im.close()
        raise BadSample(
            "image_too_large",
            f"{w}x{h} = {w * h} pixels, more than {limit} (LMM_MAX_IMAGE_PIXELS); "
            "checked from the header, nothing decoded",
        )
    return im


def _pil_rgb(im: Image.Image) -> Image.Image:
    try:
        with im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # OSError, SyntaxError, ValueError (zTXt bombs), MemoryError, struct.error ...
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}") from None


def decode_image(value, root: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """A fully decoded RGB PIL image, or BadSample(corrupt_image / image_too_large / empty_image /
    missing_image / member_too_large)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    return _pil_rgb(open_image(read_media_bytes(value, root, "image"), max_pixels))


def decode_image_tensor(value, root: str | None = None, max_pixels: int | None = None) -> torch.Tensor:
    """uint8 RGB (3, H, W), pixel-identical to `decode_image`: JPEG/WebP decoded by torchvision.io
    (libjpeg-turbo/libwebp, no PIL image in between); PNG, other formats, animated files and anything
    torchvision refuses go through PIL, which raises the BadSample for a corrupt file."""
    if isinstance(value, Image.Image):
        return torch.from_numpy(np.array(value.convert("RGB"))).permute(2, 0, 1)
    data = read_media_bytes(value, root, "image")
    im = open_image(data, max_pixels)  # header only: format and size
    if im.format in _TORCHVISION_FORMATS and not getattr(im, "is_animated", False):
        try:
            x = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if x.dtype == torch.uint8 and x.ndim == 3 and tuple(x.shape[1:]) == (im.height, im.width):
                im.close()
                return x
        except RuntimeError:
            pass  # truncated / corrupt: PIL below gives the reason
    return torch.from_numpy(np.array(_pil_rgb(im))).permute(2, 0, 1)
