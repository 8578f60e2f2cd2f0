"""The frozen cache with audio: each distinct clip decoded and encoded once, and its batches give the same
features and logits as the full forward over the raw clips (real recordings: Debian's Asterisk digits)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm.config import ConfigError
from lmm.data.audio import decode_audio, write_audio
from lmm.data.config import DataConfig, DatasetConfig
from lmm.inputs import audio_items
from lmm.testing import tiny_lmm, tiny_media_lmm
from lmm.training.frozen_cache import CachedConversationBatches, dataset_samples

DIGITS = Path("/usr/share/asterisk/sounds/en_US_f_Allison/digits")
pytestmark = pytest.mark.skipif(not DIGITS.is_dir(), reason="apt install asterisk-core-sounds-en-wav")
WORDS = ["zero", "one", "two"]


def _data(tmp_path) -> DataConfig:
    """Three real 8 kHz recordings, a 2-window clip (digit + 31 s of silence), and a corrupt one, each asked twice
    (every row's text names its clip, so a test can find the clip of a row)."""
    clips = [str(DIGITS / f"{d}.wav") for d in range(3)]
    long = decode_audio(clips[1], 16_000)
    write_audio(tmp_path / "long.wav", np.concatenate([long, np.zeros(31 * 16_000, np.float32)]), 16_000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    rows = []
    for path, word in [*zip(clips, WORDS), (str(tmp_path / "long.wav"), "one"), ("bad.wav", "two")]:
        for q in ("Which number is said?", "What digit?"):
            q += " (long)" if path.endswith("long.wav") else ""
            conv = [{"from": "human", "value": f"<audio>\n{q}"}, {"from": "gpt", "value": word}]
            rows.append({"audio": path, "conversations": conv})
    (tmp_path / "clips.json").write_text(json.dumps(rows))
    ds = DatasetConfig(path=str(tmp_path / "clips.json"), format="conversation", image_root=str(tmp_path))
    return DataConfig(datasets=[ds], batch_size=4, max_tokens=64)


def _count_chunks(model):
    seen = []
    model.encoders["audio"].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    return seen


def test_cached_audio_batches_equal_the_full_forward_and_encode_each_clip_once(tmp_path):
    torch.set_num_threads(1)
    model = tiny_media_lmm(gates=0.7, pool=50, max_chunks=2)
    logs = []
    samples = dataset_samples(_data(tmp_path), model, log=logs.append)
    assert len(samples) == 8 and "corrupt_audio" in logs[0]  # the corrupt clip's two records: skipped, counted
    seen = _count_chunks(model)
    source = CachedConversationBatches(model, samples, batch_size=4, seed=0, feature_batch=2)
    assert source.num_media == {"audio": 4} and sum(seen) == 3 + 2  # 3 one-window clips + the 2-window clip
    it = iter(source)
    batches = [next(it) for _ in range(6)]  # three epochs
    assert sum(seen) == 5  # nothing encoded again
    long_rows = 0
    for batch in batches:
        feats = batch["media_features"]["audio"]  # (B, 1, F, N, D)
        assert "vision_features" not in batch and "pixel_values" not in batch
        raw, chunks = [], []
        for row in batch["input_ids"]:
            text = model.tokenizer.decode(row)
            i = next(j for j, s in enumerate(samples) if s.input_ids == tuple(row[: len(s.input_ids)].tolist()))
            items = audio_items(model, "audio", samples[i].media[0])  # the loader's decode + preprocess
            raw.append(items)
            chunks.append(items.shape[0])
            assert "<audio>" in text
        F = max(chunks)
        long_rows += chunks.count(2)
        media_inputs = torch.zeros(len(raw), 1, F, *raw[0].shape[1:])
        for r, x in enumerate(raw):
            media_inputs[r, 0, : x.shape[0]] = x
        mask = batch.get("media_frame_mask", {}).get("audio")
        assert (mask is not None) == (len(set(chunks)) > 1)  # a mask exactly when chunk counts differ
        with torch.no_grad():
            want = model.media_features("audio", media_inputs)
            for r, n in enumerate(chunks):
                torch.testing.assert_close(feats[r, 0, :n], want[r, 0, :n], atol=1e-5, rtol=1e-5)
            fast = model(**batch)
            full = model(
                batch["input_ids"],
                batch["attention_mask"],
                labels=batch["labels"],
                media_inputs={"audio": media_inputs},
                media_frame_mask=None if mask is None else {"audio": mask},
            )
        real = batch["attention_mask"].bool()  # padded positions' logits are never used
        torch.testing.assert_close(fast.logits[real], full.logits[real], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.loss, full.loss, atol=1e-5, rtol=1e-5)
    assert long_rows > 0  # the padded, masked path was exercised
    # the clip changes the answer: another clip's features give other logits
    b = batches[0]
    other = dict(b, media_features={"audio": b["media_features"]["audio"].roll(1, 0)})
    other.pop("media_frame_mask", None)
    with torch.no_grad():
        diff = (model(**other).logits - model(**{**b, "media_frame_mask": None}).logits).abs()
    assert diff[b["attention_mask"].bool()].max() > 1e-2


def test_audio_the_model_cannot_take_is_a_counted_skip_or_a_config_error(tmp_path):
    data = _data(tmp_path)
    with pytest.raises(ConfigError, match=r"(?s)no usable sample.*no_encoder: 10"):
        dataset_samples(data, tiny_lmm(seed=3), log=lambda m: None)  # an image-only model
    model = tiny_media_lmm(pool=50, max_chunks=1)
    logs = []
    samples = dataset_samples(data, model, log=logs.append)
    assert len(samples) == 6 and "audio_too_long" in logs[0]  # the 2-window clip, over max_chunks=1
    with pytest.raises(ConfigError, match=r"would hold .* audio clips .* over the bound of 1\.0 KiB"):
        CachedConversationBatches(model, samples, batch_size=4, max_bytes=1024)
