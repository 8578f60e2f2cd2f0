"""The two special tokens lmm adds to every LM tokenizer, in one place."""

from __future__ import annotations

IMAGE_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
MEDIA_TOKENS = (IMAGE_TOKEN, END_OF_CHUNK_TOKEN)


def add_media_tokens(tokenizer) -> tuple[int, int]:
    """Add `<image>` and `<|endofchunk|>` as special tokens (idempotent); return their ids.

    Also gives the tokenizer a pad token (EOS) when it has none, so batching works.
    """
    image_id, eoc_id = add_tokens(tokenizer, list(MEDIA_TOKENS))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return image_id, eoc_id


def add_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add tokens (media markers: `<image>`, `<audio>` ...) as special tokens where missing; return their ids."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]
