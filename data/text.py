"""Samples -> token ids and labels: the Flamingo text format and chat-template conversations.

Documents (interleaved, pairs, video): `<image>` before each image, `<|endofchunk|>` closing each
image's text chunk, then EOS. Labels are -100 (no loss) on padding, on `<image>` tokens and on
everything up to the first image (text with no image to condition on teaches nothing visual).

Conversations: rendered by the tokenizer's own chat template; the loss falls on assistant turns
only. Assistant spans are found by rendering the conversation incrementally (prefix before the
turn with a generation prompt, prefix including the turn) and mapped to tokens through the fast
tokenizer's character offsets, so no particular template is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmm.tokens import END_OF_CHUNK_TOKEN, IMAGE_TOKEN

from .errors import BadSample

IGNORE_INDEX = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def media_token_ids(tokenizer) -> tuple[int, int]:
    """(`<image>` id, `<|endofchunk|>` id); a clear error when the tokenizer lacks them."""
    # convert_tokens_to_ids, not get_vocab(): that builds a dict of the whole vocabulary (~150k entries for
    # Llama 3 / Qwen2) on every call, and this runs once per sample
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, END_OF_CHUNK_TOKEN)}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(
            f"the tokenizer lacks {missing}; call lmm.tokens.add_media_tokens(tokenizer) "
            "(and resize the model's embeddings) before building data"
        )
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; lmm.tokens.add_media_tokens(tokenizer) sets one")
    return ids[IMAGE_TOKEN], ids[END_OF_CHUNK_TOKEN]


def _marker(p) -> str:
    """The marker token of a media part: its `marker` (`<audio>` for a MediaRef of kind audio), else `<image>`."""
    return getattr(p, "marker", IMAGE_TOKEN)


def marker_ids(tokenizer, markers=()) -> set[int]:
    """Ids of `<image>` and of the other marker tokens (`<audio>` ...) the tokenizer has."""
    ids = {media_token_ids(tokenizer)[0]}
    for m in markers:
        i = tokenizer.convert_tokens_to_ids(m)
        if i is not None and i != tokenizer.unk_token_id:
            ids.add(i)
    return ids


def flamingo_text(parts: list, is_media=lambda p: not isinstance(p, str)) -> str:
    """Interleaved parts -> "text <image>chunk<|endofchunk|><audio>chunk<|endofchunk|>" (each media part's own
    marker: `<image>` for images and videos, `<audio>` for audio)."""
    out, seen_media, prev_text = [], False, False
    for p in parts:
        if is_media(p):
            if seen_media:
                out.append(END_OF_CHUNK_TOKEN)
            out.append(_marker(p))
            seen_media, prev_text = True, False
        else:
            text = p.strip()
            if text:
                out.append((" " if prev_text else "") + text)
                prev_text = True
    if seen_media:
        out.append(END_OF_CHUNK_TOKEN)
    return "".join(out)


def encode_document(parts: list, tokenizer) -> Tokenized:
    """Flamingo-format a document and label it (loss from the first media marker on, never on a marker)."""
    markers = marker_ids(tokenizer, {_marker(p) for p in parts if not isinstance(p, str)})
    ids = list(tokenizer(flamingo_text(parts), add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    labels = list(ids)
    first = next((i for i, t in enumerate(ids) if t in markers), len(ids))
    for i in range(first + 1):
        if i < len(labels):
            labels[i] = IGNORE_INDEX
    labels = [IGNORE_INDEX if t in markers else lab for t, lab in zip(ids, labels)]
    return Tokenized(ids, labels)


def _render(tokenizer, messages, generation_prompt=False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "conversation data needs a tokenizer with a chat template "
            "(set tokenizer.chat_template, or use an instruct model's tokenizer)"
        )
    full = _render(tokenizer, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if full.startswith(upto) and upto.startswith(before) and len(before) < len(upto) and len(before) >= cursor:
            spans.append((len(before), len(upto)))
        else:  # a template that re-renders earlier turns: fall back to locating the content itself
            start = full.find(m["content"], cursor)
            if start < 0:
                raise BadSample("bad_record", "the chat template does not reproduce an assistant turn")
            spans.append((start, start + len(m["content"])))
        cursor = spans[-1][1]
    return full, spans


def encode_conversation(messages: list[dict], tokenizer, markers=()) -> Tokenized:
    """Render with the chat template; labels only on tokens starting inside an assistant span, never on
    `<image>` or the other `markers` (`<audio>` ...)."""
    skip = marker_ids(tokenizer, markers)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("conversation data needs a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    full, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    for t, (s, _end) in enumerate(enc["offset_mapping"]):
        while j < len(spans) and s >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= s < spans[j][1] and ids[t] not in skip:
            labels[t] = ids[t]
    return Tokenized(ids, labels)


def truncate(tok: Tokenized, max_tokens: int, image_id: int) -> tuple[Tokenized, int]:
    """Cut to `max_tokens`; returns the result and how many `<image>` tokens survive (media to keep)."""
    ids, labels = tok.input_ids[:max_tokens], tok.labels[:max_tokens]
    if all(lab == IGNORE_INDEX for lab in labels):
        raise BadSample("too_long", f"no loss tokens within max_tokens={max_tokens} ({len(tok.input_ids)} tokens)")
    return Tokenized(ids, labels), ids.count(image_id)
