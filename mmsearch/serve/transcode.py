"""Video for browsers: which files a browser plays as they are, and short clips of the others.

``browser_playable`` probes the file with PyAV (container and codec, not the extension). For the
rest, ``SpanClips`` transcodes one span to H.264 in an MP4 with its index at the front (baseline
profile, yuv420p, long side <= 640, no audio): what Chromium, Firefox and Safari all play.
Clips are cached on disk by (path, file size, mtime, start, end) and written atomically.
"""

from __future__ import annotations

import hashlib
import os
from fractions import Fraction
from pathlib import Path

from ..errors import BadArgumentError, MediaError
from .thumbs import KeyLocks, stat_file

MAX_CLIP_SECONDS = 120.0
MAX_SIDE = 640
CLIP_MIME = "video/mp4"
_VERSION = b"clip-v1"  # change it when the encoding changes: old cache entries go unused

# container (by FFmpeg demuxer name) -> video codecs browsers decode in it
_PLAYABLE = {
    "mp4": {"h264", "av1"},
    "webm": {"vp8", "vp9", "av1"},
}
_PLAYABLE_PIX = {"yuv420p", "yuvj420p", None}  # 4:2:2 / 4:4:4 / 10-bit H.264 is not widely decoded


def _container_kind(format_name: str, path: str) -> str | None:
    """'mp4' or 'webm' for the containers browsers read, from the demuxer (and, for the demuxer
    FFmpeg shares between QuickTime and MP4 and between Matroska and WebM, the file name)."""
    names = set(format_name.split(","))
    ext = os.path.splitext(path)[1].lower()
    if "mp4" in names or "mov" in names:
        return "mp4" if ext in (".mp4", ".m4v", ".mov", "") else None
    if "webm" in names or "matroska" in names:
        return "webm" if ext in (".webm", "") else None  # .mkv: Chromium plays some, Safari none
    return None


def browser_playable(path) -> bool:
    """Whether browsers play the video at ``path`` as it is: MP4/MOV with H.264 (8-bit 4:2:0) or
    AV1, WebM with VP8, VP9 or AV1. Decided by probing with PyAV; False for a file that does not
    open as a video."""
    import av

    path = os.fspath(path)
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError):
        return False
    try:
        if not container.streams.video:
            return False
        kind = _container_kind(container.format.name, path)
        cc = container.streams.video[0].codec_context
        codec = cc.name
        codec = {"libdav1d": "av1", "libaom-av1": "av1", "libvpx": "vp8", "libvpx-vp9": "vp9"}.get(codec, codec)
        if kind is None or codec not in _PLAYABLE[kind]:
            return False
        pix = cc.pix_fmt
        return codec != "h264" or pix in _PLAYABLE_PIX
    finally:
        container.close()


class SpanClips:
    """H.264 MP4 clips of spans of videos, cached under ``cache_dir``."""

    def __init__(self, cache_dir) -> None:
        self.cache_dir = Path(cache_dir)
        self._locks = KeyLocks()

    def key(self, path: str, start: float, end: float) -> str:
        st = stat_file(path)
        parts = [_VERSION, os.fspath(path).encode(), str(st.st_size).encode(), str(st.st_mtime_ns).encode(),
                 f"{start:.3f}-{end:.3f}".encode()]
        return hashlib.sha1(b"\0".join(parts)).hexdigest()

    def get(self, path, start: float, end: float) -> tuple[Path, str]:
        """(clip file, its MIME type) of the video at ``path`` from ``start`` to ``end`` seconds (end
        clamped to the video's length and to start + 120 s). The clip starts at 0. BadArgumentError
        for a bad span, MediaError for a video that cannot be decoded."""
        path = os.fspath(path)
        start, end = _span(path, start, end)
        key = self.key(path, start, end)
        out = self.cache_dir / key[:2] / f"{key}.mp4"
        if out.is_file():
            return out, CLIP_MIME
        with self._locks(key):
            if not out.is_file():  # another thread may have made it while this one waited
                from .._util import atomic_path

                out.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(out) as tmp:
                    transcode(path, tmp, start, end)
        return out, CLIP_MIME


