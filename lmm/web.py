"""A gradio chat page: upload images, videos or audio clips (paper clip or drag and drop), ask, read the answer
as it streams.

    from lmm.web import build_app
    build_app(model).launch(server_name="127.0.0.1", server_port=7860)

Needs the `web` extra (gradio); gradio is imported only when a page is built. The page has no authentication:
serve it on the loopback interface (the default) unless everyone who can reach the port may use the model.
Uploads are decoded once and downscaled to the model's input size on upload (a session keeps that, never the
full-size file); an upload with more than `max_image_pixels` pixels (read from its header) is refused. Videos are
kept as the model's sampled frames and audio as a waveform at the encoder's rate (lmm.inputs.load_media).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
MAX_ASPECT_RATIO = 200.0

INTRO = (
    "Attach images, videos or audio clips with the paper clip (or drop them on the box), type a question and "
    "press Enter. The conversation keeps its media; **Clear** starts over."
)


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the web page needs gradio: pip install 'lmm[web]'", name="gradio") from None
    return gr


def _path(f) -> str:
    return f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", str(f)))


def input_side(model) -> int:
    """The side of the model's input images (its image transform's size; 448 when the transform does not say)."""
    size = getattr(getattr(model, "image_processor", None), "size", None)
    if isinstance(size, dict):
        size = [v for v in size.values() if isinstance(v, int)]
    if isinstance(size, (tuple, list)) and size:
        size = max(int(v) for v in size)
    return size if isinstance(size, int) and size > 0 else 448


def load_upload(path, side: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """An uploaded image as RGB with its shorter side at most `side` (the model's input size; the image transform
    resizes it to that anyway), so a page session never holds a full-size upload. The size is read from the
    header first: more than `max_pixels` pixels, or sides more unequal than 200:1, is a ValueError; a JPEG is
    decoded at a reduced scale when it is much larger than needed."""
    from PIL import Image

    name = Path(str(path)).name
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(f"{name} has more than {max_pixels} pixels") from None
    except Exception as e:  # not an image, or a header PIL rejects
        raise ValueError(f"cannot decode image {name}: {type(e).__name__}") from None
    with im:
        w, h = im.size
        if w < 1 or h < 1 or w * h > max_pixels:
            raise ValueError(f"{name} has {w}x{h} pixels; this page accepts at most {max_pixels}")
        if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
            raise ValueError(f"{name} is {w}x{h} pixels: sides more unequal than {MAX_ASPECT_RATIO:g}:1")
        scale = side / min(w, h)
        if scale < 1 and im.format == "JPEG":
            im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))  # libjpeg's 1/2, 1/4, 1/8 decoding
        try:
            im.load()
            rgb = im.convert("RGB")
        except Exception as e:  # truncated data, text-chunk bombs, ...
            raise ValueError(f"cannot decode image {name}: {type(e).__name__}") from None
    if min(rgb.size) > side:
        scale = side / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    return rgb


def build_app(
    model, title: str = "lmm", max_new_tokens: int = 256, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, **gen_kwargs
):
    """A `gr.Blocks` chat page for `model` (greedy unless gen_kwargs ask for sampling)."""
    gr = _gradio()

    context = getattr(model.lm.config, "max_position_embeddings", None)
    side = input_side(model)

    def add_user_turn(message: dict, chat: list, conv: list):
        """Validate and record the user's message (images decoded now, so a bad file is reported at once)."""
        text = (message or {}).get("text", "").strip()
        paths = [_path(f) for f in (message or {}).get("files", [])]
        if not text and not paths:
            raise gr.Error("Type a question (and attach images with the paper clip).")
        from lmm.inputs import load_media, media_kind

        parts = []
        try:
            for p in paths:
                kind = media_kind(p)
                item = load_upload(p, side, max_image_pixels) if kind == "image" else load_media(model, p, kind)
                parts.append({"type": kind, kind: item})
        except ValueError as e:
            raise gr.Error(
                f"{e}. Attach a PNG, JPEG, WebP, GIF or BMP image, an MP4/WebM video or a WAV/MP3 clip."
            ) from None
        parts.append({"type": "text", "text": text})
        shown = [{"path": p} for p in paths] + ([text] if text else [])
        return (
            gr.MultimodalTextbox(value=None, interactive=False),
            chat + [{"role": "user", "content": shown}],
            conv + [{"role": "user", "content": parts}],
        )

    def answer(chat: list, conv: list):
        """Stream the assistant's answer into the last chat bubble."""
        if not conv or conv[-1]["role"] != "user":
            return
        chat = chat + [{"role": "assistant", "content": ""}]
        text = ""
        try:
            prompt, images = model.render_chat(conv)
            budget = max_new_tokens
            if context is not None:
                used = len(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                budget = max(1, min(max_new_tokens, context - used))
            for piece in model.stream(
                prompt,
                images,
                add_special_tokens=False,
                stop_at_end_of_chunk=False,
                max_new_tokens=budget,
                **gen_kwargs,
            ):
                text += piece
                chat[-1] = {"role": "assistant", "content": text}
                yield chat, conv
        except ValueError as e:  # e.g. the conversation no longer fits the context
            gr.Warning(f"{e}")
            yield chat[:-2], conv[:-1]
            return
        yield chat, conv + [{"role": "assistant", "content": text}]

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}\n{INTRO}")
        chatbot = gr.Chatbot(label="Conversation", elem_id="lmm-chat", height=480)
        box = gr.MultimodalTextbox(
            file_types=["image", "video", "audio"],
            file_count="multiple",
            show_label=False,
            placeholder="Ask about the image, video or audio…",
            elem_id="lmm-input",
            autofocus=True,
        )
        clear = gr.Button("Clear", elem_id="lmm-clear")
        conv = gr.State([])  # the model's view: messages with PIL images

        box.submit(add_user_turn, [box, chatbot, conv], [box, chatbot, conv], queue=False).then(
            answer, [chatbot, conv], [chatbot, conv]
        ).then(lambda: gr.MultimodalTextbox(interactive=True), None, [box])
        clear.click(lambda: ([], [], None), None, [chatbot, conv, box], queue=False)
        chatbot.clear(list, None, [conv], queue=False)  # the chat panel's own trash icon
    return demo


def launch(
    model, host: str = "127.0.0.1", port: int = 7860, title: str | None = None, share: bool = False, **gen_kwargs
) -> None:
    """Build the page and serve it (blocks until interrupted). System fonts only: works offline. The page has no
    authentication: keep `host` on the loopback interface unless everyone who can reach it may use the model."""
    gr = _gradio()
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    demo = build_app(model, title=title or Path(getattr(model.config, "name", "lmm")).name, **gen_kwargs)
    demo.queue(default_concurrency_limit=1)  # one generation at a time on the model
    demo.launch(server_name=host, server_port=port, share=share, theme=theme, ssr_mode=False, show_error=True)
