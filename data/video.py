"""Video clips: frames sampled uniformly over the clip, decoded with PyAV, in bounded memory.

A clip becomes a list of PIL frames; the loader turns it into one media item of F frames.
Anything PyAV cannot open or decode (or a clip without frames) is a BadSample("corrupt_video").
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .errors import BadSample
from .media import read_media_bytes

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")


def uniform_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over `total` frames (centres of equal bins); all frames if fewer."""
    if total <= num_frames:
        return list(range(total))
    edges = np.linspace(0, total, num_frames + 1)
    return [int((edges[i] + edges[i + 1]) / 2) for i in range(num_frames)]


MAX_DECODED_FRAMES = 4096  # frames decoded one after another per clip at most; longer clips are sampled by seeking
FRAMES_PER_SEEK = 512  # frames decoded after a seek (from the keyframe before the wanted time) at most


def _estimated_frames(container, stream) -> int:
    """Frame count from the container's duration and the stream's rate when the header has no count (WebM)."""
    try:
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1_000_000  # av.time_base
        else:
            return 0
        return max(0, int(round(seconds * rate)))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return 0


def _rgb(frame) -> Image.Image:
    return frame.to_image().convert("RGB")


def _seek_frames(container, stream, total: int, num_frames: int, limit: int) -> list[Image.Image]:
    """A long clip: seek to each wanted frame's time (the keyframe before it) and decode up to it."""
    rate = float(stream.average_rate or stream.guessed_rate)
    tb = float(stream.time_base)
    start = stream.start_time or 0
    frames = []
    for i in uniform_indices(total, num_frames):
        target = start + int(i / rate / tb)
        container.seek(target, stream=stream, backward=True, any_frame=False)
        chosen = None
        for n, frame in enumerate(container.decode(stream)):
            if frame.width * frame.height > limit:
                raise BadSample("image_too_large", f"a video frame of {frame.width}x{frame.height} pixels")
            chosen = frame
            if frame.pts is None or frame.pts >= target - 0.5 / rate / tb or n + 1 >= FRAMES_PER_SEEK:
                break
        if chosen is not None:
            frames.append(_rgb(chosen))
    return frames


def sample_frames(value, num_frames: int, root: str | None = None, max_pixels: int | None = None) -> list[Image.Image]:
    """Decode `num_frames` uniformly spaced RGB frames from a video (bytes, path or HF dict).

    Memory stays bounded whatever the clip: frames are decoded one by one and only the chosen ones are kept.
    With a frame count in the header (mp4), exactly `uniform_indices(count, num_frames)`, decoding stops after
    the last; without one (WebM), the count is estimated from duration x frame rate, and while decoding an
    evenly thinned set of at most 2 x num_frames frames is kept in case the estimate was wrong. A clip longer
    than MAX_DECODED_FRAMES is sampled by seeking (keyframe, then decoding up to the wanted time), and no more
    than MAX_DECODED_FRAMES frames are decoded one after another. Frames larger than `max_pixels`
    (LMM_MAX_IMAGE_PIXELS) are refused from the stream header: BadSample("image_too_large")."""
    import av

    from .media import max_image_pixels

    limit = max_image_pixels() if max_pixels is None else max_pixels
    data = read_media_bytes(value, root, "video")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise BadSample("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width or 0, stream.codec_context.height or 0
            if w * h > limit:
                raise BadSample(
                    "image_too_large", f"video frames of {w}x{h} pixels, more than {limit} (LMM_MAX_IMAGE_PIXELS)"
                )
            exact = stream.frames if stream.frames and stream.frames > 0 else 0
            total = exact or _estimated_frames(container, stream)
            if total > MAX_DECODED_FRAMES and (stream.average_rate or stream.guessed_rate) and stream.time_base:
                frames = _seek_frames(container, stream, total, num_frames, limit)
                if not frames:
                    raise BadSample("corrupt_video", "no decodable frames")
                return frames
            wanted = set(uniform_indices(total, num_frames)) if total else set()
            last = max(wanted) if wanted else None
            picked: dict[int, Image.Image] = {}
            kept, step = [], 1  # without an exact count: every step-th frame, thinned to <= 2 * num_frames
            for i, frame in enumerate(container.decode(stream)):
                if i >= MAX_DECODED_FRAMES:
                    break
                if frame.width * frame.height > limit:
                    raise BadSample("image_too_large", f"a video frame of {frame.width}x{frame.height} pixels")
                if i in wanted:
                    picked[i] = _rgb(frame)
                if not exact and i % step == 0:
                    kept.append(picked.get(i) or _rgb(frame))
                    if len(kept) > 2 * num_frames:
                        kept, step = kept[::2], step * 2
                if last is not None and i >= last:
                    break
            if wanted and len(picked) == len(wanted):
                frames = [picked[i] for i in sorted(picked)]
            elif exact:  # the header's count was too high: the frames that were there
                frames = [picked[i] for i in sorted(picked)]
            else:
                frames = [kept[j] for j in uniform_indices(len(kept), num_frames)]
    except BadSample:
        raise
    except Exception as e:  # av.error.FFmpegError and friends: any decode failure skips the clip
        raise BadSample("corrupt_video", f"{type(e).__name__}: {str(e)[:200]}") from None
    if not frames:
        raise BadSample("corrupt_video", "no decodable frames")
    return frames


def write_video(path: str, frames: list[Image.Image], fps: int = 8) -> None:
    """Write RGB frames to an mp4 (H.264 if available, else MPEG-4); used by tests and examples."""
    import av

    w, h = frames[0].size
    with av.open(path, mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(im.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
