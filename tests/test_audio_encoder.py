"""The frozen audio encoders (lmm.encoders.audio): a clip is one media item whose frames are its 30 s windows.

A tiny random Whisper encoder + a tiny random LM: preprocess cuts a clip into windows (never truncates), the
model places the clip by its `<audio>` marker, gate 0 is the bare LM, and save/reload keeps the logits."""

import numpy as np
import pytest
import torch

from lmm.config import ConfigError, EncoderConfig
from lmm.encoders import build_encoder
from lmm.model import LMM
from lmm.testing import tiny_audio_config, tiny_lmm_config, tiny_tokenizer
from tests.test_fusion import bare_copy

SR = 16_000


def _tone(seconds: float, hz: float, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.RandomState(seed).randn(t.size) * 0.01
    return (0.3 * np.sin(2 * np.pi * hz * t) + noise).astype(np.float32)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder("audio", tiny_audio_config(pool=4, max_chunks=3))


def _model(gates: float, seed: int = 0) -> LMM:
    torch.manual_seed(seed)
    cfg = tiny_lmm_config("llama", "flamingo")
    cfg.encoders = {"audio": tiny_audio_config(pool=4)}
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu").eval()
    with torch.no_grad():
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(gates)
            blk.ff_gate.fill_(gates)
    return model


def test_a_70_s_clip_is_three_30_s_windows_and_each_window_is_its_own_slice(encoder):
    clip = _tone(70, 440)
    feats = encoder.preprocess(clip)
    assert feats.shape == (3, 80, 3000)  # ceil(70 / 30) windows of 80 mel bins x 3000 frames (10 ms each)
    # window 2 holds exactly seconds 30..60 (a cut, not a resampling), window 3 the last 10 s padded with silence
    torch.testing.assert_close(feats[1], encoder.preprocess(clip[30 * SR : 60 * SR])[0])
    torch.testing.assert_close(feats[2], encoder.preprocess(clip[60 * SR :])[0])
    assert encoder.preprocess(_tone(30, 440)).shape[0] == 1 and encoder.preprocess(_tone(30.01, 440)).shape[0] == 2
    out = encoder(feats)
    assert out.shape == (3, 1500 // 4, encoder.dim) == (3, encoder.tokens_per_chunk, 16)
    assert encoder.sampling_rate == SR and encoder.token == "<audio>" and not encoder.weights_from_path
    # pool: 4 is the mean of every 4 positions of the unpooled encoder
    full = encoder.model(input_features=feats[:1]).last_hidden_state
    torch.testing.assert_close(out[:1], full.view(1, 375, 4, 16).mean(2))


def test_a_clip_longer_than_max_chunks_is_refused_naming_the_limit(encoder):
    with pytest.raises(
        ValueError, match=r"91\.0 s is 4 windows of 30 s, more than encoders\.audio\.options\.max_chunks=3"
    ):
        encoder.preprocess(_tone(91, 440))
    with pytest.raises(ValueError, match="mono samples"):
        encoder.preprocess(np.zeros((2, 100), np.float32))


def test_bad_options_are_config_errors():
    opts = dict(tiny_audio_config().options)
    with pytest.raises(ConfigError, match="pool=7 must divide Whisper's 1500"):
        build_encoder("audio", EncoderConfig(kind="whisper", options={**opts, "pool": 7}))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['pooling'\]"):
        build_encoder("audio", EncoderConfig(kind="whisper", options={**opts, "pooling": 4}))
    with pytest.raises(ConfigError, match="exactly one of path"):
        build_encoder("audio", EncoderConfig(kind="whisper", options={"pool": 4}))
    with pytest.raises(ConfigError, match="folder not found"):
        build_encoder("audio", EncoderConfig(kind="whisper", options={"path": "/no/such/whisper"}))


def test_gate_zero_is_the_bare_lm_and_open_gates_hear_the_clip():
    model = _model(gates=0.0, seed=1)
    bare = bare_copy(model, "llama")
    ids = model.tokenizer(["<audio>the answer is yes"], return_tensors="pt").input_ids
    enc = model.encoders["audio"]
    a = enc.preprocess(_tone(40, 440))[None, None]  # (B=1, M=1, F=2 windows, 80, 3000)
    b = enc.preprocess(_tone(40, 1200, seed=1))[None, None]
    with torch.no_grad():
        got = model(ids, media_inputs={"audio": a}).logits
        want = bare(inputs_embeds=model.embed(ids)).logits
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(1.0)
            blk.ff_gate.fill_(1.0)
        opened_a = model(ids, media_inputs={"audio": a}).logits
        opened_b = model(ids, media_inputs={"audio": b}).logits
    old = torch.ones(want.shape[-1], dtype=torch.bool)
    old[[model.image_token_id, model.eoc_token_id, model.media_token_ids["audio"]]] = False
    torch.testing.assert_close(got[..., old], want[..., old], atol=1e-5, rtol=0)
    assert (opened_a - opened_b).abs().max() > 1e-4  # with open gates, which clip it is changes the logits


def test_save_and_reload_give_identical_logits_with_audio(tmp_path):
    model = _model(gates=0.5, seed=2)
    ids = model.tokenizer(["a photo of a red circle<audio>the answer is"], return_tensors="pt").input_ids
    clip = model.encoders["audio"].preprocess(_tone(35, 660))[None, None]
    model.save_pretrained(tmp_path / "m")
    again = LMM.from_pretrained(tmp_path / "m", device="cpu").eval()
    assert again.config.encoders["audio"].kind == "whisper"
    with torch.no_grad():
        torch.testing.assert_close(
            again(ids, media_inputs={"audio": clip}).logits, model(ids, media_inputs={"audio": clip}).logits
        )


def test_hf_audio_wav2vec2_windows_and_pooling():
    options = {
        "hf_config": {
            "model_type": "wav2vec2",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "conv_dim": [16, 16],
            "conv_stride": [5, 4],
            "conv_kernel": [10, 4],
            "num_feat_extract_layers": 2,
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
        },
        "chunk_seconds": 2.0,
        "pool": 2,
    }
    torch.manual_seed(0)
    enc = build_encoder("audio", EncoderConfig(kind="hf_audio", options=options))
    feats = enc.preprocess(_tone(5, 440))
    assert feats.shape == (3, 2 * SR)  # raw-waveform models: windows of chunk_seconds, the last zero-padded
    out = enc(feats)
    assert out.shape == (3, enc.tokens_per_chunk, 16) and enc.tokens_per_chunk == (2 * SR // 20 - 1) // 2 + 1


def test_hf_audio_ast_windows_are_exactly_its_max_length_frames():
    options = {
        "hf_config": {
            "model_type": "audio-spectrogram-transformer",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_length": 128,
            "num_mel_bins": 32,
        },
        "feature_extractor": {"max_length": 128, "num_mel_bins": 32},
    }
    torch.manual_seed(0)
    enc = build_encoder("audio", EncoderConfig(kind="hf_audio", options=options))
    window = enc.chunk_samples
    assert window == 127 * 160 + 400  # 128 frames of 25 ms every 10 ms: nothing the extractor would cut off
    clip = _tone(3.0, 440)
    feats = enc.preprocess(clip)
    assert feats.shape == (3, 128, 32)
    torch.testing.assert_close(feats[1], enc.preprocess(clip[window : 2 * window])[0])
    assert enc(feats).shape == (3, enc.tokens_per_chunk, 16)
