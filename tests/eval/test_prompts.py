"""The prompt templates produce the Flamingo / OpenFlamingo formats."""

from __future__ import annotations

import pytest

from lmm.eval import prompts


def test_caption_demo_and_query_strings():
    assert prompts.CAPTION.demo("A dog.") == "<image>Output:A dog.<|endofchunk|>"
    assert prompts.CAPTION.query() == "<image>Output:"


def test_vqa_prompt_with_two_demos_ends_with_the_open_query():
    p = prompts.build_prompt(prompts.VQA, [("red", "What color?"), ("2", "How many?")], "Is it big?")
    assert p == (
        "<image>Question:What color? Short answer:red<|endofchunk|>"
        "<image>Question:How many? Short answer:2<|endofchunk|>"
        "<image>Question:Is it big? Short answer:"
    )


def test_hateful_memes_prompt_quotes_the_meme_text():
    assert (
        prompts.HATEFUL_MEMES.query("hello") == "<image>is an image with: 'hello' written on it. Is it hateful? Answer:"
    )


def test_text_only_demos_drop_demo_images_but_keep_the_query_image():
    p = prompts.build_prompt(prompts.CAPTION, [("A cat.", ""), ("A dog.", "")], text_only_demos=True)
    assert p == "Output:A cat.<|endofchunk|>Output:A dog.<|endofchunk|><image>Output:"
    assert p.count("<image>") == 1


def test_a_template_without_answer_slot_or_image_is_rejected():
    with pytest.raises(ValueError, match="must end with"):
        prompts.PromptTemplate("<image>Output:")
    with pytest.raises(ValueError, match="<image>"):
        prompts.PromptTemplate("Output:{answer}<|endofchunk|>")


def test_ranking_moves_the_trailing_space_into_the_candidates():
    prompt, cands = prompts.ranking_inputs("<image>A photo of a ", ["red ball", "blue box"])
    assert prompt == "<image>A photo of a"
    assert cands == [" red ball<|endofchunk|>", " blue box<|endofchunk|>"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("red Question: what is", "red"),
        (" two dogs, one cat", "two dogs"),
        ("yes Short answer: no", "yes"),
    ],
)
def test_vqa_postprocessing_cuts_at_prompt_words_and_comma(raw, expected):
    assert prompts.postprocess_vqa(raw) == expected


def test_caption_postprocessing_cuts_at_the_next_output():
    assert prompts.postprocess_caption(" A dog on grass. Output: a cat") == "A dog on grass."
