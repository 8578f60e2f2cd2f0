"""Few-shot prompts: exact format, batch == one query at a time, seeded determinism, score-based classification."""

import pytest
import torch

from lmm.fewshot import build_fewshot_batch, build_fewshot_prompt, fewshot_classify, fewshot_generate, sample_demos
from lmm.testing import tiny_lmm


@pytest.fixture(scope="module")
def model():
    return tiny_lmm(family="llama", bridge="flamingo", gates=0.8, seed=3)


def test_prompt_format_and_image_order(images):
    demos = [(images[0], "Output: a red circle."), (images[1], "Output: a blue circle.")]
    prompt, ims = build_fewshot_prompt(demos, "Output:", query_image=images[2])
    assert prompt == (
        "<image>Output: a red circle.<|endofchunk|><image>Output: a blue circle.<|endofchunk|><image>Output:"
    )
    assert ims == [images[0], images[1], images[2]]


def test_custom_template_and_text_only_examples(images):
    demos = [(None, "the answer is yes"), (images[0], "the answer is no")]
    prompt, ims = build_fewshot_prompt(demos, "the answer is", template="Q: <image>{text}\n")
    assert prompt == "Q: the answer is yes\nQ: <image>the answer is no\nQ: the answer is"
    assert ims == [images[0]]


@pytest.mark.parametrize("template,match", [("no placeholder", "placeholder"), ("<image><image>{text}", "one <image>")])
def test_bad_templates_are_explained(template, match):
    with pytest.raises(ValueError, match=match):
        build_fewshot_prompt([], "x", template=template)


def test_image_without_marker_is_explained(images):
    with pytest.raises(ValueError, match="no <image> marker"):
        build_fewshot_prompt([(images[0], "a")], "b", template="{text}\n")


def test_batched_fewshot_generation_equals_each_query_alone(model, images):
    demos = [(images[0], "a photo of a red circle"), (images[1], "a photo of a blue square")]
    queries = [(images[2], "a photo of"), (images[3], "what color is the shape?"), (None, "the answer is")]
    batched = fewshot_generate(model, demos, queries, max_new_tokens=8)
    alone = []
    for q_image, q_text in queries:
        prompt, ims = build_fewshot_prompt(demos, q_text, query_image=q_image)
        alone.append(model.generate(prompt, images=ims, max_new_tokens=8))
    assert batched == alone
    assert len(set(batched)) > 1  # the queries really differ


def test_per_query_demo_lists(images):
    per_query = [[(images[0], "x")], [(images[1], "y"), (images[2], "z")]]
    prompts, ims = build_fewshot_batch(per_query, [(images[3], "q1"), (images[3], "q2")])
    assert prompts == ["<image>x<|endofchunk|><image>q1", "<image>y<|endofchunk|><image>z<|endofchunk|><image>q2"]
    assert [len(i) for i in ims] == [2, 3]
    with pytest.raises(ValueError, match="one list per query"):
        build_fewshot_batch(per_query, [(images[3], "q1")])


def test_seeded_demo_choice_and_sampling_are_deterministic(model, images):
    pool = [(im, f"example {i}") for i, im in enumerate(images)]
    assert sample_demos(pool, 2, seed=7) == sample_demos(pool, 2, seed=7)
    assert len({tuple(t for _, t in sample_demos(pool, 3, seed=s)) for s in range(10)}) > 1
    with pytest.raises(ValueError, match="only 4"):
        sample_demos(pool, 5)
    queries = [(images[0], "a photo of")]
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, stop_at_end_of_chunk=False)
    first = fewshot_generate(model, sample_demos(pool, 2, seed=1), queries, seed=123, **kw)
    again = fewshot_generate(model, sample_demos(pool, 2, seed=1), queries, seed=123, **kw)
    assert first == again


def test_classification_picks_the_most_likely_class(model, images):
    demos = [(images[0], "the answer is yes"), (images[1], "the answer is no")]
    queries = [(images[2], "the answer is"), (images[3], "the answer is")]
    classes = [" yes", " no", " circle"]
    labels, scores = fewshot_classify(model, demos, queries, classes)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all() and (scores < 0).all()
    prompts, ims = build_fewshot_batch(demos, queries)
    torch.testing.assert_close(scores, model.score(prompts, ims, classes))
    assert labels == [classes[i] for i in scores.argmax(-1).tolist()]
