"""Image decoding from whatever a record holds (bytes, a path, an HF image dict, a PIL image).

Every failure becomes a `BadSample` with a precise reason, so a corrupt or missing image skips
its sample instead of stopping the run. Images are fully decoded here (PIL is lazy otherwise), so
a truncated file fails now, in the loader, not later in the model. `decode_image_tensor` is the fast
path (uint8 tensors, JPEG/PNG/WebP through torchvision.io); PIL stays the judge of what is corrupt.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as tv_decode_image

from .errors import BadSample

Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # big but bounded: decompression bombs are still refused
_TORCHVISION_FORMATS = {"JPEG", "PNG", "WEBP"}
_PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def resolve_path(path: str, root: str | None) -> str:
    """A path as written in a record, made absolute against `root` when relative."""
    path = os.path.expanduser(path)
    if root and not os.path.isabs(path):
        return os.path.join(root, path)
    return path


def read_media_bytes(value, root: str | None = None, what: str = "image") -> bytes:
    """The raw bytes of an image/video field: bytes, a path, a `{"bytes", "path"}` dict or base64."""
    missing = "missing_image" if what == "image" else "missing_video"
    empty = "empty_image" if what == "image" else "corrupt_video"
    if isinstance(value, dict):  # HF Image(decode=False) / Video columns, MMC4 image_info
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("image_base64"):
            value = base64.b64decode(value["image_base64"])
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
            raise BadSample(missing, f"{value} is a URL; download the {what}s first (nothing is fetched)")
        path = resolve_path(value, root)
        if not os.path.isfile(path):
            raise BadSample(missing, f"{path} does not exist (set image_root for relative paths)")
        if os.path.getsize(path) == 0:
            raise BadSample(empty, f"{path} is empty")
        with open(path, "rb") as f:
            return f.read()
    raise BadSample(missing, f"cannot read a {what} from a {type(value).__name__}")


def decode_image(value, root: str | None = None) -> Image.Image:
    """A fully decoded RGB PIL image, or BadSample(corrupt_image / empty_image / missing_image)."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    data = read_media_bytes(value, root, "image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except _PIL_ERRORS as e:
        raise BadSample("corrupt_image", str(e)) from None


def decode_image_tensor(value, root: str | None = None) -> torch.Tensor:
    """uint8 RGB (3, H, W), pixel-identical to `decode_image`: JPEG/PNG/WebP decoded by torchvision.io
    (libjpeg-turbo/libpng, no PIL image in between); other formats, 16-bit or animated files and anything
    torchvision refuses go through PIL, which raises the BadSample for a corrupt file."""
    if isinstance(value, Image.Image):
        return torch.from_numpy(np.array(value.convert("RGB"))).permute(2, 0, 1)
    data = read_media_bytes(value, root, "image")
    try:
        with Image.open(io.BytesIO(data)) as im:  # header only: format, and PIL's decompression-bomb limit
            fmt = im.format
    except _PIL_ERRORS as e:
        raise BadSample("corrupt_image", str(e)) from None
    if fmt in _TORCHVISION_FORMATS:
        try:
            x = tv_decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if x.dtype == torch.uint8 and x.ndim == 3:
                return x
        except RuntimeError:
            pass  # truncated / corrupt: PIL below gives the reason
    return decode_image_tensor(decode_image(data))
