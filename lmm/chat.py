"""Conversations -> one prompt string with media markers + the list of media, via the tokenizer's chat
template. Used by `LMM.chat`, the terminal chat and the server, so all of them build prompts the same way.
Image parts give `<image>` and the image; video parts `<video>` and a `Video`; audio parts `<audio>` and an
`Audio` (lmm.inputs turns them into model inputs)."""

from __future__ import annotations

import base64
import binascii

from lmm.inputs import VIDEO_MARKER, Audio, Video
from lmm.tokens import IMAGE_TOKEN

AUDIO_MARKER = "<audio>"
MARKERS = (IMAGE_TOKEN, VIDEO_MARKER, AUDIO_MARKER)

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _part_value(part: dict, kind: str):
    value = part.get(kind)
    if isinstance(value, dict) and kind.endswith("_url"):
        value = value.get("url")
    if value is None:
        raise ValueError(f"{kind} part without a value: {str(part)[:200]}")
    return value


def _input_audio(part: dict) -> Audio:
    """OpenAI's `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}` part."""
    inner = part.get("input_audio")
    if not isinstance(inner, dict) or not isinstance(inner.get("data"), str):
        raise ValueError('an input_audio part needs {"input_audio": {"data": <base64>, "format": "wav" or "mp3"}}')
    try:
        return Audio(base64.b64decode(inner["data"], validate=True))
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"input_audio data is not valid base64: {e}") from None


def _content_to_text(content, media: list) -> str:
    """A message's content (str, or OpenAI-style parts) -> text with one marker per media part, media appended."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(part["text"])
        elif kind in ("image", "image_url"):
            media.append(_part_value(part, kind))
            parts.append(IMAGE_TOKEN)
        elif kind in ("video", "video_url"):
            value = _part_value(part, kind)
            media.append(value if isinstance(value, Video) else Video(value))
            parts.append(VIDEO_MARKER)
        elif kind in ("audio", "input_audio"):
            value = _part_value(part, "audio") if kind == "audio" else _input_audio(part)
            media.append(value if isinstance(value, Audio) else Audio(value))
            parts.append(AUDIO_MARKER)
        else:
            raise ValueError(
                f"unsupported message part type {kind!r} (use text, image, image_url, video, video_url, audio "
                "or input_audio)"
            )
    return "".join(_join(parts))


def _join(parts: list[str]) -> list[str]:
    # a media marker followed by text gets a newline, as LLaVA-style data writes it ("<image>\nWhat is ...")
    out = []
    for i, p in enumerate(parts):
        out.append(p)
        if p in MARKERS and i + 1 < len(parts) and parts[i + 1] not in MARKERS:
            out.append("\n")
    return out


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the model's default system message when the conversation brings none."""
    if system_prompt is None or any(m.get("role") == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system_prompt}, *messages]


def render_messages(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True, system_prompt: str | None = None
) -> tuple[str, list]:
    """(prompt text, media in order: images, `Video`s, `Audio`s). Image parts may be PIL images or paths (data: URLs
    are decoded by the server)."""
    images: list = []
    flat = []
    messages = with_system_prompt(messages, system_prompt)
    for m in messages:
        if "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content': {m}")
        flat.append({"role": m["role"], "content": _content_to_text(m["content"], images)})
    template = tokenizer.chat_template if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    text = tokenizer.apply_chat_template(
        flat, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )
    return text, images