def _span(path: str, start: float, end: float) -> tuple[float, float]:
    """(start, end) rounded to ms, checked and clamped to the video's length and MAX_CLIP_SECONDS."""
    from ..video import duration

    try:
        start, end = float(start), float(end)
    except (TypeError, ValueError):
        raise BadArgumentError(f"span must be numbers, got {start!r}..{end!r}") from None
    if not (0 <= start < end):  # also refuses NaN
        raise BadArgumentError(f"span must have 0 <= start < end, got {start}..{end}")
    length = duration(path)  # MediaError for a file that is no video
    if length is not None:
        if start >= length:
            raise BadArgumentError(f"span starts at {start}s but the video ends at {length:.3f}s")
        end = min(end, length)
    end = min(end, start + MAX_CLIP_SECONDS)
    return round(start, 3), round(end, 3)


def _out_size(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, MAX_SIDE / max(width, height, 1))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def transcode(path: str, dest, start: float, end: float) -> None:
    """Write the span ``start``..``end`` (seconds) of the video at ``path`` to ``dest`` as an H.264
    MP4 (baseline, yuv420p, moov at the front, no audio) starting at 0. The frame shown at
    ``start`` is the clip's first frame."""
    import av

    from ..video import _open, _reason

    container, stream = _open(path)
    try:
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        width, height = _out_size(stream.codec_context.width, stream.codec_context.height)
        out = av.open(os.fspath(dest), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            enc = out.add_stream("libx264", rate=rate, options={
                "preset": "veryfast", "profile": "baseline", "crf": "26", "threads": "2"})
            enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
            enc.codec_context.time_base = Fraction(1, 1000)
            written = 0
            for t, frame in _span_frames(container, stream, start, end, float(1 / rate)):
                image = frame.reformat(width=width, height=height, format="yuv420p")
                image.pts, image.time_base = round(t * 1000), Fraction(1, 1000)
                for packet in enc.encode(image):
                    out.mux(packet)
                written += 1
            if written == 0:
                raise MediaError(f"{path}: no decodable frames from {start}s to {end}s")
            for packet in enc.encode():
                out.mux(packet)
        finally:
            out.close()
    except av.error.FFmpegError as e:
        raise MediaError(f"{path}: cannot transcode ({_reason(e)})") from None
    finally:
        container.close()


def _span_frames(container, stream, start: float, end: float, step: float):
    """(seconds from ``start``, frame) for the frames of ``start``..``end``, times strictly rising;
    the last frame before ``start`` (the one shown at ``start``) comes first, at 0."""
    import av

    from ..video import _reason, _seconds

    first = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    if start > 0 and stream.time_base:
        container.seek(int((start + first) / stream.time_base), stream=stream, backward=True, any_frame=False)
    pending, last, t, shown = None, -1.0, None, None
    try:
        for frame in container.decode(stream):
            t = _seconds(frame, stream, first)
            t = t if t is not None else start + max(last, 0.0) + step  # no timestamp: the next frame
            if t < start - 1e-3:
                pending = frame  # shown at start unless a frame starts exactly there
                continue
            if t >= end - 1e-3:
                if shown is not None and end - start - step > last + 1e-3:
                    yield end - start - step, shown  # a held frame (sparse video): the clip lasts the span
                break
            if pending is not None and t > start + 1e-3:
                yield 0.0, pending
                last = 0.0
            pending = None
            rel = max(0.0, t - start)
            if rel > last + 1e-3:
                yield rel, frame
                last, shown = rel, frame
    except (av.error.FFmpegError, ValueError) as e:  # a damaged stream: keep the frames so far
        if last < 0 and pending is None:
            raise MediaError(f"{container.name}: cannot decode video ({_reason(e)})") from None
    if pending is not None and last < 0:  # no frame starts inside the span: show the one before it
        yield 0.0, pending

