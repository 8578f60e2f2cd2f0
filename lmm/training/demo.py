"""The embedded default run: lmm-tiny (frozen EfficientNet-Lite0 + frozen SmolLM2-135M-Instruct) learns easy-vqa
on a CPU in minutes, then reports its test accuracy next to a blind baseline (the same model, no image).

`python train.py --config configs/demo.yaml` runs it through the normal trainer; what makes it cheap is
`frozen_cache: true` (see lmm/training/frozen_cache.py).
"""

from __future__ import annotations

from typing import Callable

from lmm.config import ConfigError
from lmm.training.frozen_cache import CachedConversationBatches, ConversationSample


def easyvqa_conversations(split: str) -> list[ConversationSample]:
    """Every easy-vqa question of a split as a one-turn conversation, exactly as `lmm.data.easyvqa.vqa_record`."""
    from lmm.data.easyvqa import easyvqa_samples

    return [ConversationSample(s["image"], [{"role": "user", "content": f"<image>\n{s['question']}"},
                                            {"role": "assistant", "content": s["answer"]}])
            for s in easyvqa_samples(split)]


def cached_batches(cfg, model, log: Callable[[str], None] = print) -> CachedConversationBatches:
    """The frozen-cache batch source for a config whose datasets are easy-vqa conversations."""
    import time

    datasets = [d for st in cfg.data.resolved_stages() for d in st.datasets]
    if not datasets or any(d.source != "easyvqa" or d.easyvqa_task != "vqa" for d in datasets):
        raise ConfigError("frozen_cache: true supports easy-vqa conversation data only "
                          "({source: easyvqa, easyvqa_task: vqa}); set frozen_cache: false for other data")
    samples = [s for d in datasets for s in easyvqa_conversations(d.path or "train")]
    t = time.perf_counter()
    batches = CachedConversationBatches(model, samples, cfg.data.batch_size, seed=cfg.seed,
                                       balance_answers=cfg.balance_answers)
    log(f"frozen cache: {batches.num_images} images and {batches.num_sequences} distinct texts precomputed for "
        f"{len(samples)} samples in {time.perf_counter() - t:.0f} s")
    return batches


def easyvqa_evaluator(limit: int | None, seed: int = 0, batch_size: int = 64, blind: bool = True) -> Callable:
    """evaluate(model) -> {"easyvqa_acc", "blind_acc", "n"}: exact-match accuracy on a seeded test subset
    (the same numbers `lmm eval --tasks easyvqa --limit N --seed S` reports), and the same questions asked
    without the image."""

    def evaluate(model) -> dict:
        from lmm.eval import evaluate_easy_vqa
        from lmm.eval.metrics import normalize_exact
        from lmm.eval.tasks import load_easyvqa

        r = evaluate_easy_vqa(model, limit=limit, seed=seed, batch_size=batch_size)
        out = {"easyvqa_acc": 100 * r["accuracy"], "n": r["n"]}
        if blind:
            by_id = {s.id: s for s in load_easyvqa().test}
            qs = [by_id[p["id"]] for p in r["predictions"]]
            # without an image, greedy answers depend on the question text alone: ask each distinct one once
            distinct = sorted({s.question for s in qs})
            answers: dict[str, str] = {}
            for i in range(0, len(distinct), batch_size):
                chunk = distinct[i:i + batch_size]
                outs = model.chat([[{"role": "user", "content": q}] for q in chunk], max_new_tokens=8)
                answers.update(zip(chunk, outs))
            correct = sum(normalize_exact(answers[s.question]) == normalize_exact(s.target) for s in qs)
            out["blind_acc"] = 100 * correct / len(qs)
            out["blind_choice_acc"] = 100 * blind_choice_accuracy(model, qs, distinct)
        print(f"easy-vqa test accuracy: {out['easyvqa_acc']:.1f}% on {r['subset']}"
              + (f"; blind baseline (same model, no image): {out['blind_acc']:.1f}% answering freely, "
                 f"{out['blind_choice_acc']:.1f}% picking the likeliest of the 13 answers" if blind else ""), flush=True)
        return out

    return evaluate


def blind_choice_accuracy(model, questions, distinct: list[str]) -> float:
    """Accuracy when the image-less model picks the likeliest of the 13 answers (a closed-vocabulary blind
    baseline: what the text prior alone gets)."""
    from lmm.data.easyvqa import answers

    classes = answers()
    prompts = [model.render_chat([{"role": "user", "content": q}])[0] for q in distinct]
    scores = model.score(prompts, [[] for _ in prompts], classes, batch_size=128)  # (questions, 13)
    pick = {q: classes[int(i)] for q, i in zip(distinct, scores.argmax(1))}
    return sum(pick[s.question] == s.target for s in questions) / len(questions)
