"""OpenAI chat-completions wire format: request body -> validated conversation + generation settings,
answers -> response / stream-chunk bodies, and the OpenAI-style error body.

Requests are untrusted: every budget in `Limits` is checked before the work it bounds (images counted and
their sizes read from the headers before any is decoded, text measured before it is tokenised), and every
refusal is a 4xx with the OpenAI error body that says what was refused, never where a path points.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

from lmm.tokens import IMAGE_TOKEN

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/tiff")
_MAX_PATH_CHARS = 4096  # PATH_MAX on Linux; a file name part longer than 255 bytes cannot exist either


@dataclass(frozen=True)
class Limits:
    """Per-request budgets (the `lmm serve` options of the same names)."""

    max_body_bytes: int = 64 * 1024 * 1024  # the request body, however it is sent (Content-Length or chunked)
    max_images: int = 16  # image parts in one request
    max_image_bytes: int = MAX_IMAGE_BYTES  # one encoded image
    max_image_pixels: int = MAX_IMAGE_PIXELS  # one image, width x height from its header
    max_request_pixels: int = 64_000_000  # all images of one request together, from their headers
    max_aspect_ratio: float = 200.0  # longer side / shorter side: a 40,000,000 x 1 strip makes resizing explode
    max_text_chars: int | None = None  # all text of one request, before tokenising (None: 32 x the context)
    body_timeout: float = 60.0  # seconds for the whole body to arrive

    def __post_init__(self):
        for name in (
            "max_body_bytes",
            "max_images",
            "max_image_bytes",
            "max_image_pixels",
            "max_request_pixels",
            "max_text_chars",
        ):
            if name == "max_text_chars" and self.max_text_chars is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"Limits.max_aspect_ratio must be at least 1, got {self.max_aspect_ratio!r}")
        if not self.body_timeout > 0:
            raise ValueError(f"Limits.body_timeout must be positive, got {self.body_timeout!r}")

    def for_context(self, context: int | None) -> Limits:
        """These limits with `max_text_chars` filled in: 32 characters per token of the model's context
        (at least 10,000), or 1,000,000 when the context is unknown."""
        if self.max_text_chars is not None:
            return self
        chars = max(10_000, 32 * context) if context else 1_000_000
        return replace(self, max_text_chars=chars)


class APIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, type_: str = "invalid_request_error"
    ):
        # a message may quote client text: make it encodable (a lone surrogate would turn the reply into a 500)
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, code, param)


@dataclass(frozen=True)
class Settings:
    """Generation settings; requests with equal settings may share one batched forward."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def kwargs(self) -> dict:
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    @property
    def batchable(self) -> bool:
        # a seeded sample must not share its random stream with other rows, or it would not reproduce
        return not (self.do_sample and self.seed is not None)


@dataclass
class ChatRequest:
    messages: list[dict]
    settings: Settings
    stream: bool
    prompt: str = ""
    prompt_tokens: int = 0
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes) -> dict:
    """The request body as a dict; 400 invalid_json for anything else (NaN/Infinity, nesting too deep for the
    parser, an integer with more digits than Python converts, bad UTF-8)."""
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        raise bad_request("the request body is nested too deeply", "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError; so is a 5,000-digit number
        raise bad_request(f"the request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", "invalid_json")
    return body


def _number(body: dict, name: str, kind, lo=None, hi=None, default=None):
    value = body.get(name)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float) if kind is float else int)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise bad_request(
            f"'{name}' must be a {'finite number' if kind is float else 'integer'}, got {str(value)[:40]}",
            "invalid_value",
            name,
        )
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        shown = value if not isinstance(value, int) or abs(value) < 10**18 else f"a {len(str(abs(value)))}-digit number"
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {shown}", "invalid_value", name)
    return kind(value)


