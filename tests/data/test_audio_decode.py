"""Audio decoding (lmm.data.audio): real recordings, resampling properties, every container we write, and bad
inputs each skipped under its own reason, quickly (a 10-hour header is refused before anything is decoded)."""

from __future__ import annotations

import glob
import importlib.util
import os
import time
import wave

import numpy as np
import pytest

from lmm.data.audio import decode_audio, encode_audio, resample, write_audio
from lmm.data.errors import REASONS, BadSample

ALLISON = "/usr/share/asterisk/sounds/en_US_f_Allison"
ASTERISK = sorted(glob.glob(f"{ALLISON}/digits/*.wav"))[:6] + [f"{ALLISON}/demo-congrats.wav"]
needs_asterisk = pytest.mark.skipif(
    not os.path.isfile(f"{ALLISON}/demo-congrats.wav"),
    reason="apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en (see .ci/run)",
)
_spoken = importlib.util.find_spec("spokennumbers")
SPOKEN = sorted(glob.glob(os.path.join(os.path.dirname(_spoken.origin), "default", "[0-9].wav"))) if _spoken else []
needs_spoken = pytest.mark.skipif(not SPOKEN, reason="pip install spokennumbers (the dev extra)")


def _wave_samples(path: str) -> tuple[np.ndarray, int]:
    """An independent reader (the stdlib `wave` module): 16-bit PCM -> float in [-1, 1), channels averaged."""
    with wave.open(path) as w:
        assert w.getsampwidth() == 2
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768
        return x.reshape(-1, w.getnchannels()).mean(1), w.getframerate()


def _tone(seconds: float, hz: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def _peak_hz(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


@needs_asterisk
@pytest.mark.parametrize("path", ASTERISK, ids=os.path.basename)
def test_real_8khz_recordings_decode_exactly_and_resample_keeping_their_length(path):
    ref, rate = _wave_samples(path)
    assert rate == 8000
    native = decode_audio(path, sampling_rate=8000)
    np.testing.assert_array_equal(native, ref)  # no resampling at the native rate: the PCM itself
    up = decode_audio(path)  # 16 kHz, what Whisper wants
    assert up.dtype == np.float32 and up.ndim == 1
    assert abs(up.size - 2 * ref.size) <= 2  # duration kept to within a sample or two
    assert abs(np.sqrt(np.mean(up**2)) - np.sqrt(np.mean(ref**2))) < 0.05 * np.sqrt(np.mean(ref**2))


@needs_spoken
@pytest.mark.parametrize("path", SPOKEN[:4], ids=os.path.basename)
def test_real_44khz_recordings_resample_to_16k(path):
    ref, rate = _wave_samples(path)
    assert rate == 44100
    np.testing.assert_array_equal(decode_audio(path, sampling_rate=44100), ref)
    down = decode_audio(path)
    assert abs(down.size - ref.size * 16000 / 44100) <= 2
    assert np.abs(down).max() <= 1.0 + 1e-3


@pytest.mark.parametrize("rate,hz", [(8000, 440.0), (44100, 1000.0), (22050, 3000.0)])
def test_a_pure_tone_keeps_its_frequency_amplitude_and_duration_after_resampling(rate, hz):
    x = _tone(2.0, hz, rate)
    y = resample(x, rate, 16000)
    assert abs(y.size - 32000) <= 2
    assert abs(_peak_hz(y, 16000) - hz) <= 16000 / y.size  # within one FFT bin (0.5 Hz)
    steady = y[1000:-1000]  # away from the filter's edges
    assert abs(np.sqrt(np.mean(steady**2)) - 0.5 / np.sqrt(2)) < 0.01
    # the same through a file and through an HF `Audio` dict (array + its own rate)
    np.testing.assert_allclose(decode_audio({"array": x, "sampling_rate": rate}), y, atol=1e-6)
    np.testing.assert_allclose(decode_audio(encode_audio(x, rate, "flac")), y, atol=1e-3)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "ogg", "m4a"])
def test_every_container_decodes_to_the_same_length_mono_16k(fmt, tmp_path):
    x = _tone(1.5, 440, 16000)
    path = tmp_path / f"clip.{fmt}"
    write_audio(path, x, 16000)
    y = decode_audio(str(path))
    slack = 1024 if fmt == "m4a" else 0  # AAC priming samples that FFmpeg leaves in
    assert x.size <= y.size <= x.size + slack
    shift = 0 if fmt != "m4a" else int(np.argmax(np.correlate(y[:2048], x[:1024], "valid")))
    corr = np.corrcoef(x[:-2048], y[shift : shift + x.size - 2048])[0, 1]
    assert corr > (0.9999 if fmt in ("wav", "flac") else 0.98)
    assert abs(_peak_hz(y, 16000) - 440) <= 1.0
    # a Path, bytes and an HF Audio(decode=False) dict give the same samples
    np.testing.assert_array_equal(decode_audio(path), y)
    np.testing.assert_array_equal(decode_audio({"bytes": path.read_bytes(), "path": None}), y)
    np.testing.assert_array_equal(decode_audio({"path": f"clip.{fmt}"}, root=str(tmp_path)), y)


