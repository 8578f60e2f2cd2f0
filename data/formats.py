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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lmm.tokens import IMAGE_TOKEN

from .errors import BadSample
from .video import VIDEO_EXTENSIONS

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image", "img")
TEXT_KEYS = ("txt", "caption", "text")
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "model": "assistant", "bot": "assistant", "system": "system"}


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
    parts: list[Union[str, MediaRef]] = field(default_factory=list)
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
    return str(value)


def normalize_record(record: dict) -> dict:
    """Webdataset samples hold bytes per extension: decode `json` (merged in) and text fields."""
    out = dict(record)
    if isinstance(out.get("json"), (bytes, bytearray, str)):
        try:
            meta = json.loads(out["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise BadSample("bad_record", f"json does not parse: {e}") from None
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


def _first(record: dict, keys, override: Optional[str] = None):
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
        raise BadSample("missing_image" if media_kind == "image" else "missing_video", "record has no "
                        f"{'/'.join(media_keys)} field", key)
    text = _text(_first(record, TEXT_KEYS + ("name",), text_key)).strip()
    if not text:
        raise BadSample("empty_text", "empty caption", key)
    return Sample(key=key, kind="document", parts=[MediaRef(media, media_kind), text])


def parse_mmc4(record: dict, key: str, min_similarity: float = 0.0) -> Sample:
    texts = record.get("text_list") or []
    at: dict[int, list[MediaRef]] = {}
    for info in record.get("image_info") or []:
        if not isinstance(info, dict):
            raise BadSample("bad_record", "image_info entries must be objects", key)
        if info.get("matched_sim") is not None and float(info["matched_sim"]) < min_similarity:
            continue
        idx = int(info.get("matched_text_index", 0))
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
    texts, images = record.get("texts") or [], record.get("images") or []
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
    field_images = record.get(image_key) if image_key else (
        record.get("images") if record.get("images") is not None else record.get("image"))
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


def parse_record(record: dict, fmt: str = "auto", key: str = "", image_key=None, text_key=None,
                 min_similarity: float = 0.0) -> Sample:
    """Any supported record -> Sample (BadSample on anything unusable)."""
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
