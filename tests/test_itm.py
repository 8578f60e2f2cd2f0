"""Image-text matching (bridge.itm, itm_weight): the loss equals a hand-computed reference for every bridge,
negatives are mined from the contrastive similarities (never the pair itself), a toy run learns to tell held-out
hard negatives from matches, `LMM.match` re-ranks, the head saves, the trainer weighs and logs it."""

import pytest
import torch

from lmm.config import ConfigError
from lmm.losses import itm_candidates, sample_negatives
from lmm.testing import DISC_CAPTIONS as CAPTIONS
from lmm.testing import ListSource, pair_batch, tiny_lmm, tiny_train_config
from lmm.testing import disc_pictures as pictures


def test_negative_candidates_rule_entry_by_entry():
    # rows 0, 1, 3 hold one media item, rows 2, 4 two: a row's candidates are the OTHER rows with as many
    got = itm_candidates(torch.tensor([1, 1, 2, 1, 2]))
    want = torch.tensor(
        [
            [0, 1, 0, 1, 0],
            [1, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(got, want)
    # rows 0 and 3 are duplicates (the same caption, or the same image): a swap would still match
    dup = torch.zeros(5, 5, dtype=torch.bool)
    dup[0, 3] = dup[3, 0] = True
    want[0, 3] = want[3, 0] = False
    assert torch.equal(itm_candidates(torch.tensor([1, 1, 2, 1, 2]), dup), want)


def test_hard_negatives_follow_the_softmax_of_similarities_and_never_the_pair():
    torch.manual_seed(0)
    sim = torch.tensor([[5.0, 2.0, 0.0, 1.0], [0.0, 5.0, 3.0, 0.0], [1.0, 1.0, 5.0, 1.0], [0.0, 0.0, 4.0, 5.0]])
    allowed = itm_candidates(torch.ones(4, dtype=torch.long))
    draws = torch.stack([torch.stack(sample_negatives(sim, allowed)) for _ in range(4000)])  # (R, 2, 4)
    neg_text, neg_image = draws[:, 0], draws[:, 1]
    assert not (neg_text == torch.arange(4)).any() and not (neg_image == torch.arange(4)).any()
    for i in range(4):
        want_t = sim[i].masked_fill(~allowed[i], float("-inf")).softmax(0)  # texts for image i
        want_i = sim[:, i].masked_fill(~allowed[:, i], float("-inf")).softmax(0)  # images for text i
        got_t = torch.bincount(neg_text[:, i], minlength=4).float() / len(draws)
        got_i = torch.bincount(neg_image[:, i], minlength=4).float() / len(draws)
        torch.testing.assert_close(got_t, want_t, atol=0.03, rtol=0)
        torch.testing.assert_close(got_i, want_i, atol=0.03, rtol=0)
    # no similarities: uniform over the candidates; a row without any candidate gets -1
    uniform = torch.stack([sample_negatives(None, allowed)[0] for _ in range(3000)])
    torch.testing.assert_close(
        torch.bincount(uniform[:, 0], minlength=4).float() / 3000,
        torch.tensor([0, 1 / 3, 1 / 3, 1 / 3]),
        atol=0.04,
        rtol=0,
    )
    lonely = itm_candidates(torch.tensor([1, 1, 2]))
    nt, ni = sample_negatives(None, lonely)
    assert nt.tolist() == [1, 0, -1] and ni.tolist() == [1, 0, -1]


@pytest.mark.parametrize("bridge", ["flamingo", "projector", "qformer"])
def test_loss_equals_the_hand_computed_reference(bridge):
    """Positives plus one negative text per image and one negative image per text, each scored one pair at a
    time through `LMM.match` (no padding, another code path): the mean binary cross-entropy of the 3n pairs."""
    kw = {"contrastive_dim": 16, "gates": 1.0} if bridge == "flamingo" else {}
    model = tiny_lmm(bridge=bridge, seed=2, itm=True, **kw).eval()
    images, captions = pictures()[:4], CAPTIONS[:4]
    batch = pair_batch(model, images, captions)
    torch.manual_seed(11)
    with torch.no_grad():
        out = model(**batch, itm=True, contrastive=bridge == "flamingo")
    # the same draws: with a contrastive head from softmax(scale * cosine similarity), else uniform
    sim = model.contrastive.scale() * model.similarity(images, captions) if bridge == "flamingo" else None
    torch.manual_seed(11)
    neg_text, neg_image = sample_negatives(sim, itm_candidates(torch.ones(4, dtype=torch.long)))
    pairs = [(i, i, 1) for i in range(4)]
    pairs += [(int(neg_image[i]), i, 0) for i in range(4)]  # (image, text, matched)
    pairs += [(i, int(neg_text[i]), 0) for i in range(4)]
    p = model.match([images[a] for a, _, _ in pairs], [captions[b] for _, b, _ in pairs], batch_size=1)
    y = torch.tensor([m for _, _, m in pairs], dtype=torch.float)
    want = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(out.itm_loss, want, atol=1e-5, rtol=1e-5)
    assert model(**batch).itm_loss is None  # only computed when asked


def test_duplicate_rows_are_never_each_others_negatives():
    """Rows with the same caption (or the same image) would be wrongly labelled "not matched" if swapped: with
    only such rows in the batch the loss scores the positives alone."""
    model = tiny_lmm(bridge="projector", seed=2, itm=True).eval()
    img = pictures()[0]
    same_caption = pair_batch(model, pictures()[:3], [CAPTIONS[0]] * 3)
    same_image = pair_batch(model, [img] * 3, CAPTIONS[:3])
    for batch in (same_caption, same_image):
        with torch.no_grad():
            loss = model(**batch, itm=True).itm_loss
        images = pictures()[:3] if batch is same_caption else [img] * 3
        texts = [CAPTIONS[0]] * 3 if batch is same_caption else CAPTIONS[:3]
        p = model.match(images, texts, batch_size=1)
        torch.testing.assert_close(loss, -p.log().mean(), atol=1e-5, rtol=1e-5)


def held_out_accuracy(model):
    """ITM accuracy on held-out images: each against its caption and its hardest wrong caption (the one the
    contrastive head ranks highest), threshold 0.5; chance is 0.5."""
    images = pictures(style=3)
    sim = model.similarity(images, CAPTIONS)
    sim.fill_diagonal_(float("-inf"))
    hard = sim.argmax(1)
    p = model.match(images, [[CAPTIONS[i], CAPTIONS[int(hard[i])]] for i in range(8)])  # (8, 2)
    return float(((p[:, 0] > 0.5).float().mean() + (p[:, 1] < 0.5).float().mean()) / 2), p


def test_toy_training_tells_held_out_hard_negatives_from_matches():
    torch.manual_seed(0)
    model = tiny_lmm(seed=4, contrastive_dim=32, itm=True)
    batch = pair_batch(model, [im for style in range(3) for im in pictures(style)], CAPTIONS * 3)
    before, _ = held_out_accuracy(model.eval())
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for _ in range(80):
        out = model(**batch, return_logits=False, contrastive=True, itm=True)
        (out.contrastive_loss + out.itm_loss).backward()
        opt.step()
        opt.zero_grad()
    after, p = held_out_accuracy(model.eval())
    assert after >= 0.8 and after > before, (before, after, p)


def test_match_shapes_rerank_and_the_head_saves(tmp_path):
    from lmm.model import LMM

    model = tiny_lmm(bridge="projector", seed=3, itm=True)
    images = pictures()[:3]
    cands = [CAPTIONS[:4]] * 3
    table = model.match(images, cands)
    assert table.shape == (3, 4) and ((table > 0) & (table < 1)).all()
    pairwise = model.match([images[i] for i in range(3) for _ in range(4)], [c for _ in range(3) for c in CAPTIONS[:4]])
    torch.testing.assert_close(table.flatten(), pairwise)
    model.save_pretrained(tmp_path / "m")
    again = LMM.from_pretrained(tmp_path / "m", device="cpu")
    assert "itm.weight" in again.trainable_state_dict()
    assert torch.equal(again.match(images, cands), table)


def test_trainer_adds_the_weighted_loss_and_logs_it(tmp_path):
    from lmm.training import Trainer

    model = tiny_lmm(bridge="projector", seed=1, itm=True)
    batch = pair_batch(model, pictures()[:2], CAPTIONS[:2])  # 2 rows: each one's negative is the other row
    with torch.no_grad():
        out = model(**batch, return_logits=False, itm=True)
    cfg = tiny_train_config(tmp_path, itm_weight=0.5, schedule={"max_steps": 1})
    result = Trainer(model, cfg, ListSource([batch])).fit()
    assert result.losses[0] == pytest.approx(float(out.loss) + 0.5 * float(out.itm_loss), rel=1e-5)
    logged = [r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"step": 1' in r]
    assert logged and '"loss/itm"' in logged[0]


def test_configuration_errors_name_the_fix(tmp_path):
    from lmm.testing import tiny_lmm_config
    from lmm.training import Trainer

    plain = tiny_lmm(bridge="projector")
    with pytest.raises(ValueError, match="bridge.itm"):
        plain.match(pictures()[:1], ["a red disc"])
    batch = pair_batch(plain, pictures()[:2], CAPTIONS[:2])
    with pytest.raises(ValueError, match="bridge.itm"):
        plain(**batch, itm=True)
    with pytest.raises(ValueError, match="one text"):
        tiny_lmm(bridge="projector", itm=True).match(pictures()[:2], ["a red disc"])
    cfg = tiny_train_config(tmp_path, itm_weight=1.0, model=tiny_lmm_config().to_dict())
    with pytest.raises(ConfigError, match="bridge.itm=true"):
        cfg.validate()
    for bad, match in [
        ({"frozen_cache": True}, "frozen_cache"),
        ({"data": {"batch_size": 1}}, "2 rows"),
        ({"data": {"packing": True}}, "packing"),
    ]:
        with pytest.raises(ConfigError, match=match):
            tiny_train_config(tmp_path, itm_weight=1.0, preset="lmm-tiny", **bad).validate(world_size=1)
    with pytest.raises(ConfigError, match="bridge.itm=true"):
        Trainer(plain, tiny_train_config(tmp_path, itm_weight=1.0), ListSource([]))
