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
VIDEO_MIME_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska", "video/x-msvideo")
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "m4a", "webm")
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
    max_videos: int = 4  # video parts (video_url) in one request
    max_video_bytes: int = 50 * 1024 * 1024  # one encoded video
    max_audios: int = 8  # audio parts (input_audio) in one request
    max_audio_bytes: int = 25 * 1024 * 1024  # one encoded clip (OpenAI's own upload limit)
    max_audio_seconds: float = 600.0  # one clip, from its header (the model's encoder may accept less)
    body_timeout: float = 60.0  # seconds for the whole body to arrive

    def __post_init__(self):
        for name in (
            "max_body_bytes",
            "max_images",
            "max_image_bytes",
            "max_image_pixels",
            "max_request_pixels",
            "max_text_chars",
            "max_videos",
            "max_video_bytes",
            "max_audios",
            "max_audio_bytes",
        ):
            if name == "max_text_chars" and self.max_text_chars is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.max_aspect_ratio >= 1:
            raise ValueError(f"Limits.max_aspect_ratio must be at least 1, got {self.max_aspect_ratio!r}")
        if not self.body_timeout > 0:
            raise ValueError(f"Limits.body_timeout must be positive, got {self.body_timeout!r}")
        if not self.max_audio_seconds > 0:
            raise ValueError(f"Limits.max_audio_seconds must be positive, got {self.max_audio_seconds!r}")

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
    """(encoded bytes, a name for messages) of an image `data:` URL, or a `file://` URL inside the allowed directory."""
    return _url_bytes(url, allow_local_dir, limits.max_image_bytes, "image", IMAGE_MIME_TYPES)


def _url_bytes(
    url: str, allow_local_dir: Path | None, max_bytes: int, kind: str, mime_types: tuple[str, ...]
) -> tuple[bytes, str]:
    """(encoded bytes, a name for messages) of a `data:` URL of one of `mime_types`, or a `file://` URL inside the
    allowed directory; at most `max_bytes`. Errors name the `kind` ("image", "video")."""
    example = {"image": "image/png", "video": "video/mp4"}.get(kind, mime_types[0])
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request(
                f"a {kind} data URL must look like data:{example};base64,<base64 bytes>", f"invalid_{kind}"
            )
        mime = header[: -len(";base64")].lower()
        if mime not in mime_types:
            raise bad_request(
                f"unsupported {kind} type {mime[:40]!r}; send one of {', '.join(mime_types)}",
                f"unsupported_{kind}_type",
            )
        if len(payload) > max_bytes * 4 // 3 + 4:
            raise APIError(413, f"{kind} larger than {max_bytes / 2**20:g} MiB", f"{kind}_too_large")
        try:
            return base64.b64decode(payload, validate=True), f"data: URL {kind}"
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"the {kind} data URL is not valid base64: {e}", f"invalid_{kind}") from None
    if url.startswith("file://"):
        if allow_local_dir is None:
            raise APIError(
                403,
                f"file:// {kind}s are disabled; send a data: URL, or start the server with --allow-local-dir DIR",
                "local_files_disabled",
            )
        raw = unquote(urlparse(url).path)
        shown = raw if len(raw) <= 200 else raw[:200] + "..."
        if "\x00" in raw:
            raise bad_request("a file:// URL must not contain a NUL byte", f"invalid_{kind}")
        if len(raw) > _MAX_PATH_CHARS or any(
            len(part.encode("utf-8", "surrogateescape")) > 255 for part in raw.split("/")
        ):
            raise bad_request("the file:// path is longer than a file system allows", f"invalid_{kind}")
        try:
            path = Path(raw).resolve()
            inside = path.is_relative_to(allow_local_dir.resolve())
            if inside:
                size = path.stat().st_size if path.is_file() else None
        except (OSError, ValueError, RuntimeError):  # a symlink loop, an unreadable folder ...
            raise bad_request(f"cannot read the {kind} {shown}", f"invalid_{kind}") from None
        if not inside:  # say what was refused, not where it points (no resolved path, no symlink target)
            raise APIError(
                403, "the file:// URL points outside the directory allowed by --allow-local-dir", "local_file_forbidden"
            )
        if size is None:
            raise bad_request(f"{kind} not found: {shown}", f"{kind}_not_found")
        if size > max_bytes:
            raise APIError(413, f"{kind} larger than {max_bytes / 2**20:g} MiB", f"{kind}_too_large")
        try:
            with open(path, "rb") as f:
                return f.read(max_bytes + 1), shown
        except OSError:
            raise bad_request(f"cannot read the {kind} {shown}", f"invalid_{kind}") from None
    if url.startswith(("http://", "https://")):
        raise bad_request(f"this server does not fetch remote URLs; send the {kind} as a data: URL", "unsupported_url")
    raise bad_request(f"unsupported {kind} URL {url[:40]!r}; use a data: URL", f"invalid_{kind}")


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


