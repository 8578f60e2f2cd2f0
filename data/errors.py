"""Bad-sample accounting: the exception a sample raises to be skipped, and the per-reason counter.

A bad sample never stops a run and is never silently dropped: it is skipped, counted under a reason,
and logged with its source key. Counts travel with the loader's state so they survive a resume.
"""

from __future__ import annotations

import logging
from collections import Counter

logger = logging.getLogger("lmm.data")

# The reasons a sample can be skipped for (the keys of the counts a run reports).
REASONS = {
    "corrupt_image": "an image that PIL cannot decode (bad or truncated bytes, bad base64)",
    "image_too_large": "an image (or video frame) with more pixels than LMM_MAX_IMAGE_PIXELS (read from its header)",
    "member_too_large": "a shard member or media file bigger than LMM_MAX_MEMBER_BYTES (not read)",
    "empty_image": "a zero-byte image",
    "missing_image": "an image file or field that is not there (or a URL: nothing is downloaded)",
    "corrupt_video": "a video that PyAV cannot decode, or one without frames",
    "missing_video": "a video file or field that is not there",
    "corrupt_audio": "audio that PyAV cannot decode (bad or truncated bytes, no audio stream, NaN samples)",
    "missing_audio": "an audio file or field that is not there",
    "empty_audio": "a zero-byte audio file or a clip without samples",
    "audio_too_long": "a clip longer than LMM_MAX_AUDIO_SECONDS (from its header, or stopped while decoding)",
    "empty_text": "no text (or no answer) to learn from",
    "too_many_images": "more images than data.max_images",
    "image_count_mismatch": "more <image> markers in a conversation than images",
    "audio_count_mismatch": "more <audio> markers in a sample than audio clips",
    "no_encoder": "media of a modality the model has no encoder for (e.g. audio for an image-only model)",
    "no_images": "an interleaved/pair/video sample whose images were all filtered out",
    "too_long": "nothing left to learn from after truncating to data.max_tokens",
    "bad_record": "a record that does not parse (bad JSON, unknown layout, a field of the wrong type)",
    "truncated_shard": "a shard that ends early or cannot be read (what was read before is kept)",
}


class BadSample(Exception):
    """Raised while reading one sample to skip it; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "", key: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; use one of {sorted(REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.key = key


class BadSampleCounter:
    """Counts skipped samples per reason and logs each one with its key."""

    def __init__(self, counts: dict | None = None, log: bool = True):
        self.counts: Counter = Counter(counts or {})
        self.log = log

    def add(self, err: BadSample, key: str = "", source: str = "") -> None:
        self.counts[err.reason] += 1
        if self.log:
            logger.warning("skipping sample %s%s (%s)", key or err.key or "?", f" from {source}" if source else "", err)

    def state_dict(self) -> dict:
        return dict(self.counts)

    def __repr__(self) -> str:
        return f"BadSampleCounter({dict(self.counts)})"


def format_counts(counts: dict) -> str:
    """One line per reason, for the end-of-run report."""
    if not counts or not sum(counts.values()):
        return "bad samples: none"
    lines = [f"bad samples: {sum(counts.values())}"]
    lines += [f"  {reason}: {n}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n]
    return "\n".join(lines)


class DataError(RuntimeError):
    """A whole dataset cannot be used (no files match, unreadable, empty): fails at start-up."""
