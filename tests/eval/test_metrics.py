"""Caption metrics equal pycocoevalcap's own values; ROC-AUC, top-k and exact match on hand-made cases."""

from __future__ import annotations

import shutil

import pytest

from lmm.eval import metrics

PREDICTIONS = {
    "1": "A dog runs across the park.",
    "2": "two cats sleeping on a sofa",
    "3": "a red bus on the street",
    "4": "",  # an empty generation must still be scored (as 0), not crash
}
REFERENCES = {
    "1": ["A dog running in a park.", "a brown dog runs on the grass", "The dog is playing in the park."],
    "2": ["Two cats sleep on a couch.", "a pair of cats napping on the sofa"],
    "3": ["A red double-decker bus drives down the street.", "a bus on a city street", "red bus"],
    "4": ["A bowl of fruit on a table.", "apples and bananas in a bowl"],
}

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer needs Java")


def _reference_scores():
    """The same scores computed directly with pycocoevalcap, as COCOEvalCap does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in PREDICTIONS.items()})
    cider, per = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return cider, dict(zip(gts.keys(), per)), bleu[3]


@needs_java
def test_cider_and_bleu4_equal_pycocoevalcap_values():
    ours = metrics.caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    cider, per_sample, bleu4 = _reference_scores()
    assert ours["cider"] == cider
    assert ours["bleu4"] == bleu4
    assert ours["per_sample_cider"] == pytest.approx(per_sample, abs=0)
    assert ours["per_sample_cider"]["4"] == 0.0
    assert 0 < ours["cider"] < 10


@needs_java
def test_meteor_is_a_score_or_an_explained_absence():
    out = metrics.caption_metrics(PREDICTIONS, REFERENCES, meteor=True)
    if out["meteor"] is None:
        assert any("METEOR not computed" in n for n in out["notes"])
    else:
        assert 0.0 < out["meteor"] < 1.0
        assert out["notes"] == []


def test_without_java_cider_raises_and_meteor_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java` to find
    with pytest.raises(metrics.JavaMissingError, match="default-jre"):
        metrics.caption_metrics(PREDICTIONS, REFERENCES)
    score, note = metrics._meteor({"1": ["a"]}, {"1": ["a"]})
    assert score is None and "java" in note


def test_caption_metrics_reject_mismatched_samples():
    with pytest.raises(ValueError, match="missing predictions"):
        metrics.caption_metrics({"1": "a dog"}, {"1": ["a dog"], "2": ["a cat"]})


def test_roc_auc_matches_a_hand_count():
    # positives 0.35 and 0.8 vs negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right -> 0.75
    out = metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert out["roc_auc"] == 0.75


def test_roc_auc_with_one_class_is_none_with_a_hint():
    out = metrics.roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    assert out["roc_auc"] is None
    assert "--limit" in out["notes"][0]


def test_topk_accuracy_counts_label_in_first_k():
    out = metrics.topk_accuracy([0, 1, 2, 3], [[0, 1, 2, 3, 4], [2, 1, 0, 3, 4], [4, 3, 1, 0, 2], [1, 2, 4, 0, 5]])
    assert out == {"top1_accuracy": 0.25, "top5_accuracy": 0.75}


def test_topk_accuracy_omits_k_beyond_the_number_of_classes():
    assert metrics.topk_accuracy([0, 1], [[0, 1], [0, 1]]) == {"top1_accuracy": 0.5}


def test_exact_match_ignores_case_space_and_final_period():
    out = metrics.exact_match_accuracy(
        ["Circle.", " blue", "yes", "triangle shape"], ["circle", "blue", "no", "triangle"]
    )
    assert out == {"accuracy": 0.5, "correct": 2, "n": 4}
