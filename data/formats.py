"""On-disk record layouts -> `Sample`: the one in-memory shape every later stage works on.

Supported layouts (`detect_format` picks one when the config says `auto`):
  pair          LAION/CC: an image (jpg/png/webp/image column) + a caption (txt, or json/column `caption`/`text`)
  mmc4          MMC4: `text_list` + `image_info` [{image_name|image_base64|bytes, matched_text_index, matched_sim}]
  obelics       OBELICS: parallel `texts` / `images` lists, exactly one of them non-None at each position
  video         WebVid-like: a video (mp4/webm/... bytes or path) + a caption
  conversation  LLaVA: `image` or `images` + `conversations` [{from, value}] or `messages` [{role, content}],
                content possibly OpenAI-style parts [{type: text|image|image_url, ...}]

Media stay undecoded here (`MediaRef`); `data.stream` decodes them, so parsing is cheap and a bad
image is counted as such rather than as a bad record.

Records are untrusted: a field of the wrong type (a number where a list belongs, a non-numeric
`matched_sim`, a string where a conversation part belongs), JSON nested too deeply or text that is not valid
Unicode is a BadSample("bad_record") naming the field, never an exception that ends a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lmm.tokens import IMAGE_TOKEN

from .errors import BadSample
from .video import VIDEO_EXTENSIONS

TOO_LARGE_KEY = "__too_large__"  # set by the shard reader: members over LMM_MAX_MEMBER_BYTES, left unread

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image", "img")
TEXT_KEYS = ("txt", "caption", "text")
ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


@dataclass
class MediaRef:
    """An image or a video, not yet decoded: `value` is bytes, a path, an HF dict or a PIL image."""

    value: Any
    kind: str = "image"  # "image" | "video"


@dataclass
class Sample:
    """One training sample before tokenisation.

    kind "document" (interleaved docs, pairs, videos): `parts` is the reading order of text (str)
    and media (MediaRef). kind "conversation": `messages` [{role, content}] whose contents carry one
    `<image>` marker per entry of `media`, in order.
    """

    key: str
    kind: str  # "document" | "conversation"
    parts: list[str | MediaRef] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    media: list[MediaRef] = field(default_factory=list)

    @property
    def media_refs(self) -> list[MediaRef]:
        if self.kind == "document":
            return [p for p in self.parts if isinstance(p, MediaRef)]
        return self.media


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, (dict, list, tuple)):
        raise BadSample("bad_record", f"expected text, got a {type(value).__name__}")
    text = str(value)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadSample("bad_record", "text is not valid Unicode (a lone surrogate)") from None
    return text


def _list(record: dict, name: str, key: str) -> list:
    """A list field (None/missing -> []); anything else is a bad record."""
    value = record.get(name)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise BadSample("bad_record", f"{name!r} must be a list, got a {type(value).__name__}", key)
    return list(value)


def _float(info: dict, name: str, key: str) -> float:
    value = info[name]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadSample("bad_record", f"{name} must be a number, got a {type(value).__name__}", key)
    try:
        return float(value)
    except ValueError:
        raise BadSample("bad_record", f"{name} must be a number, got {str(value)[:40]!r}", key) from None


def _index(info: dict, name: str, key: str) -> int:
    value = info.get(name, 0)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadSample("bad_record", f"{name} must be a whole number, got {str(value)[:40]!r}", key)
    return value


def normalize_record(record: dict) -> dict:
    """Webdataset samples hold bytes per extension: decode `json` (merged in) and text fields."""
    out = dict(record)
    if out.get(TOO_LARGE_KEY):  # members the shard reader refused to read (data.sources.read_tar)
        raise BadSample("member_too_large", f"not read: {', '.join(out[TOO_LARGE_KEY])}")
    if isinstance(out.get("json"), (bytes, bytearray, str)):
        try:
            meta = json.loads(out["json"])
        except RecursionError:
            raise BadSample("bad_record", "json is nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:  # also a number with too many digits
            raise BadSample("bad_record", f"json does not parse: {str(e)[:200]}") from None
        out["json"] = meta
        if isinstance(meta, dict):
            for k, v in meta.items():
                out.setdefault(k, v)
    for k in TEXT_KEYS:
        if isinstance(out.get(k), (bytes, bytearray)):
            out[k] = _text(out[k])
    return out


def detect_format(record: dict) -> str:
    if "conversations" in record or "messages" in record:
        return "conversation"
    if "text_list" in record and "image_info" in record:
        return "mmc4"
    if "texts" in record and "images" in record:
        return "obelics"
    if any(record.get(k) is not None for k in VIDEO_EXTENSIONS + ("video",)):
        return "video"
    return "pair"


def _first(record: dict, keys, override: str | None = None):
    if override:
        return record.get(override)
    for k in keys:
        if record.get(k) is not None:
            return record[k]
    return None


def parse_pair(record: dict, key: str, image_key=None, text_key=None, media_kind: str = "image") -> Sample:
    media_keys = IMAGE_KEYS if media_kind == "image" else VIDEO_EXTENSIONS + ("video",)
    media = _first(record, media_keys, image_key)
    if media is None:
        raise BadSample(
            "missing_image" if media_kind == "image" else "missing_video",
            f"record has no {'/'.join(media_keys)} field",
            key,
        )
    text = _text(_first(record, TEXT_KEYS + ("name",), text_key)).strip()
    if not text:
        raise BadSample("empty_text", "empty caption", key)
    return Sample(key=key, kind="document", parts=[MediaRef(media, media_kind), text])


def parse_mmc4(record: dict, key: str, min_similarity: float = 0.0) -> Sample:
    texts = _list(record, "text_list", key)
    at: dict[int, list[MediaRef]] = {}
    for info in _list(record, "image_info", key):
        if not isinstance(info, dict):
            raise BadSample("bad_record", "image_info entries must be objects", key)
        if info.get("matched_sim") is not None and _float(info, "matched_sim", key) < min_similarity:
            continue
        idx = _index(info, "matched_text_index", key)
        # the image itself: an `image` field, else the info dict (bytes / image_base64 / image_name)
        at.setdefault(idx, []).append(MediaRef(info["image"] if info.get("image") is not None else info))
    parts: list = []
    for i, t in enumerate(texts):
        parts += at.pop(i, [])
        if _text(t).strip():
            parts.append(_text(t))
    for i in sorted(at):  # indices past the end: images after the last sentence
        parts += at[i]
    return _document(parts, key)


def parse_obelics(record: dict, key: str) -> Sample:
    texts, images = _list(record, "texts", key), _list(record, "images", key)
    if len(texts) != len(images):
        raise BadSample("bad_record", f"texts ({len(texts)}) and images ({len(images)}) differ in length", key)
    parts: list = []
    for t, im in zip(texts, images):
        if im is not None:
            parts.append(MediaRef(im))
        elif t is not None and _text(t).strip():
            parts.append(_text(t))
    return _document(parts, key)


def _document(parts: list, key: str) -> Sample:
    if not any(isinstance(p, str) and p.strip() for p in parts):
        raise BadSample("empty_text", "document has no text", key)
    if not any(isinstance(p, MediaRef) for p in parts):
        raise BadSample("no_images", "document has no (matching) images", key)
    return Sample(key=key, kind="document", parts=parts)


def parse_conversation(record: dict, key: str, image_key=None) -> Sample:
    turns = record.get("conversations") if record.get("conversations") is not None else record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_record", "no conversation turns", key)
    images: list = []
    field_images = (
        record.get(image_key)
        if image_key
        else (record.get("images") if record.get("images") is not None else record.get("image"))
    )
    if field_images is None:  # webdataset: the image travels as its own member (jpg/png/...)
        field_images = _first(record, IMAGE_KEYS[:4])
    if field_images is not None:
        images = list(field_images) if isinstance(field_images, (list, tuple)) else [field_images]
    messages, part_images = [], []
    for t in turns:
        if not isinstance(t, dict):
            raise BadSample("bad_record", "a turn is not an object", key)
        role = ROLE_NAMES.get(str(t.get("from", t.get("role", ""))).lower())
        if role is None:
            raise BadSample("bad_record", f"unknown speaker {t.get('from', t.get('role'))!r}", key)
        content = t.get("value", t.get("content"))
        if isinstance(content, list):  # OpenAI-style parts
            pieces = []
            for p in content:
                if not isinstance(p, dict):
                    raise BadSample(
                        "bad_record", f"a conversation part is a {type(p).__name__}, not an object with a 'type'", key
                    )
                if p.get("type") == "text":
                    pieces.append(_text(p.get("text")))
                elif p.get("type") in ("image", "image_url"):
                    pieces.append(IMAGE_TOKEN)
                    ref = p.get("image") or p.get("image_url")
                    if isinstance(ref, dict):
                        ref = ref.get("url", ref)
                    if ref is not None:
                        part_images.append(ref)
            content = "".join(pieces)
        elif content is not None and not isinstance(content, (str, bytes, int, float)):  # "value": 3 is text
            raise BadSample("bad_record", f"a turn's content is a {type(content).__name__}, not text or parts", key)
        messages.append({"role": role, "content": _text(content)})
    images = images or part_images
    n_markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if n_markers > len(images):
        raise BadSample("image_count_mismatch", f"{n_markers} <image> markers but {len(images)} images", key)
    if n_markers < len(images):  # LLaVA data without markers: images go first in the first user turn
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample("bad_record", "images but no user turn to put them in", key)
        first_user["content"] = IMAGE_TOKEN * (len(images) - n_markers) + "\n" + first_user["content"]
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadSample("empty_text", "no assistant answer", key)
    return Sample(key=key, kind="conversation", messages=messages, media=[MediaRef(v) for v in images])


def parse_record(
    record: dict, fmt: str = "auto", key: str = "", image_key=None, text_key=None, min_similarity: float = 0.0
) -> Sample:
    """Any supported record -> Sample (BadSample on anything unusable, never another exception for a
    record's content: a record of the wrong shape is a counted bad_record, not the end of a run)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    try:
        return _parse(record, fmt, key, image_key, text_key, min_similarity)
    except BadSample as e:
        if not e.key:
            e.key = key
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError, UnicodeError) as e:
        raise BadSample("bad_record", f"{type(e).__name__}: {str(e)[:200]}", key) from None


FORMATS = ("auto", "pair", "video", "mmc4", "obelics", "conversation")


def _parse(record, fmt, key, image_key, text_key, min_similarity) -> Sample:
    if not isinstance(record, dict):
        raise BadSample("bad_record", f"a record must be an object, got a {type(record).__name__}", key)
    record = normalize_record(record)
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "pair":
        return parse_pair(record, key, image_key, text_key)
    if fmt == "video":
        return parse_pair(record, key, image_key, text_key, media_kind="video")
    if fmt == "mmc4":
        return parse_mmc4(record, key, min_similarity)
    if fmt == "obelics":
        return parse_obelics(record, key)
    if fmt == "conversation":
        return parse_conversation(record, key, image_key)
    raise ValueError(f"unknown data format {fmt!r}")
