"""A new modality is an encoder registered by kind plus a config entry: no edit to the model class.

The toy "audio" encoder below is defined and registered in this file alone; the model places its media by its
own marker token, resamples it with its own resampler, and fuses it like images (deep and early fusion)."""

import pytest
import torch
from torch import nn

from lmm.config import ConfigError, EncoderConfig
from lmm.encoders import ENCODERS
from lmm.model import LMM
from lmm.testing import tiny_lmm_config, tiny_tokenizer


class ToyAudio(nn.Module):
    """Frozen: a clip of 16 samples -> 4 feature vectors of width 24 (a fixed random linear map)."""

    def __init__(self, modality: str, cfg: EncoderConfig):
        super().__init__()
        self.dim = 24
        self.proj = nn.Linear(16, 4 * self.dim)
        self.preprocess = torch.as_tensor

    def forward(self, clips: torch.Tensor) -> torch.Tensor:  # (n, 16) -> (n, 4, 24)
        return self.proj(clips.float()).view(len(clips), 4, self.dim)


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(ENCODERS, "toy", ToyAudio)


def _model(bridge: str, gates: float = 0.5) -> LMM:
    torch.manual_seed(0)
    cfg = tiny_lmm_config("llama", bridge)
    cfg.encoders = {"audio": EncoderConfig(kind="toy")}
    model = LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu").eval()
    with torch.no_grad():
        for blk in model.xattn_blocks():
            blk.attn_gate.fill_(gates)
            blk.ff_gate.fill_(gates)
    return model


def _inputs(model: LMM, seed: int = 0):
    tok = model.tokenizer
    ids = tok(["<image>a photo of a red circle<audio>the answer is yes"], return_tensors="pt")["input_ids"]
    g = torch.Generator().manual_seed(seed)
    return (
        ids,
        torch.rand(1, 1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        {"audio": torch.randn(1, 1, 1, 16, generator=g)},
    )


@pytest.mark.parametrize("bridge", ["flamingo", "qformer"])
def test_toy_modality_is_placed_by_its_marker_and_changes_only_later_tokens(toy_kind, bridge):
    model = _model(bridge)
    assert set(model.encoders) == {"image", "audio"} and set(model.resamplers) == {"image", "audio"}
    ids, pix, audio = _inputs(model)
    audio_pos = int((ids[0] == model.media_token_ids["audio"]).nonzero())
    with torch.no_grad():
        a = model(ids, pixel_values=pix, media_inputs=audio).logits
        b = model(ids, pixel_values=pix, media_inputs=_inputs(model, seed=1)[2]).logits
    if bridge == "qformer":  # the audio marker expands into 4 query tokens (the image's too): shift positions
        audio_pos += 4 - 1
    torch.testing.assert_close(a[:, :audio_pos], b[:, :audio_pos])  # before the clip: unaffected
    assert (a[:, audio_pos:] - b[:, audio_pos:]).abs().max() > 1e-4  # at and after it: the clip matters


def test_toy_modality_trains_its_own_resampler_and_round_trips(toy_kind, tmp_path):
    model = _model("flamingo")
    ids, pix, audio = _inputs(model)
    model.train()
    model(ids, pixel_values=pix, media_inputs=audio, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.resamplers["audio"].parameters())
    assert not any(p.requires_grad for p in model.encoders["audio"].parameters())
    model.eval()
    model.save_pretrained(tmp_path / "m")
    again = LMM.from_pretrained(tmp_path / "m", device="cpu").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again(ids, pixel_values=pix, media_inputs=audio).logits,
            model(ids, pixel_values=pix, media_inputs=audio).logits,
        )


def test_unknown_kind_and_mismatched_media_shapes_are_config_errors(toy_kind):
    cfg = tiny_lmm_config("llama", "flamingo")
    cfg.encoders = {"audio": EncoderConfig(kind="whisperish")}
    with pytest.raises(ConfigError, match="not a known encoder kind"):
        LMM.from_config(cfg, tokenizer=tiny_tokenizer(), device="cpu")
    model = _model("projector")  # the projector keeps every token: 17 image tokens vs 4 audio ones
    ids, pix, audio = _inputs(model)
    with pytest.raises(ConfigError, match="same shape"):
        model(ids, pixel_values=pix, media_inputs=audio)
