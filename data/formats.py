"""On-disk record layouts -> `Sample`: the one in-memory shape every later stage works on.

Supported layouts (`detect_format` picks one when the config says `auto`):
  pair          LAION/CC: an image (jpg/png/webp/image column) + a caption (txt, or json/column `caption`/`text`)
  mmc4          MMC4: `text_list` + `image_info` [{image_name|image_base64|bytes, matched_text_index, matched_sim}]
  obelics       OBELICS: parallel `texts` / `images` lists, exactly one of them non-None at each position
  video         WebVid-like: a video (mp4/webm/... bytes or path) + a caption
  audio         audio-text pairs: an audio (wav/flac/mp3/ogg/m4a/opus bytes, a path, an HF `Audio` column) + a caption
  conversation  LLaVA: `image` or `images` + `conversations` [{from, value}] or `messages` [{role, content}],
                content possibly OpenAI-style parts [{type: text|image|image_url|video|video_url|audio|input_audio}];
                also `video`/`videos` and `audio`/`audios` fields, placed by `<video>` / `<audio>` markers
  (OBELICS documents may carry a parallel `audios` list beside `texts` / `images`.)

Media stay undecoded here (`MediaRef`); `data.stream` decodes them, so parsing is cheap and a bad
image is counted as such rather than as a bad record.

Records are untrusted: a field of the wrong type (a number where a list belongs, a non-numeric
`matched_sim`, a string where a conversation part belongs), JSON nested too deeply or text that is not valid
Unicode is a BadSample("bad_record") naming the field, never an exception that ends a run.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from lmm.tokens import IMAGE_TOKEN

from .audio import AUDIO_EXTENSIONS as _AUDIO_FILES
from .errors import BadSample
from .video import VIDEO_EXTENSIONS

AUDIO_EXTENSIONS = tuple(e for e in _AUDIO_FILES if e not in VIDEO_EXTENSIONS)  # a .webm is taken for a video

AUDIO_TOKEN = "<audio>"
VIDEO_MARKER = "<video>"  # conversation text only: a video is placed by `<image>` (frames through the image tower)
# the marker token a media kind is placed by in the model's input (the model's encoder tokens)
MEDIA_MARKERS = {"image": IMAGE_TOKEN, "video": IMAGE_TOKEN, "audio": AUDIO_TOKEN}
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
    """An image, a video or an audio clip, not yet decoded: `value` is bytes, a path, an HF dict, a PIL image (or
    for audio a waveform array)."""

    value: Any
    kind: str = "image"  # "image" | "video" | "audio"

    @property
    def marker(self) -> str:
        """The token that places this item in the model's input (`<image>` for images and videos)."""
        return MEDIA_MARKERS[self.kind]


