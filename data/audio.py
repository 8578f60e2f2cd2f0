"""Audio decoding from whatever a record holds (bytes, a path, an HF `Audio` dict, an array), with PyAV.

`decode_audio(value)` -> float32 mono samples (n,) at the wanted rate (16 kHz by default, what Whisper-style
encoders expect). Channels are averaged (as librosa/torchaudio users do), resampling is libswresample's
(through PyAV's `AudioResampler`). Every failure is a `BadSample` with a precise reason, so a corrupt, empty,
missing or overlong clip skips its sample instead of stopping the run.

Untrusted bytes, three rules:
  - files and shard members above `max_member_bytes()` (LMM_MAX_MEMBER_BYTES) are not read: "member_too_large";
  - a clip longer than `max_audio_seconds()` (default 600 s, env LMM_MAX_AUDIO_SECONDS) is refused from its
    container header before anything is decoded, and a header that lies is caught by a bounded decode that
    stops as soon as the limit is passed: "audio_too_long" (a 10-hour clip is never decoded whole);
  - any exception a decoder raises on hostile bytes is "corrupt_audio", never a crash of the run.
"""

from __future__ import annotations

import io
import os

import numpy as np

from .errors import BadSample
from .media import env_limit, read_media_bytes

AUDIO_EXTENSIONS = ("wav", "flac", "mp3", "ogg", "opus", "m4a", "aac", "webm")
DEFAULT_SAMPLE_RATE = 16_000
DEFAULT_MAX_AUDIO_SECONDS = 600.0
_RESAMPLE_BLOCK = 1 << 16  # samples per frame when an in-memory array goes through libswresample

# file extension -> (PyAV container format, codec) for `encode_audio` / `write_audio`
_WRITERS = {
    "wav": ("wav", "pcm_s16le"),
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "libmp3lame"),
    "ogg": ("ogg", "libopus"),
    "opus": ("ogg", "libopus"),
    "m4a": ("ipod", "aac"),
}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def max_audio_seconds() -> float:
    """Longest clip (seconds) a sample may hold: env LMM_MAX_AUDIO_SECONDS, else 600."""
    return env_limit("LMM_MAX_AUDIO_SECONDS", DEFAULT_MAX_AUDIO_SECONDS, float)


def _too_long(seconds: float, limit: float, how: str) -> BadSample:
    return BadSample(
        "audio_too_long", f"{seconds:.1f} s of audio, more than {limit:g} s (LMM_MAX_AUDIO_SECONDS); {how}"
    )


def _as_float_channels(array) -> np.ndarray:
    """float32 (channels, n) from an array given as (n,), (channels, n) or (n, channels) (the smaller axis is
    the channels); integer PCM is scaled by its type's range."""
    x = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    if x.dtype.kind in "iu":
        info = np.iinfo(x.dtype)
        x = (x.astype(np.float64) - (info.max + 1 + info.min) / 2) / ((info.max - info.min + 1) / 2)
    elif x.dtype.kind != "f":
        raise BadSample("corrupt_audio", f"audio array of dtype {x.dtype}")
    if x.ndim == 1:
        x = x[None]
    elif x.ndim == 2:
        x = x if x.shape[0] <= x.shape[1] else x.T
        if x.shape[0] > 64:
            raise BadSample("corrupt_audio", f"audio array of shape {tuple(x.shape)}: more than 64 channels")
    else:
        raise BadSample("corrupt_audio", f"audio array of shape {tuple(x.shape)}; expected (samples,) or 2-D")
    return np.ascontiguousarray(x, dtype=np.float32)


def _finish(x: np.ndarray, what: str) -> np.ndarray:
    if x.size == 0:
        raise BadSample("empty_audio", f"{what} has no samples")
    if not np.isfinite(x).all():
        raise BadSample("corrupt_audio", f"{what} has NaN or infinite samples")
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(samples: np.ndarray, orig_rate: int, rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """float32 mono samples (n,) at `orig_rate` -> (round(n * rate / orig_rate),) at `rate` (libswresample)."""
    import av

    x = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
    if orig_rate == rate or x.size == 0:
        return x.copy()
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    out = []
    for i in range(0, x.size, _RESAMPLE_BLOCK):
        frame = av.AudioFrame.from_ndarray(x[None, i : i + _RESAMPLE_BLOCK], format="flt", layout="mono")
        frame.sample_rate, frame.pts = orig_rate, i
        out += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    out += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _from_array(array, orig_rate: int, rate: int, limit: float) -> np.ndarray:
    if not isinstance(orig_rate, (int, np.integer)) or isinstance(orig_rate, bool) or orig_rate <= 0:
        raise BadSample("corrupt_audio", f"sampling_rate {orig_rate!r} is not a positive whole number")
    x = _as_float_channels(array)
    if x.shape[1] / orig_rate > limit:
        raise _too_long(x.shape[1] / orig_rate, limit, "not resampled")
    x = _finish(x.mean(0), "the audio array")
    return _finish(resample(x, int(orig_rate), rate), "the audio array")


def _header_seconds(container, stream) -> float:
    """Duration from the container header (0 when it has none)."""
    try:
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if container.duration:
            return container.duration / 1_000_000  # av.time_base
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        pass
    return 0.0


def _decode_bytes(data: bytes, rate: int, limit: float) -> np.ndarray:
    import av

    _check_wav_size(data)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                raise BadSample("corrupt_audio", "no audio stream")
            stream = container.streams.audio[0]
            if not stream.rate or stream.rate <= 0:
                raise BadSample("corrupt_audio", f"audio stream with sample rate {stream.rate!r}")
            seconds = _header_seconds(container, stream)
            if seconds > limit:
                raise _too_long(seconds, limit, "read from the header, nothing decoded")
            resampler = av.AudioResampler(format="fltp", layout=None, rate=rate)  # keep the channels
            max_samples, n, chunks = int(limit * rate) + 1, 0, []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().mean(0))  # (channels, n) -> mono (n,)
                    n += chunks[-1].size
                if n > max_samples:
                    raise BadSample(
                        "audio_too_long",
                        f"more than {limit:g} s of audio (LMM_MAX_AUDIO_SECONDS) although the header said "
                        f"{seconds:.1f} s; decoding stopped at the limit",
                    )
            chunks += [out.to_ndarray().mean(0) for out in resampler.resample(None)]
    except BadSample:
        raise
    except Exception as e:  # av.error.FFmpegError, ValueError ... any decode failure skips the clip
        raise BadSample("corrupt_audio", f"{type(e).__name__}: {str(e)[:200]}") from None
    x = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if x.size > max_samples:
        raise _too_long(x.size / rate, limit, "measured after decoding")
    if seconds and x.size / rate < 0.8 * seconds - 0.25:  # an mp3 (Xing) or mp4 header counts the real length
        raise BadSample("corrupt_audio", f"truncated: the header says {seconds:.2f} s, {x.size / rate:.2f} s decoded")
    return _finish(x, "the audio file")


