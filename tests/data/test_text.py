"""Flamingo formatting, labels, chat-template conversations, truncation (lmm.data.text)."""

import pytest

from lmm.data.errors import BadSample
from lmm.data.text import IGNORE_INDEX, encode_conversation, encode_document, flamingo_text, truncate

IMG = object()


def labelled_text(tok, enc):
    return tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def test_flamingo_text_markers():
    assert flamingo_text([IMG, "a caption"]) == "<image>a caption<|endofchunk|>"
    assert (
        flamingo_text(["intro", "more", IMG, "one", IMG, "two"])
        == "intro more<image>one<|endofchunk|><image>two<|endofchunk|>"
    )


def test_document_labels_mask_prefix_and_image_tokens(tokenizer):
    enc = encode_document(["before text", IMG, "a red circle", IMG, "blue"], tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    first = enc.input_ids.index(image_id)
    assert all(lab == IGNORE_INDEX for lab in enc.labels[: first + 1])
    assert all(lab == IGNORE_INDEX for t, lab in zip(enc.input_ids, enc.labels) if t == image_id)
    assert labelled_text(tokenizer, enc) == "a red circle<|endofchunk|>blue<|endofchunk|><|endoftext|>"


def test_conversation_loss_only_on_assistant_turns(tokenizer):
    msgs = [
        {"role": "system", "content": "be short"},
        {"role": "user", "content": "<image>\nwhat shape?"},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "color?"},
        {"role": "assistant", "content": "red"},
    ]
    enc = encode_conversation(msgs, tokenizer)
    assert labelled_text(tokenizer, enc) == "circle<|im_end|>\nred<|im_end|>\n"
    assert tokenizer.convert_tokens_to_ids("<image>") in enc.input_ids


LLAMA3_LIKE = (
    "{{ '<|endoftext|>' }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nDefault system prompt.<|im_end|>"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] | trim }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)


def test_conversation_spans_found_with_another_template(tokenizer):
    import copy

    t2 = copy.deepcopy(tokenizer)
    t2.chat_template = LLAMA3_LIKE
    msgs = [{"role": "user", "content": "<image> what shape?"}, {"role": "assistant", "content": " circle "}]
    enc = encode_conversation(msgs, t2)
    assert labelled_text(t2, enc) == "circle<|im_end|>"
    assert t2.decode(enc.input_ids).count("Default system prompt.") == 1


def test_truncate_reports_surviving_images_and_rejects_lossless(tokenizer):
    enc = encode_document([IMG, "a red circle", IMG, "a blue square"], tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    second = [i for i, t in enumerate(enc.input_ids) if t == image_id][1]
    cut, kept = truncate(enc, second, image_id)
    assert kept == 1 and len(cut.input_ids) == second
    with pytest.raises(BadSample) as e:
        truncate(enc, 1, image_id)
    assert e.value.reason == "too_long"


def test_tokenizer_without_media_tokens_is_a_clear_error():
    from lmm.testing import tiny_tokenizer

    with pytest.raises(ValueError, match="add_media_tokens"):
        encode_document([IMG, "x"], tiny_tokenizer())