def parse_settings(body: dict, default_max_tokens: int) -> Settings:
    """OpenAI sampling fields -> Settings. temperature omitted or 0 means greedy decoding."""
    for name in ("tools", "functions", "logprobs", "response_format"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server", "unsupported_parameter", name)
    if body.get("stop"):
        raise bad_request(
            "'stop' sequences are not supported; the answer ends at the model's end of turn",
            "unsupported_parameter",
            "stop",
        )
    if _number(body, "n", int, default=1) != 1:
        raise bad_request("only n=1 is supported; send several requests for several answers", "invalid_value", "n")
    max_tokens = _number(
        body, "max_completion_tokens", int, 1, 4096, _number(body, "max_tokens", int, 1, 4096, default_max_tokens)
    )
    temperature = _number(body, "temperature", float, 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0, 1.0)
    seed = _number(body, "seed", int, -(2**63), 2**64 - 1, default=None)
    sample = temperature > 0
    return Settings(
        max_new_tokens=max_tokens,
        do_sample=sample,
        temperature=temperature if sample else 1.0,
        top_p=top_p if sample else 1.0,
        seed=seed if sample else None,
    )


def _image_bytes(url: str, allow_local_dir: Path | None, limits: Limits) -> tuple[bytes, str]:
    """(encoded bytes, a name for messages) of a `data:` URL, or a `file://` URL inside the allowed directory."""
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request("an image data URL must look like data:image/png;base64,<base64 bytes>", "invalid_image")
        mime = header[: -len(";base64")].lower()
        if mime not in IMAGE_MIME_TYPES:
            raise bad_request(
                f"unsupported image type {mime[:40]!r}; send one of {', '.join(IMAGE_MIME_TYPES)}",
                "unsupported_image_type",
            )
        if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
            raise APIError(413, f"image larger than {limits.max_image_bytes / 2**20:g} MiB", "image_too_large")
        try:
            return base64.b64decode(payload, validate=True), "data: URL image"
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"the image data URL is not valid base64: {e}", "invalid_image") from None
    if url.startswith("file://"):
        if allow_local_dir is None:
            raise APIError(
                403,
                "file:// images are disabled; send a data: URL, or start the server with --allow-local-dir DIR",
                "local_files_disabled",
            )
        raw = unquote(urlparse(url).path)
        shown = raw if len(raw) <= 200 else raw[:200] + "..."
        if "\x00" in raw:
            raise bad_request("a file:// URL must not contain a NUL byte", "invalid_image")
        if len(raw) > _MAX_PATH_CHARS or any(
            len(part.encode("utf-8", "surrogateescape")) > 255 for part in raw.split("/")
        ):
            raise bad_request("the file:// path is longer than a file system allows", "invalid_image")
        try:
            path = Path(raw).resolve()
            inside = path.is_relative_to(allow_local_dir.resolve())
            if inside:
                size = path.stat().st_size if path.is_file() else None
        except (OSError, ValueError, RuntimeError):  # a symlink loop, an unreadable folder ...
            raise bad_request(f"cannot read the image {shown}", "invalid_image") from None
        if not inside:  # say what was refused, not where it points (no resolved path, no symlink target)
            raise APIError(
                403, "the file:// URL points outside the directory allowed by --allow-local-dir", "local_file_forbidden"
            )
        if size is None:
            raise bad_request(f"image not found: {shown}", "image_not_found")
        if size > limits.max_image_bytes:
            raise APIError(413, f"image larger than {limits.max_image_bytes / 2**20:g} MiB", "image_too_large")
        try:
            with open(path, "rb") as f:
                return f.read(limits.max_image_bytes + 1), shown
        except OSError:
            raise bad_request(f"cannot read the image {shown}", "invalid_image") from None
    if url.startswith(("http://", "https://")):
        raise bad_request("this server does not fetch remote URLs; send the image as a data: URL", "unsupported_url")
    raise bad_request(f"unsupported image URL {url[:40]!r}; use a data: URL", "invalid_image")


def open_image(data: bytes, name: str, limits: Limits):
    """A lazily opened PIL image (its header read, nothing decoded) within the per-image budgets."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise APIError(
            413, f"{name} has more pixels than this server accepts ({limits.max_image_pixels})", "image_too_large"
        ) from None
    except Exception as e:  # anything a hostile header makes PIL raise is the client's bad image
        raise bad_request(f"cannot decode {name} as an image: {_reason(e)}", "invalid_image") from None
    w, h = im.size
    err = None
    if w < 1 or h < 1:
        err = bad_request(f"{name} has no pixels ({w}x{h})", "invalid_image")
    elif w * h > limits.max_image_pixels:
        err = APIError(413, f"{name} has {w}x{h} pixels, more than {limits.max_image_pixels}", "image_too_large")
    elif max(w, h) / min(w, h) > limits.max_aspect_ratio:
        err = bad_request(
            f"{name} is {w}x{h} pixels: a side ratio over {limits.max_aspect_ratio:g} cannot be resized for the model",
            "invalid_image",
        )
    if err is not None:
        im.close()
        raise err
    return im


def _reason(e: Exception) -> str:
    """A decoder's complaint, short and without object addresses."""
    return f"{type(e).__name__}: " + re.sub(r" ?<[^>]* at 0x[0-9a-fA-F]+>", "", str(e))[:200]


def load_image(im, name: str):
    """Decode a lazily opened image to RGB; any decoder error is the client's bad image (400)."""
    try:
        with im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # truncated data, zTXt/iTXt text bombs (ValueError), MemoryError ...
        raise bad_request(f"cannot decode {name} as an image: {_reason(e)}", "invalid_image") from None


