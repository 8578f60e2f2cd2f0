"""The frozen-cache batch source: same losses as the full model on the same samples, and exact resume."""

import pytest
import torch
from PIL import Image

from lmm.testing import tiny_lmm
from lmm.training.frozen_cache import CachedConversationBatches, ConversationSample


def _samples(tmp_path):
    out = []
    for i, (colour, answer) in enumerate([((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green")]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), colour).save(path)
        for q in ("what color is the shape?", "what color?"):
            out.append(ConversationSample(str(path), [{"role": "user", "content": f"<image>\n{q}"},
                                                      {"role": "assistant", "content": answer}]))
    return out


def test_cached_batches_give_the_full_models_loss(tmp_path):
    torch.set_num_threads(1)
    model = tiny_lmm(gates=0.7, seed=3, cross_attn_layers=[2, 3])
    model.config.system_prompt = "be brief"
    samples = _samples(tmp_path)
    source = CachedConversationBatches(model, samples, batch_size=4, seed=0)
    assert (source.num_images, source.num_sequences) == (3, 6)
    batch = next(iter(source))
    assert batch["prefix_layer"] == 2 and "pixel_values" not in batch
    with torch.no_grad():
        fast = model(**batch).loss
        full = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                     vision_features=batch["vision_features"]).loss
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    # the system prompt was rendered into the rows; labels cover the answers only
    text = model.tokenizer.decode(batch["input_ids"][0])
    assert "be brief" in text
    answers = {model.tokenizer.decode([t for t in row if t != -100]).strip() for row in batch["labels"].tolist()}
    assert all(a.split("<|im_end|>")[0] in {"red", "blue", "green"} for a in answers)


@pytest.mark.parametrize("balance", [False, True])
def test_resume_continues_with_the_next_batch(tmp_path, balance):
    model = tiny_lmm(seed=3, cross_attn_layers=[2, 3])
    samples = _samples(tmp_path)
    a = CachedConversationBatches(model, samples, batch_size=4, seed=1, balance_answers=balance)
    it = iter(a)
    seen = [next(it)["input_ids"] for _ in range(3)]  # crosses an epoch boundary (6 samples, batch 4)
    state = a.state_dict()
    want = [next(it)["input_ids"] for _ in range(2)]
    b = CachedConversationBatches(model, samples, batch_size=4, seed=1, balance_answers=balance)
    b.load_state_dict(state)
    it_b = iter(b)
    got = [next(it_b)["input_ids"] for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(got, want)) and len(seen) == 3


def _yes_no(q, a, image="img.png"):
    return ConversationSample(image, [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}])


def test_answer_balanced_weights_remove_the_text_prior():
    from lmm.training.frozen_cache import answer_balanced_weights

    # "is it red?" is "no" 7 times in 8; "what shape?" has three answers 1:1:2; "only one?" has one answer
    samples = ([_yes_no("is it red?", "no")] * 7 + [_yes_no("is it red?", "yes")]
               + [_yes_no("what shape?", a) for a in ("circle", "square", "triangle", "triangle")]
               + [_yes_no("only one?", "yes")] * 2)
    w = answer_balanced_weights(samples)
    mass = {}
    for s, p in zip(samples, w):
        key = (s.messages[0]["content"], s.messages[1]["content"])
        mass[key] = mass.get(key, 0.0) + p
    assert abs(w.sum() - 1) < 1e-12
    # every answer of a question gets the same share; each question keeps its share of the data
    assert abs(mass[("<image>\nis it red?", "no")] - 4 / 14) < 1e-12
    assert abs(mass[("<image>\nis it red?", "yes")] - 4 / 14) < 1e-12
    for a in ("circle", "square", "triangle"):
        assert abs(mass[("<image>\nwhat shape?", a)] - 4 / 14 / 3) < 1e-12
    assert abs(mass[("<image>\nonly one?", "yes")] - 2 / 14) < 1e-12


def test_balanced_batches_draw_rare_answers_as_often_as_common_ones(tmp_path):
    model = tiny_lmm(seed=3, cross_attn_layers=[2, 3])
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "r.png")
    img = str(tmp_path / "r.png")
    samples = [_yes_no("is it red?", "no", img)] * 9 + [_yes_no("is it red?", "yes", img)]
    yes_id = model.tokenizer("yes", add_special_tokens=False)["input_ids"][0]

    def yes_fraction(balance):
        src = CachedConversationBatches(model, samples, batch_size=10, seed=0, balance_answers=balance)
        it = iter(src)
        labels = torch.cat([next(it)["labels"] for _ in range(200)])
        return (labels == yes_id).any(1).float().mean().item()

    assert abs(yes_fraction(False) - 0.1) < 1e-6  # plain epochs: each sample once
    assert abs(yes_fraction(True) - 0.5) < 0.05  # balanced: yes as often as no


def test_resuming_with_another_sampling_setting_names_the_fix(tmp_path):
    from lmm.config import ConfigError

    model = tiny_lmm(seed=3, cross_attn_layers=[2, 3])
    samples = _samples(tmp_path)
    state = CachedConversationBatches(model, samples, batch_size=4, seed=1).state_dict()
    with pytest.raises(ConfigError, match="balance_answers=False, this run uses balance_answers=True.*resume=null"):
        CachedConversationBatches(model, samples, batch_size=4, seed=1, balance_answers=True).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed 1, this run uses seed 2.*resume=null"):
        CachedConversationBatches(model, samples, batch_size=4, seed=2).load_state_dict(state)