@dataclass
class Sample:
    """One training sample before tokenisation.

    kind "document" (interleaved docs, pairs, videos): `parts` is the reading order of text (str)
    and media (MediaRef). kind "conversation": `messages` [{role, content}] whose contents carry one
    marker (`<image>` for an image or video, `<audio>` for audio) per entry of `media`, in text order.
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
    if "texts" in record and "audios" in record:
        return "obelics"
    if any(record.get(k) is not None for k in VIDEO_EXTENSIONS + ("video",)):
        return "video"
    if any(record.get(k) is not None for k in AUDIO_EXTENSIONS + ("audio",)):
        return "audio"
    return "pair"


def _first(record: dict, keys, override: str | None = None):
    if override:
        return record.get(override)
    for k in keys:
        if record.get(k) is not None:
            return record[k]
    return None


PAIR_MEDIA_KEYS = {"image": IMAGE_KEYS, "video": VIDEO_EXTENSIONS + ("video",), "audio": AUDIO_EXTENSIONS + ("audio",)}
# audio datasets name their text column after what it holds (Common Voice `sentence`, LibriSpeech `text` ...)
AUDIO_TEXT_KEYS = ("sentence", "transcription", "transcript", "captions")


def parse_pair(record: dict, key: str, image_key=None, text_key=None, media_kind: str = "image") -> Sample:
    media_keys = PAIR_MEDIA_KEYS[media_kind]
    media = _first(record, media_keys, image_key)
    if media is None:
        raise BadSample(f"missing_{media_kind}", f"record has no {'/'.join(media_keys)} field", key)
    text_keys = TEXT_KEYS + ("name",) + (AUDIO_TEXT_KEYS if media_kind == "audio" else ())
    text = _first(record, text_keys, text_key)
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        text = text[0]  # Clotho / AudioCaps-style lists of reference captions: the first one
    text = _text(text).strip()
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
    """Parallel `texts` / `images` (and optionally `audios`) lists: at each position one of them is set."""
    texts, images, audios = (_list(record, n, key) for n in ("texts", "images", "audios"))
    images = images or [None] * len(texts)
    audios = audios or [None] * len(texts)
    if not len(texts) == len(images) == len(audios):
        raise BadSample(
            "bad_record",
            f"texts ({len(texts)}), images ({len(images)}) and audios ({len(audios)}) differ in length",
            key,
        )
    parts: list = []
    for t, im, au in zip(texts, images, audios):
        if im is not None:
            parts.append(MediaRef(im))
        elif au is not None:
            parts.append(MediaRef(au, "audio"))
        elif t is not None and _text(t).strip():
            parts.append(_text(t))
    return _document(parts, key)


def _document(parts: list, key: str) -> Sample:
    if not any(isinstance(p, str) and p.strip() for p in parts):
        raise BadSample("empty_text", "document has no text", key)
    if not any(isinstance(p, MediaRef) for p in parts):
        raise BadSample("no_images", "document has no (matching) images", key)
    return Sample(key=key, kind="document", parts=parts)


# conversation fields per media kind (first present wins), and the marker each kind answers to in the text
CONVERSATION_FIELDS = {"image": ("images", "image"), "video": ("videos", "video"), "audio": ("audios", "audio")}
TEXT_MARKERS = {"image": IMAGE_TOKEN, "video": VIDEO_MARKER, "audio": AUDIO_TOKEN}
_MEMBER_KEYS = {"image": IMAGE_KEYS[:4], "video": VIDEO_EXTENSIONS, "audio": AUDIO_EXTENSIONS}  # webdataset members
_MARKER_RE = re.compile("|".join(re.escape(m) for m in TEXT_MARKERS.values()))
_KIND_OF_MARKER = {m: k for k, m in TEXT_MARKERS.items()}


def _field_media(record: dict, kind: str, image_key=None) -> list:
    """The media of one kind a conversation record names in its own fields (or webdataset members)."""
    if kind == "image" and image_key:
        value = record.get(image_key)
    else:
        value = next((record[f] for f in CONVERSATION_FIELDS[kind] if record.get(f) is not None), None)
    if value is None:  # webdataset: the media travel as their own members (jpg/mp4/wav ...)
        value = _first(record, _MEMBER_KEYS[kind])
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _part_media(p: dict, key: str):
    """(kind, media reference or None) of one OpenAI-style content part that is not text."""
    kind = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}.get(p.get("type"))
    if kind is not None:
        ref = p.get(kind) or p.get(f"{kind}_url")
        if isinstance(ref, dict):
            ref = ref.get("url", ref)
        return kind, ref
    if p.get("type") == "audio":
        return "audio", p.get("audio")
    if p.get("type") == "input_audio":  # OpenAI: {"input_audio": {"data": <base64>, "format": "wav"}}
        data = (p.get("input_audio") or {}).get("data")
        if data is None:
            return "audio", None
        try:
            return "audio", base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError, TypeError) as e:
            raise BadSample("corrupt_audio", f"input_audio data is not valid base64: {e}", key) from None
    return None, None  # another part type (e.g. "refusal"): no text, no media


def parse_conversation(record: dict, key: str, image_key=None) -> Sample:
    turns = record.get("conversations") if record.get("conversations") is not None else record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_record", "no conversation turns", key)
    fields = {kind: _field_media(record, kind, image_key) for kind in CONVERSATION_FIELDS}
    parts_media: dict[str, list] = {kind: [] for kind in CONVERSATION_FIELDS}
    messages = []
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
                    continue
                kind, ref = _part_media(p, key)
                if kind is None:
                    continue
                pieces.append(TEXT_MARKERS[kind])
                if ref is not None:
                    parts_media[kind].append(ref)
            content = "".join(pieces)
        elif content is not None and not isinstance(content, (str, bytes, int, float)):  # "value": 3 is text
            raise BadSample("bad_record", f"a turn's content is a {type(content).__name__}, not text or parts", key)
        messages.append({"role": role, "content": _text(content)})
    media = {kind: fields[kind] or parts_media[kind] for kind in CONVERSATION_FIELDS}
    return Sample(key=key, kind="conversation", messages=messages, media=_place_media(messages, media, key))


def _place_media(messages: list[dict], media: dict[str, list], key: str) -> list[MediaRef]:
    """Match each kind's items to its markers in the text (adding markers for unmarked items, LLaVA-style, at
    the start of the first user turn) and return them in text order; `<video>` becomes `<image>` (a video's
    frames go through the image tower)."""

    def count(kind):
        return sum(m["content"].count(TEXT_MARKERS[kind]) for m in messages)

    if media["video"] and not media["image"] and not count("video"):  # lmm's own convention: <image> for a video
        for m in messages:
            m["content"] = m["content"].replace(IMAGE_TOKEN, VIDEO_MARKER)
    missing = ""
    for kind, items in media.items():
        n = count(kind) if kind != "video" or items else 0  # without videos, "<video>" is plain text
        if n > len(items):
            reason = "audio_count_mismatch" if kind == "audio" else "image_count_mismatch"
            raise BadSample(reason, f"{n} {TEXT_MARKERS[kind]} markers but {len(items)} {kind}s", key)
        missing += TEXT_MARKERS[kind] * (len(items) - n)
    if missing:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample("bad_record", "media but no user turn to put them in", key)
        first_user["content"] = missing + "\n" + first_user["content"]
    queues = {kind: iter(items) for kind, items in media.items()}
    placed = []
    for m in messages:
        for marker in _MARKER_RE.findall(m["content"]):
            kind = _KIND_OF_MARKER[marker]
            if kind == "video" and not media["video"]:
                continue
            placed.append(MediaRef(next(queues[kind]), kind))
        if media["video"]:
            m["content"] = m["content"].replace(VIDEO_MARKER, IMAGE_TOKEN)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadSample("empty_text", "no assistant answer", key)
    return placed


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


FORMATS = ("auto", "pair", "video", "audio", "mmc4", "obelics", "conversation")


def _parse(record, fmt, key, image_key, text_key, min_similarity) -> Sample:
    if not isinstance(record, dict):
        raise BadSample("bad_record", f"a record must be an object, got a {type(record).__name__}", key)
    record = normalize_record(record)
    fmt = detect_format(record) if fmt == "auto" else fmt
    if fmt == "pair":
        return parse_pair(record, key, image_key, text_key)
    if fmt == "video":
        return parse_pair(record, key, image_key, text_key, media_kind="video")
    if fmt == "audio":
        return parse_pair(record, key, image_key, text_key, media_kind="audio")
    if fmt == "mmc4":
        return parse_mmc4(record, key, min_similarity)
    if fmt == "obelics":
        return parse_obelics(record, key)
    if fmt == "conversation":
        if text_key:  # the turns in a JSON member of their own (`lmm data label` writes FIELD.json)
            record = {**record, **_json_object(record.get(text_key), text_key, key)}
        return parse_conversation(record, key, image_key)
    raise ValueError(f"unknown data format {fmt!r}")


def _json_object(value, name: str, key: str) -> dict:
    """A JSON object from a member's bytes (or an already parsed dict); BadSample("bad_record") otherwise."""
    if isinstance(value, (bytes, bytearray, str)):
        try:
            value = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise BadSample("bad_record", f"{name} does not parse as JSON: {str(e)[:200]}", key) from None
    if not isinstance(value, dict):
        raise BadSample("bad_record", f"{name} must hold a JSON object, got {type(value).__name__}", key)
    return value