def decode_image(url: str, allow_local_dir: Path | None, limits: Limits | None = None):
    """An RGB PIL image from a `data:` URL, or a `file://` URL inside the operator-allowed directory."""
    limits = limits or Limits()
    data, name = _image_bytes(url, allow_local_dir, limits)
    return load_image(open_image(data, name, limits), name)


def _check_text(text: str, where: str) -> int:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{where} is not valid Unicode text (a lone surrogate)", "invalid_text", "messages") from None
    return len(text)


def resolve_messages(messages, allow_local_dir: Path | None, limits: Limits | None = None) -> list[dict]:
    """Validate the message list and replace every image_url part by a decoded PIL image part.

    Budgets first, work after: the image count and text length are checked on the parsed JSON, then every
    image's header is read and the request's pixels summed, and only then is any image decoded."""
    limits = limits or Limits()
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "invalid_messages", "messages")
    out, urls, chars = [], [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise bad_request(
                f"messages[{i}] needs a role of system, user or assistant", "invalid_messages", "messages"
            )
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    chars += _check_text(part["text"], f"messages[{i}].content[{j}].text")
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        raise bad_request(f"messages[{i}].content[{j}] image_url needs a url", "invalid_image")
                    if not url.isascii():
                        _check_text(url, f"messages[{i}].content[{j}].image_url")
                    parts.append({"type": "image", "image": len(urls)})
                    urls.append(url)
                else:
                    raise bad_request(
                        f"messages[{i}].content[{j}]: unsupported part type {str(kind)[:40]!r}; use text or image_url",
                        "invalid_messages",
                        "messages",
                    )
            content = parts
        elif isinstance(content, str):
            chars += _check_text(content, f"messages[{i}].content")
        else:
            raise bad_request(
                f"messages[{i}].content must be a string or a list of parts", "invalid_messages", "messages"
            )
        out.append({"role": m["role"], "content": content})
    if len(urls) > limits.max_images:
        raise bad_request(
            f"{len(urls)} images in one request; this server accepts at most {limits.max_images}",
            "too_many_images",
            "messages",
        )
    if chars > (limits.max_text_chars or 1_000_000):
        raise APIError(
            413,
            f"the messages hold {chars} characters of text; this server accepts at most "
            f"{limits.max_text_chars} per request",
            "text_too_long",
            "messages",
        )
    opened, pixels = [], 0
    try:
        for k, url in enumerate(urls):
            data, name = _image_bytes(url, allow_local_dir, limits)
            name = f"image {k + 1} ({name})"
            im = open_image(data, name, limits)
            opened.append((im, name))
            pixels += im.width * im.height
            if pixels > limits.max_request_pixels:
                raise APIError(
                    413,
                    f"the request's images hold more than {limits.max_request_pixels} pixels "
                    "together; send fewer or smaller images",
                    "image_too_large",
                    "messages",
                )
        images = [load_image(im, name) for im, name in opened]
    finally:
        for im, _ in opened:
            im.close()
    for m in out:
        if isinstance(m["content"], list):
            m["content"] = [
                {"type": "image", "image": images[p["image"]]} if p["type"] == "image" else p for p in m["content"]
            ]
    return out


def check_prompt(prompt: str, n_tokens: int, n_images: int, max_new_tokens: int, context: int | None) -> None:
    """Marker/image agreement and context length (`n_tokens`: the prompt's length in tokens)."""
    markers = prompt.count(IMAGE_TOKEN)
    if markers != n_images:
        raise bad_request(
            f"the conversation has {markers} {IMAGE_TOKEN} marker(s) but {n_images} image(s); "
            f"do not write {IMAGE_TOKEN} in text, each image part adds its own",
            "image_count_mismatch",
        )
    n = n_tokens
    if context is not None and n + max_new_tokens > context:
        raise bad_request(
            f"the prompt has {n} tokens and max_tokens is {max_new_tokens}, more than the model's "
            f"context of {context} tokens; shorten the conversation or max_tokens",
            "context_length_exceeded",
            "messages",
        )


def completion_body(req: ChatRequest, model_name: str, text: str, completion_tokens: int) -> dict:
    finish = "length" if completion_tokens >= req.settings.max_new_tokens else "stop"
    return {
        "id": req.id,
        "object": "chat.completion",
        "created": req.created,
        "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": req.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": req.prompt_tokens + completion_tokens,
        },
    }


def chunk_body(req: ChatRequest, model_name: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": req.id,
        "object": "chat.completion.chunk",
        "created": req.created,
        "model": model_name,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
