"""OpenAI chat-completions wire format: request body -> validated conversation + generation settings,
answers -> response / stream-chunk bodies, and the OpenAI-style error body."""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from lmm.tokens import IMAGE_TOKEN

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/tiff")


class APIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error"):
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
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}

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


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", "invalid_json")
    return body


def _number(body: dict, name: str, kind, lo=None, hi=None, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise bad_request(f"'{name}' must be a {'number' if kind is float else 'integer'}, got {value!r}",
                          "invalid_value", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_request(f"'{name}' must be between {lo} and {hi}, got {value}", "invalid_value", name)
    return kind(value)


def parse_settings(body: dict, default_max_tokens: int) -> Settings:
    """OpenAI sampling fields -> Settings. temperature omitted or 0 means greedy decoding."""
    for name in ("tools", "functions", "logprobs", "response_format"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server", "unsupported_parameter", name)
    if body.get("stop"):
        raise bad_request("'stop' sequences are not supported; the answer ends at the model's end of turn",
                          "unsupported_parameter", "stop")
    if _number(body, "n", int, default=1) != 1:
        raise bad_request("only n=1 is supported; send several requests for several answers", "invalid_value", "n")
    max_tokens = _number(body, "max_completion_tokens", int, 1, 4096,
                         _number(body, "max_tokens", int, 1, 4096, default_max_tokens))
    temperature = _number(body, "temperature", float, 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", float, 0.0, 1.0, 1.0)
    seed = _number(body, "seed", int, default=None)
    sample = temperature > 0
    return Settings(max_new_tokens=max_tokens, do_sample=sample, temperature=temperature if sample else 1.0,
                    top_p=top_p if sample else 1.0, seed=seed if sample else None)


def decode_image(url: str, allow_local_dir: Path | None):
    """A PIL image from a `data:` URL, or a `file://` URL inside the operator-allowed directory."""
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request("an image data URL must look like data:image/png;base64,<base64 bytes>", "invalid_image")
        mime = header[: -len(";base64")].lower()
        if mime not in IMAGE_MIME_TYPES:
            raise bad_request(f"unsupported image type {mime!r}; send one of {', '.join(IMAGE_MIME_TYPES)}",
                              "unsupported_image_type")
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise APIError(413, f"image larger than {MAX_IMAGE_BYTES // 2**20} MiB", "image_too_large")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad_request(f"the image data URL is not valid base64: {e}", "invalid_image") from None
        source = io.BytesIO(data)
        name = "data: URL image"
    elif url.startswith("file://"):
        if allow_local_dir is None:
            raise APIError(403, "file:// images are disabled; send a data: URL, or start the server with "
                                "--allow-local-dir DIR", "local_files_disabled")
        path = Path(unquote(urlparse(url).path)).resolve()
        root = allow_local_dir.resolve()
        if not path.is_relative_to(root):
            raise APIError(403, f"{path} is outside the allowed directory {root}", "local_file_forbidden")
        if not path.is_file():
            raise bad_request(f"image not found: {path}", "image_not_found")
        source, name = path, str(path)
    elif url.startswith(("http://", "https://")):
        raise bad_request("this server does not fetch remote URLs; send the image as a data: URL", "unsupported_url")
    else:
        raise bad_request(f"unsupported image URL {url[:40]!r}; use a data: URL", "invalid_image")
    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise bad_request(f"{name} has {im.width}x{im.height} pixels, more than {MAX_IMAGE_PIXELS}",
                                  "image_too_large")
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise bad_request(f"cannot decode {name} as an image: {e}", "invalid_image") from None


def resolve_messages(messages, allow_local_dir: Path | None) -> list[dict]:
    """Validate the message list and replace every image_url part by a decoded PIL image part."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "invalid_messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}] needs a role of system, user or assistant", "invalid_messages",
                              "messages")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    iu = part.get("image_url")
                    url = iu.get("url") if isinstance(iu, dict) else iu
                    if not isinstance(url, str):
                        raise bad_request(f"messages[{i}].content[{j}] image_url needs a url", "invalid_image")
                    parts.append({"type": "image", "image": decode_image(url, allow_local_dir)})
                else:
                    raise bad_request(f"messages[{i}].content[{j}]: unsupported part type {kind!r}; use text or "
                                      f"image_url", "invalid_messages", "messages")
            content = parts
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of parts", "invalid_messages",
                              "messages")
        out.append({"role": m["role"], "content": content})
    return out


def check_prompt(prompt: str, n_tokens: int, n_images: int, max_new_tokens: int, context: int | None) -> None:
    """Marker/image agreement and context length (`n_tokens`: the prompt's length in tokens)."""
    markers = prompt.count(IMAGE_TOKEN)
    if markers != n_images:
        raise bad_request(f"the conversation has {markers} {IMAGE_TOKEN} marker(s) but {n_images} image(s); "
                          f"do not write {IMAGE_TOKEN} in text, each image part adds its own", "image_count_mismatch")
    n = n_tokens
    if context is not None and n + max_new_tokens > context:
        raise bad_request(f"the prompt has {n} tokens and max_tokens is {max_new_tokens}, more than the model's "
                          f"context of {context} tokens; shorten the conversation or max_tokens",
                          "context_length_exceeded", "messages")


def completion_body(req: ChatRequest, model_name: str, text: str, completion_tokens: int) -> dict:
    finish = "length" if completion_tokens >= req.settings.max_new_tokens else "stop"
    return {"id": req.id, "object": "chat.completion", "created": req.created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": req.prompt_tokens + completion_tokens}}


def chunk_body(req: ChatRequest, model_name: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": req.id, "object": "chat.completion.chunk", "created": req.created, "model": model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
