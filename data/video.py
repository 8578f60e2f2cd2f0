"""Video clips: frames sampled uniformly over the clip, decoded with PyAV.

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


def sample_frames(value, num_frames: int, root: str | None = None) -> list[Image.Image]:
    """Decode `num_frames` uniformly spaced RGB frames from a video (bytes, path or HF dict)."""
    import av

    data = read_media_bytes(value, root, "video")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise BadSample("corrupt_video", "no video stream")
            stream = container.streams.video[0]
            total = stream.frames
            if total and total > 0:
                wanted = set(uniform_indices(total, num_frames))
                frames = []
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        frames.append(frame.to_image().convert("RGB"))
                    if i >= max(wanted):
                        break
            else:  # frame count unknown (e.g. webm): decode all, then pick
                every = [f.to_image().convert("RGB") for f in container.decode(stream)]
                frames = [every[i] for i in uniform_indices(len(every), num_frames)]
    except BadSample:
        raise
    except Exception as e:  # av.error.FFmpegError and friends: any decode failure skips the clip
        raise BadSample("corrupt_video", f"{type(e).__name__}: {e}") from None
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