def test_channels_are_averaged_and_integer_arrays_are_scaled():
    x = _tone(1.0, 440, 16000)
    same = decode_audio(encode_audio(np.stack([x, x]), 16000, "wav"))
    np.testing.assert_allclose(same, decode_audio(encode_audio(x, 16000, "wav")), atol=1e-4)
    opposite = decode_audio(encode_audio(np.stack([x, -x]), 16000, "wav"))
    assert np.abs(opposite).max() < 1e-3  # the mean of L and R, not a sum or the left channel
    pcm = (x * 32767).astype(np.int16)
    np.testing.assert_allclose(decode_audio((16000, pcm)), x, atol=1e-4)  # Gradio's (rate, int16) tuple
    np.testing.assert_allclose(decode_audio(np.stack([pcm, pcm], 1)), x, atol=1e-4)  # (n, channels)


def _mp3_with_frame_count(seconds: float, frames_scale: float) -> bytes:
    """An mp3 whose Xing/Info header claims `frames_scale` times its real number of frames."""
    data = bytearray(encode_audio(_tone(seconds, 440, 16000), 16000, "mp3"))
    k = data.find(b"Info") if b"Info" in data else data.find(b"Xing")
    frames = int.from_bytes(data[k + 8 : k + 12], "big")
    data[k + 8 : k + 12] = int(frames * frames_scale).to_bytes(4, "big")
    return bytes(data)


def test_overlong_audio_is_refused_from_the_header_or_by_a_bounded_decode(monkeypatch):
    ten_hours = _mp3_with_frame_count(5.0, 7200)  # a 5 s file whose header says 10 hours
    t = time.perf_counter()
    with pytest.raises(BadSample, match="read from the header, nothing decoded") as e:
        decode_audio(ten_hours)
    assert e.value.reason == "audio_too_long" and time.perf_counter() - t < 1.0
    understated = _mp3_with_frame_count(5.0, 0.2)  # says 1 s, holds 5 s
    with pytest.raises(BadSample, match="decoding stopped at the limit") as e:
        decode_audio(understated, max_seconds=3)
    assert e.value.reason == "audio_too_long"
    monkeypatch.setenv("LMM_MAX_AUDIO_SECONDS", "1")
    for value in (
        encode_audio(_tone(2, 440, 16000), 16000, "wav"),
        {"array": _tone(2, 440, 8000), "sampling_rate": 8000},
    ):
        with pytest.raises(BadSample) as e:
            decode_audio(value)
        assert e.value.reason == "audio_too_long"
    assert decode_audio(encode_audio(_tone(0.9, 440, 16000), 16000, "wav")).size == 14400


def test_bad_inputs_each_give_their_reason(tmp_path, monkeypatch):
    from PIL import Image

    good = {fmt: encode_audio(_tone(2.0, 440, 16000), 16000, fmt) for fmt in ("wav", "flac", "mp3", "m4a")}
    png = tmp_path / "image.png"
    Image.new("RGB", (8, 8)).save(png)
    (tmp_path / "empty.wav").write_bytes(b"")
    cases = {
        "empty_audio": [
            b"",
            {"bytes": b""},
            str(tmp_path / "empty.wav"),
            {"array": np.zeros(0), "sampling_rate": 8000},
        ],
        "missing_audio": [
            None,
            str(tmp_path / "nope.wav"),
            "https://example.com/a.wav",
            {"path": None},
            {"array": None},
        ],
        "corrupt_audio": [
            b"RIFF but not really a wave file" * 20,
            png.read_bytes(),  # a real file of another kind: no audio stream
            good["wav"][: len(good["wav"]) // 2],
            good["flac"][: len(good["flac"]) // 2],
            good["mp3"][: len(good["mp3"]) // 2],
            good["m4a"][: len(good["m4a"]) // 2],
            np.full(100, np.nan, np.float32),
            {"array": np.zeros(10), "sampling_rate": -1},
            np.zeros((2, 3, 4), np.float32),
        ],
    }
    for reason, values in cases.items():
        assert reason in REASONS
        for value in values:
            t = time.perf_counter()
            with pytest.raises(BadSample) as e:
                decode_audio(value)
            assert e.value.reason == reason, (reason, repr(value)[:80], str(e.value))
            assert time.perf_counter() - t < 2.0
    monkeypatch.setenv("LMM_MAX_MEMBER_BYTES", "1000")
    (tmp_path / "big.wav").write_bytes(good["wav"])
    with pytest.raises(BadSample) as e:
        decode_audio(str(tmp_path / "big.wav"))
    assert e.value.reason == "member_too_large"