def resolve_messages(
    messages,
    allow_local_dir: Path | None,
    limits: Limits | None = None,
    video_frames: int = 8,
    audio_rate: int = 16_000,
) -> list[dict]:
    """Validate the message list and replace every image_url part by a decoded PIL image part, every video_url
    part by a `Video` of `video_frames` sampled frames, every input_audio part by an `Audio` at `audio_rate`.

    Budgets first, work after: the media counts and text length are checked on the parsed JSON, then every
    image's header is read and the request's pixels summed, and only then is any image decoded; videos and
    audio are refused from their sizes and headers (frame pixels, duration) before they are decoded."""
    limits = limits or Limits()
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "invalid_messages", "messages")
    out, urls, chars = [], [], 0
    video_urls: list[str] = []
    audio_parts: list[dict] = []
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
                elif kind == "video_url":
                    vu = part.get("video_url")
                    url = vu.get("url") if isinstance(vu, dict) else vu
                    if not isinstance(url, str) or not url.isascii():
                        raise bad_request(f"messages[{i}].content[{j}] video_url needs an ASCII url", "invalid_video")
                    parts.append({"type": "video", "video": len(video_urls)})
                    video_urls.append(url)
                elif kind == "input_audio":
                    ia = part.get("input_audio")
                    if not isinstance(ia, dict) or not isinstance(ia.get("data"), str):
                        raise bad_request(
                            f'messages[{i}].content[{j}] input_audio needs {{"data": <base64>, "format": "wav"}}',
                            "invalid_audio",
                        )
                    if ia.get("format") not in AUDIO_FORMATS:
                        raise bad_request(
                            f"messages[{i}].content[{j}]: unsupported audio format {str(ia.get('format'))[:20]!r}; "
                            f"use one of {', '.join(AUDIO_FORMATS)}",
                            "unsupported_audio_type",
                        )
                    parts.append({"type": "audio", "audio": len(audio_parts)})
                    audio_parts.append(ia)
                else:
                    raise bad_request(
                        f"messages[{i}].content[{j}]: unsupported part type {str(kind)[:40]!r}; use text, "
                        "image_url, video_url or input_audio",
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
    for n, most, what in (
        (len(urls), limits.max_images, "images"),
        (len(video_urls), limits.max_videos, "videos"),
        (len(audio_parts), limits.max_audios, "audio clips"),
    ):
        if n > most:
            code = "too_many_" + {"audio clips": "audios"}.get(what, what)
            raise bad_request(f"{n} {what} in one request; this server accepts at most {most}", code, "messages")
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
    decoded = {
        "image": images,
        "video": [_decode_video(u, k, allow_local_dir, limits, video_frames) for k, u in enumerate(video_urls)],
        "audio": [_decode_audio(a, k, limits, audio_rate) for k, a in enumerate(audio_parts)],
    }
    for m in out:
        if isinstance(m["content"], list):
            m["content"] = [
                {"type": p["type"], p["type"]: decoded[p["type"]][p[p["type"]]]} if p["type"] in decoded else p
                for p in m["content"]
            ]
    return out


def _decode_video(url: str, k: int, allow_local_dir: Path | None, limits: Limits, frames: int):
    """A `Video` of `frames` frames sampled as the training loader samples them (frame size from the header)."""
    from lmm.data.errors import BadSample
    from lmm.data.video import sample_frames
    from lmm.inputs import Video

    data, name = _url_bytes(url, allow_local_dir, limits.max_video_bytes, "video", VIDEO_MIME_TYPES)
    try:
        return Video(sample_frames(data, frames, max_pixels=limits.max_image_pixels))
    except BadSample as e:
        status, code = (413, "video_too_large") if e.reason == "image_too_large" else (400, "invalid_video")
        raise APIError(status, f"video {k + 1} ({name}): {e}", code, "messages") from None


def _decode_audio(part: dict, k: int, limits: Limits, rate: int):
    """An `Audio` waveform at `rate` from an input_audio part (duration from the header, before decoding)."""
    from lmm.data.audio import decode_audio
    from lmm.data.errors import BadSample
    from lmm.inputs import Audio

    payload = part["data"]
    if len(payload) > limits.max_audio_bytes * 4 // 3 + 4:
        raise APIError(
            413, f"audio clip {k + 1} is larger than {limits.max_audio_bytes / 2**20:g} MiB", "audio_too_large"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"audio clip {k + 1}: input_audio data is not valid base64: {e}", "invalid_audio") from None
    try:
        return Audio(decode_audio(data, sampling_rate=rate, max_seconds=limits.max_audio_seconds), rate)
    except BadSample as e:
        status, code = (413, "audio_too_long") if e.reason == "audio_too_long" else (400, "invalid_audio")
        raise APIError(status, f"audio clip {k + 1}: {e}", code, "messages") from None


def check_prompt(prompt: str, n_tokens: int, media: list, max_new_tokens: int, context: int | None) -> None:
    """Marker/media agreement (`media`: what render_chat returned) and context length (`n_tokens`: the prompt's
    length in tokens)."""
    from lmm.chat import AUDIO_MARKER
    from lmm.inputs import VIDEO_MARKER, Audio, Video

    kinds = [Video if isinstance(m, Video) else Audio if isinstance(m, Audio) else None for m in media]
    for marker, kind, what in (
        (IMAGE_TOKEN, None, "image"),
        (VIDEO_MARKER, Video, "video"),
        (AUDIO_MARKER, Audio, "audio"),
    ):
        markers, given = prompt.count(marker), kinds.count(kind)
        if markers != given:
            raise bad_request(
                f"the conversation has {markers} {marker} marker(s) but {given} {what} part(s); "
                f"do not write {marker} in text, each {what} part adds its own",
                f"{what}_count_mismatch",
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
