"""Held-out conversation sets with audio clips (`"audio"` paths, `<audio>` markers): each clip reaches
`model.generate` at its marker, the blind baseline asks without it, and the score is the hand count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmm.eval.conversation import ConversationTask, read_conversation_file, without_media
from lmm.eval.harness import evaluate_task
from lmm.inputs import Audio

DIGITS = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")
pytestmark = pytest.mark.skipif(not DIGITS.is_dir(), reason="apt install asterisk-core-sounds-en-wav")
WORDS = ["zero", "one", "two"]


def test_audio_conversations_are_asked_with_their_clips_and_blind_without(tmp_path):
    from lmm.testing import tiny_media_lmm

    rows = [
        {
            "audio": f"{d}.wav",
            "conversations": [{"from": "human", "value": "<audio>\nWhich number?"}, {"from": "gpt", "value": w}],
        }
        for d, w in enumerate(WORDS)
    ]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    data = read_conversation_file(str(tmp_path / "test.json"), image_root=str(DIGITS))
    assert [s.media for s in data.test] == [(Audio(str(DIGITS / f"{d}.wav")),) for d in range(3)]
    assert without_media(list(data.test[0].messages))[0]["content"] == "Which number?"
    model = tiny_media_lmm(gates=1.0)
    task = ConversationTask.from_file(
        str(tmp_path / "test.json"), metric="exact_match", candidates=WORDS, image_root=str(DIGITS)
    )
    r = evaluate_task(model, task, blind=True)
    answers = []
    for s in data.test:  # the same prompts by hand
        prompt, _ = model.render_chat(list(s.messages))
        answers.append(model.generate(prompt, [s.media[0]], max_new_tokens=8, stop_at_end_of_chunk=False).strip())
    assert sorted(p["prediction"] for p in r["predictions"]) == sorted(answers)
    hand = 100.0 * sum(a == s.target for a, s in zip(answers, data.test)) / 3
    assert r["metrics"]["accuracy"] == pytest.approx(hand)
    assert r["blind"]["candidates"] == 3 and "choice_accuracy" in r["blind"]
    # ranked by likelihood, each clip gives its own scores: the clip reached the model
    choice = ConversationTask.from_file(str(tmp_path / "test.json"), metric="choice", image_root=str(DIGITS))
    scores = [tuple(p["logprobs"]) for p in evaluate_task(model, choice)["predictions"]]
    assert len(set(scores)) == 3
