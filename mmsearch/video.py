"""Video decoding with PyAV (FFmpeg inside the wheel): frames sampled by timestamp, one frame at a time.

Frames are chosen by time, never by frame index (29.97 fps breaks ``i % fps``): the first frame, then
the first frame at or after every ``interval`` seconds. Decoding streams through the file, so memory
does not grow with its length. ``av`` is imported inside functions so importing this module is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .config import VIDEO_EXTENSIONS  # noqa: F401 - re-exported
from .errors import BadArgumentError, MediaError, MediaReadError, PathNotFoundError
from .media import is_transient


@dataclass
class Frame:
    t: float  # seconds from the start of the video stream
    image: "object"  # a PIL RGB image


def _open(path: str):
    try:
        import av
    except ImportError as e:  # pragma: no cover - av is a dependency
        raise MediaError(f"{path}: video support needs PyAV ({e}): pip install av") from None
    if not os.path.isfile(path):
        raise PathNotFoundError(f"video not found: {path}")
    if os.path.getsize(path) == 0:
        raise MediaError(f"{path}: zero-byte file")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as e:
        if is_transient(e):  # the disk or the network failed, not the file
            raise MediaReadError(f"{path}: cannot read: {_reason(e)}") from None
        raise MediaError(f"{path}: not a readable video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame/slice threads inside FFmpeg
    return container, stream


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text.split("] ", 1)[-1][:120]


def _seconds(frame, stream, start: float) -> float | None:
    if frame.pts is None:
        return None
    return float(frame.pts * stream.time_base) - start


def duration(path: str) -> float | None:
    """The video's duration in seconds from its header (None when the file does not say)."""
    container, stream = _open(path)
    try:
        return _header_seconds(container, stream)
    finally:
        container.close()


def _thumb(image) -> np.ndarray:
    return np.asarray(image.convert("L").resize((16, 16)), np.float32)


def _header_seconds(container, stream) -> float | None:
    """The video stream's duration from the header; the container's (which may include audio) as a
    fallback for display only."""
    return _stream_seconds(stream) or (container.duration / 1_000_000 if container.duration is not None else None)


def _stream_seconds(stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def sample_frames(path: str, interval: float = 1.0, skip_similar: float | None = None) -> Iterator[Frame]:
    """Frames of the video at ``path``: the first, then the first at or after each ``interval`` seconds.

    ``skip_similar`` (e.g. 3.0) drops a sampled frame whose 16x16 grey thumbnail differs from the
    last kept one by less than that many grey levels on average (static shots). A file that cannot
    be opened, a stream that breaks part way, or a video whose last frame ends more than a second
    before its video stream's duration in the header (truncated) raises MediaError, possibly after
    some frames: the caller drops what it got, as for a corrupt image.
    """
    if not interval > 0:
        raise BadArgumentError(f"frame interval must be positive seconds, got {interval}")
    container, stream = _open(path)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    next_t, last_thumb, kept, last_t, gap = 0.0, None, 0, 0.0, 0.0
    fps = float(stream.average_rate) if stream.average_rate else 25.0
    decoded = 0
    try:
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except Exception as e:  # av raises its own FFmpeg errors for broken streams
                if is_transient(e):
                    raise MediaReadError(f"{path}: cannot read after {last_t:.1f}s: {_reason(e)}") from None
                raise MediaError(f"{path}: cannot decode video after {last_t:.1f}s ({_reason(e)})") from None
            t = _seconds(frame, stream, start)
            if t is None:  # no timestamp: count frames at the nominal rate
                t = last_t + (1.0 / fps if decoded else 0.0)
            if decoded:
                gap = max(gap, t - last_t)  # the longest a frame stays on screen
            last_t, decoded = t, decoded + 1
            if t + 1e-6 < next_t:
                continue
            next_t = (np.floor(t / interval + 1e-9) + 1) * interval
            image = frame.to_image()
            if skip_similar:
                thumb = _thumb(image)
                if last_thumb is not None and float(np.abs(thumb - last_thumb).mean()) < skip_similar:
                    continue
                last_thumb = thumb
            kept += 1
            yield Frame(max(0.0, round(t, 3)), image)
        if kept == 0:
            raise MediaError(f"{path}: no decodable video frames")
        total = _stream_seconds(stream)  # the video stream's own length (a container's may include audio)
        if total is not None and last_t + max(gap, 1.0 / fps) < total - 1.0:
            raise MediaError(f"{path}: truncated video: frames stop at {last_t:.1f}s of {total:.1f}s")
    finally:
        container.close()


MAX_SECONDS = 1e7  # about 115 days: no video is longer, and seeking past it would overflow


def frame_at(path: str, seconds: float):
    """The frame shown at ``seconds`` (the last one starting at or before it) as a PIL RGB image."""
    if not (0 <= seconds <= MAX_SECONDS):  # also NaN and inf
        raise BadArgumentError(f"time must be between 0 and {MAX_SECONDS:g} seconds, got {seconds}")
    container, stream = _open(path)
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    try:
        if seconds > 0 and stream.time_base:
            try:
                container.seek(int((seconds + start) / stream.time_base), stream=stream, backward=True, any_frame=False)
            except Exception as e:  # noqa: BLE001 - av raises its own errors for files it cannot seek in
                raise MediaError(f"{path}: cannot seek in the video ({_reason(e)})") from None
        best = None
        try:
            for frame in container.decode(stream):
                t = _seconds(frame, stream, start)
                if best is not None and t is not None and t > seconds + 1e-6:
                    break
                best = frame
        except Exception as e:
            if best is None:
                raise MediaError(f"{path}: cannot decode video ({_reason(e)})") from None
        if best is None:
            raise MediaError(f"{path}: no frame at {seconds}s (the video is shorter)")
        t = _seconds(best, stream, start)
        if t is not None and seconds - t > 2.0 and seconds > (duration(path) or float("inf")):
            raise MediaError(f"{path}: no frame at {seconds}s (the video ends at {t:.1f}s)")
        return best.to_image()
    finally:
        container.close()
