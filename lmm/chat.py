"""Conversations -> one prompt string with `<image>` markers + the list of images, via the tokenizer's chat
template. Used by `LMM.chat`, the terminal chat and the server, so all of them build prompts the same way."""

from __future__ import annotations

from lmm.tokens import IMAGE_TOKEN

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _content_to_text(content, images: list) -> str:
    """A message's content (str, or OpenAI-style parts) -> text with one `<image>` per image, images appended."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            parts.append(part["text"])
        elif kind in ("image", "image_url"):
            img = part.get("image") if kind == "image" else part.get("image_url")
            if isinstance(img, dict):
                img = img.get("url")
            if img is None:
                raise ValueError(f"image part without an image: {part}")
            images.append(img)
            parts.append(IMAGE_TOKEN)
        else:
            raise ValueError(f"unsupported message part type {kind!r} (use text, image or image_url)")
    return "".join(_join(parts))


def _join(parts: list[str]) -> list[str]:
    # an image marker followed by text gets a newline, as LLaVA-style data writes it ("<image>\nWhat is ...")
    out = []
    for i, p in enumerate(parts):
        out.append(p)
        if p == IMAGE_TOKEN and i + 1 < len(parts) and parts[i + 1] != IMAGE_TOKEN:
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
    """(prompt text, images in order). Image parts may be PIL images or paths (data: URLs are decoded by the server)."""
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