def _check_wav_size(data: bytes) -> None:
    """A WAV whose `data` chunk claims more bytes than the file holds was cut short (FFmpeg would decode the
    part that is there without a word): corrupt_audio. Streamed WAVs (size 0 or 0xFFFFFFFF) are let through."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"data":
            if size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data):
                raise BadSample(
                    "corrupt_audio", f"truncated WAV: {size} data bytes declared, {len(data) - pos - 8} present"
                )
            return
        pos += 8 + size + (size & 1)


def decode_audio(
    value,
    sampling_rate: int = DEFAULT_SAMPLE_RATE,
    root: str | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """float32 mono samples (n,) at `sampling_rate`, from any of:
    - encoded bytes, a file path (relative to `root`) or an HF `Audio(decode=False)` dict {"bytes" | "path"}
      (wav, flac, mp3, ogg/opus, m4a/aac, webm: whatever PyAV's FFmpeg decodes);
    - a decoded HF `Audio` dict {"array", "sampling_rate"}, or a `(sampling_rate, array)` tuple (Gradio's);
    - a numpy array / torch tensor, taken to be at `sampling_rate` already ((n,), or 2-D with channels on the
      smaller axis; integer PCM is scaled to [-1, 1)).
    Raises BadSample: corrupt_audio, missing_audio, empty_audio, audio_too_long (longer than `max_seconds`,
    default `max_audio_seconds()`), member_too_large."""
    limit = max_audio_seconds() if max_seconds is None else float(max_seconds)
    if isinstance(value, dict) and "array" in value:
        if value["array"] is None:
            raise BadSample("missing_audio", "the audio field's array is None")
        return _from_array(value["array"], value.get("sampling_rate") or sampling_rate, sampling_rate, limit)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], (int, np.integer)):
        return _from_array(value[1], value[0], sampling_rate, limit)
    if isinstance(value, np.ndarray) or hasattr(value, "detach"):
        return _from_array(value, sampling_rate, sampling_rate, limit)
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _decode_bytes(read_media_bytes(value, root, "audio"), sampling_rate, limit)


def encode_audio(samples, sampling_rate: int, fmt: str = "wav") -> bytes:
    """Encoded bytes of float samples ((n,) mono or (channels, n), values in [-1, 1]) as wav, flac, mp3,
    ogg/opus or m4a; for tests, examples and clients (e.g. the server's base64 `input_audio`)."""
    import av

    if fmt not in _WRITERS:
        raise ValueError(f"cannot write audio as {fmt!r}; one of {', '.join(_WRITERS)}")
    container_fmt, codec = _WRITERS[fmt]
    x = _as_float_channels(samples)
    if codec == "libopus" and sampling_rate not in _OPUS_RATES:
        x = np.stack([resample(c, sampling_rate, 48_000) for c in x])
        sampling_rate = 48_000
    layout = {1: "mono", 2: "stereo"}.get(len(x))
    if layout is None:
        raise ValueError(f"encode_audio writes mono or stereo, got {len(x)} channels")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_fmt) as container:
        stream = container.add_stream(codec, rate=sampling_rate, layout=layout)
        if codec == "pcm_s16le":
            x = np.clip(x, -1.0, 32767 / 32768)
        step = 1024 if codec == "aac" else 4096
        for i in range(0, x.shape[1], step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[:, i : i + step]), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sampling_rate, i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buf.getvalue()


def write_audio(path: str | os.PathLike, samples, sampling_rate: int) -> None:
    """Write samples to a file whose extension names the format (see `encode_audio`)."""
    ext = os.fspath(path).rsplit(".", 1)[-1].lower()
    data = encode_audio(samples, sampling_rate, ext)
    with open(path, "wb") as f:
        f.write(data)
