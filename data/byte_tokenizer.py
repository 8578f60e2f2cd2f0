"""A model-free byte-level tokenizer, so `lmm data inspect` can render any dataset without a model's files.

Every byte is one token (no merges), `<|endoftext|>` is BOS/EOS/PAD, and conversations use a ChatML template. Text
round-trips exactly; token counts are bytes, not what a real LM's tokenizer would give.
"""

from __future__ import annotations

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A `PreTrainedTokenizerFast` over the 256 byte symbols plus `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(specials + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return chatml_tokenizer(tok)


def chatml_tokenizer(tok):
    """A `tokenizers.Tokenizer` (byte-level, with `<|endoftext|>`) as a `PreTrainedTokenizerFast` whose
    `<|endoftext|>` is BOS/EOS/PAD, with a ChatML chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
