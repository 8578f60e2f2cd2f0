"""The embedded default run: lmm-tiny (frozen EfficientNet-Lite0 + frozen SmolLM2-135M-Instruct) learns easy-vqa
on a CPU in minutes, then reports its test accuracy next to a blind baseline (the same model, no image).

`python train.py --config configs/demo.yaml` runs it through the normal trainer; what makes it cheap is
`frozen_cache: true` (see lmm/training/frozen_cache.py).
"""

from __future__ import annotations

from typing import Callable

import torch

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
    batches = CachedConversationBatches(model, samples, cfg.data.batch_size, seed=cfg.seed)
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
            correct = 0
            for i in range(0, len(qs), batch_size):
                chunk = qs[i:i + batch_size]
                answers = model.chat([[{"role": "user", "content": s.question}] for s in chunk], max_new_tokens=8)
                correct += sum(normalize_exact(a) == normalize_exact(s.target) for a, s in zip(answers, chunk))
            out["blind_acc"] = 100 * correct / len(qs)
        print(f"easy-vqa test accuracy: {out['easyvqa_acc']:.1f}% on {r['subset']}"
              + (f"; blind baseline (same model, no image): {out['blind_acc']:.1f}%" if blind else ""), flush=True)
        return out

    return evaluate


def set_cpu_threads() -> None:
    """Use every core for the math: torch's default can be lower than the machine has."""
    import os

    n = os.cpu_count() or 1
    if torch.get_num_threads() < n:
        torch.set_num_threads(n)
