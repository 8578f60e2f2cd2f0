"""easy-vqa: the embedded demo benchmark (exact-match accuracy of an instruction-tuned model).

The demo model is trained on LLaVA-style conversations ("<image>\\n{question}" -> "{answer}", see
`lmm.data.easyvqa`), so it is asked the same way: one user turn with the image and the question,
rendered by the tokenizer's chat template through `LMM.render_chat`, exactly as
`LMM.chat` does. With shots > 0 the demonstrations are earlier user/assistant turns.

`evaluate_easy_vqa` is the entry point the training demo calls; `lmm eval --tasks easyvqa` runs the
very same code (harness task "easyvqa"), so both report the same number for the same model,
`limit` and `seed`.

Subset: the 9,673 test questions are shuffled with `random.Random(seed)`; `limit=N` scores the first
N of that order (a fixed, seeded random subset); `limit=None` scores all of them.
"""

from __future__ import annotations

# How the answer is generated: greedy, short, stopping at the chat template's end-of-turn / EOS.
GENERATION = {"max_new_tokens": 8, "num_beams": 1, "stop_at_end_of_chunk": False, "add_special_tokens": False}


def build_easy_vqa_messages(question: str, image, demos=()) -> list[dict]:
    """OpenAI-style messages: each demo (image, question, answer) as a solved turn, then the question."""
    messages = []
    for d_image, d_question, d_answer in demos:
        messages.append({"role": "user", "content": [{"type": "image", "image": d_image},
                                                     {"type": "text", "text": d_question}]})
        messages.append({"role": "assistant", "content": d_answer})
    messages.append({"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question}]})
    return messages


def easy_vqa_prompt(model, query, demos=()) -> tuple[str, list]:
    """(prompt text, images in order) for one easy-vqa `Sample` and its demonstration `Sample`s."""
    messages = build_easy_vqa_messages(query.question, query.image, [(d.image, d.question, d.target) for d in demos])
    return model.render_chat(messages)  # the model's own default system prompt, as in LMM.chat


def evaluate_easy_vqa(model, limit: int | None = None, seed: int = 0, batch_size: int = 32, shots: int = 0,
                      progress: bool = False, max_new_tokens: int | None = None) -> dict:
    """Exact-match accuracy of `model` on the easy-vqa test questions.

    `max_new_tokens` overrides GENERATION's 8 (as `lmm eval --max-new-tokens` does).
    Returns {"accuracy": fraction in [0, 1], "accuracy_pct": the x100 number `lmm eval` prints,
    "correct", "n", "subset": how the questions were chosen, "predictions": per-question records}.
    """
    from .harness import EvalConfig, evaluate

    cfg = EvalConfig(tasks=["easyvqa"], shots=[shots], limit=limit, seed=seed, batch_size=batch_size, trials=1,
                     out=None, progress=progress, max_new_tokens=max_new_tokens)
    report = evaluate(model, cfg)
    r = report["results"]["easyvqa"][str(shots)]
    trial = r["trials"][0]
    n = trial["n"]
    subset = ("all 9,673 test questions" if limit is None or limit >= 9673
              else f"{n} test questions: the first {n} after shuffling with random.Random({seed})")
    return {"accuracy": trial["metrics"]["correct"] / n, "accuracy_pct": trial["metrics"]["accuracy"],
            "correct": trial["metrics"]["correct"], "n": n, "subset": subset, "predictions": trial["predictions"]}
