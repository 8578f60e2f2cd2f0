"""Task metrics, computed with the community's reference implementations.

- Captioning: CIDEr (the COCO leaderboard's CIDEr-D as shipped in pycocoevalcap), BLEU-4 and METEOR,
  after pycocoevalcap's PTBTokenizer, exactly as `COCOEvalCap` does it. PTBTokenizer and METEOR run
  Java; without Java, CIDEr/BLEU cannot be computed reference-exactly and raise `JavaMissingError`,
  while a METEOR that cannot run is reported as `None` with the reason under "notes".
- VQA: the official VQA accuracy (see `lmm.eval.vqa_normalize`).
- HatefulMemes: ROC-AUC with scikit-learn.
- Classification: top-1 / top-5 accuracy; conversation tasks (easy-vqa ...): exact match.

Every function returns the library's own scale (CIDEr as pycocoevalcap gives it, accuracies in
[0, 1]); the harness reports them x100, as the Flamingo / OpenFlamingo tables do.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import math
import shutil
import threading
from collections.abc import Mapping, Sequence

from .vqa_normalize import vqa_accuracy

JAVA_HINT = (
    "install a Java runtime (e.g. `apt-get install default-jre-headless`) so that `java` is on PATH; "
    "pycocoevalcap's PTBTokenizer and METEOR need it"
)


class JavaMissingError(RuntimeError):
    """Raised when a caption metric needs Java and no `java` is on PATH."""


def java_available() -> bool:
    return shutil.which("java") is not None


def require_java() -> None:
    if not java_available():
        raise JavaMissingError(f"caption metrics need Java but `java` was not found: {JAVA_HINT}")


def ptb_tokenize(texts: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    """pycocoevalcap's PTBTokenizer over {key: [sentence, ...]} (lower-cased, punctuation removed)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    with _captured_stderr() as err:  # the Java tokenizer reports its speed on stderr at every call
        out = PTBTokenizer().tokenize({k: [{"caption": s} for s in v] for k, v in texts.items()})
    if set(out) != set(texts) or any(len(out[k]) != len(v) for k, v in texts.items()):
        raise RuntimeError(f"PTBTokenizer (Java) failed: {err.read().strip()[-2000:]}")
    return out


@contextlib.contextmanager
def _captured_stderr():
    """Send file descriptor 2 (inherited by subprocesses) to a temp file; yield it for reading."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield tmp
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)


_METEOR = None  # one METEOR JVM per process: starting it (loading its paraphrase tables) takes seconds


def _close_meteor() -> None:
    global _METEOR
    scorer, _METEOR = _METEOR, None
    if scorer is None:
        return
    with contextlib.suppress(Exception):
        scorer.meteor_p.stdin.close()
    with contextlib.suppress(Exception):
        scorer.meteor_p.kill()
        scorer.meteor_p.wait(timeout=10)
    scorer.lock = threading.Lock()  # a call that failed mid-way holds the old one; its __del__ would block


atexit.register(_close_meteor)


def _meteor(gts: dict, res: dict) -> tuple[float | None, str | None]:
    """METEOR 1.5 through pycocoevalcap's wrapper; (score, None) or (None, why it could not run)."""
    global _METEOR
    if not java_available():
        return None, f"METEOR not computed: `java` not found ({JAVA_HINT})"
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        if _METEOR is None or _METEOR.meteor_p.poll() is not None:
            _close_meteor()
            _METEOR = Meteor()
        score, _ = _METEOR.compute_score(gts, res)
        return float(score), None
    except Exception as e:  # the jar needs ~2 GB of heap; a JVM that cannot start or dies ends here
        _close_meteor()
        return None, f"METEOR not computed: the METEOR jar failed ({type(e).__name__}: {e})"


def caption_metrics(
    predictions: Mapping[object, str], references: Mapping[object, Sequence[str]], meteor: bool = True
) -> dict:
    """CIDEr, BLEU-4 (and METEOR) of one caption per key against that key's reference captions.

    Returns {"cider": float, "bleu4": float, "meteor": float | None, "per_sample_cider": {key: float},
    "notes": [str]}; both sides go through PTBTokenizer separately, as in `COCOEvalCap.evaluate`.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(predictions) != set(references):
        missing = set(references) - set(predictions)
        extra = set(predictions) - set(references)
        raise ValueError(
            f"predictions and references must cover the same samples "
            f"(missing predictions: {sorted(map(str, missing))[:5]}, "
            f"predictions without references: {sorted(map(str, extra))[:5]})"
        )
    if not predictions:
        raise ValueError("no captions to score")
    empty = [k for k, v in references.items() if not v]
    if empty:
        raise ValueError(f"samples without reference captions: {sorted(map(str, empty))[:5]}")
    gts = ptb_tokenize(references)
    res = ptb_tokenize({k: [v] for k, v in predictions.items()})
    cider, per_sample = Cider().compute_score(gts, res)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internal counts
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {
        "cider": float(cider),
        "bleu4": float(bleu[3]),
        "meteor": None,
        "per_sample_cider": {k: float(s) for k, s in zip(gts.keys(), per_sample)},
        "notes": [],
    }
    if meteor:
        out["meteor"], note = _meteor(gts, res)
        if note:
            out["notes"].append(note)
    return out


def vqa_metrics(predictions: Mapping[object, str], answers: Mapping[object, Sequence[str]]) -> dict:
    """Mean official VQA accuracy and the per-sample values (all in [0, 1])."""
    if not predictions:
        raise ValueError("no VQA predictions to score")
    per = {k: vqa_accuracy(p, answers[k]) for k, p in predictions.items()}
    return {"vqa_accuracy": sum(per.values()) / len(per), "per_sample": per}


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> dict:
    """ROC-AUC (in [0, 1]) of positive-class scores; `None` with a note when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = [int(x) for x in labels]
    if len(set(labels)) < 2:
        return {
            "roc_auc": None,
            "notes": [
                f"ROC-AUC undefined: all {len(labels)} evaluated samples have label "
                f"{labels[0] if labels else '-'}; evaluate more samples (raise --limit)"
            ],
        }
    scores = [float(s) for s in scores]
    if any(math.isnan(s) for s in scores):
        raise ValueError("ROC-AUC got NaN scores: the model's log-likelihoods contain NaN")
    return {"roc_auc": float(roc_auc_score(labels, scores)), "notes": []}


def topk_accuracy(labels: Sequence[int], rankings: Sequence[Sequence[int]], ks: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracy (in [0, 1]) of class rankings (best first) against integer labels."""
    if not labels:
        raise ValueError("no classification predictions to score")
    out = {}
    for k in ks:
        if all(len(r) >= k for r in rankings):
            hits = sum(1 for y, r in zip(labels, rankings) if y in list(r)[:k])
            out[f"top{k}_accuracy"] = hits / len(labels)
    return out


def normalize_exact(text: str) -> str:
    """Exact-match normalisation for short chat answers: lower-case, strip spaces and a final period."""
    return text.strip().lower().rstrip(".").strip()


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str]) -> dict:
    """Exact-match accuracy (as a fraction in [0, 1]) after `normalize_exact` on both sides."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("no predictions to score")
    correct = sum(normalize_exact(p) == normalize_exact(a) for p, a in zip(predictions, answers))
    return {"accuracy": correct / len(answers), "correct": int(correct), "n": len(answers)}
