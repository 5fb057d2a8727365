"""Video decoding with PyAV (FFmpeg inside the wheel): frames sampled by timestamp, one frame at a time.

Frames are chosen by time, never by frame index (29.97 fps breaks ``i % fps``): the first frame, then
the first frame at or after every ``interval`` seconds. Decoding streams through the file, so memory
does not grow with its length. ``av`` is imported inside functions so importing this module is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .config import VIDEO_EXTENSIONS  # noqa: F401 - re-exported
from .errors import BadArgumentError, MediaError, MediaReadError, PathNotFoundError
from .media import is_transient


@dataclass
class Frame:
    t: float  # seconds from the start of the video stream
    image: "object"  # a PIL RGB image
    shot: int = 0  # index of the shot this frame belongs to, 0-based, in time order


@dataclass(frozen=True)
class Shot:
    start: float  # seconds: the cut that starts it (0.0 for the first)
    end: float  # seconds: the next cut, or the end of the video


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
    """Frames of the video at ``path``: the first, then the first at or after each ``interval`` seconds,
    and the first frame of every shot. See VideoSampler (this is ``VideoSampler(...).frames()``)."""
    return VideoSampler(path, interval, skip_similar).frames()


def detect_shots(path: str) -> list[Shot]:
    """The shots of the video at ``path``, from one pass that decodes every frame (no images kept)."""
    sampler = VideoSampler(path, interval=MAX_SECONDS, mode="decode")
    for _ in sampler.frames():
        pass
    return sampler.shots


class VideoSampler:
    """One pass over one video: sampled frames, and the shots found while sampling.

    Frames: the first, then the first at or after every ``interval`` seconds, plus the first frame of
    every shot (a shorter shot than the interval is never missed). ``skip_similar`` (e.g. 3.0) drops a
    regular sample whose 16x16 grey thumbnail differs from the last kept one by less than that many
    grey levels on average (static shots); a shot's first frame is always kept.

    ``min_side``: the caller will downscale frames to this shortest side anyway, so a frame is converted
    to RGB at 1/2, 1/4 or 1/8 of its size as long as both sides stay >= ``min_side`` (as photos are
    decoded, ``media.load_image``): converting a 4K frame in full costs about 45 ms, more than decoding it.

    Decoding skips frames no other frame refers to (``skip_frame=NONREF``: most B-frames) while the
    next sample time is more than ``NONREF_MARGIN`` frames ahead, so sampled frames are the same as
    with full decoding and the cut detector still sees most frames (a cut is found on the first
    frame decoded after it, at most a few frames late).

    ``mode``: "decode" decodes every frame needed; "seek" seeks to the keyframe before a sample time when one
    lies ahead of the decoder and decodes forward from it; "auto" seeks when the file's keyframe index
    says that skips at least half the frames (interval much longer than the keyframe spacing). Frame
    times are the same either way: each is the first frame at or after its sample time. After
    ``frames()``, ``mode`` says which way the video was sampled, ``shots`` holds its shots and
    ``decoded`` the number of frames decoded.

    Shots: PySceneDetect's ContentDetector on low-resolution frames. Decoding forward, it sees every
    frame; across a seek it compares the last frame decoded with the keyframe landed on, and when they
    differ like a cut, decodes the skipped stretch to find it. A cut that comes back to the same
    picture within one skipped stretch is missed in seek mode.

    A file that cannot be opened, a stream that breaks part way, or a video whose last frame ends
    more than a second before its video stream's duration in the header (truncated) raises
    MediaError, possibly after some frames: the caller drops what it got, as for a corrupt image.
    """

    def __init__(self, path: str, interval: float = 1.0, skip_similar: float | None = None, mode: str = "auto",
                 min_side: int | None = None):
        if not interval > 0:
            raise BadArgumentError(f"frame interval must be positive seconds, got {interval}")
        if mode not in ("auto", "seek", "decode"):
            raise BadArgumentError(f"sampling mode must be auto, seek or decode, got {mode!r}")
        self.path, self.interval, self.skip_similar, self.min_side = path, interval, skip_similar, min_side
        self.requested = mode  # what the caller asked for
        self.mode = "decode" if mode == "auto" else mode  # how the video was sampled (set by frames())
        self.shots: list[Shot] = []  # complete once frames() is exhausted
        self.decoded = 0  # frames decoded, thumbnails of skipped stretches included

    def frames(self) -> Iterator[Frame]:
        container, stream = _open(self.path)
        try:
            p = _Pass.of(self.path, container, stream)
            if self.requested == "auto":
                self.mode = "seek" if _seek_pays(p.keyframes, p.total, self.interval) else "decode"
            yield from self._sample(p)
            self.decoded = p.decoded
            _check_complete(p)
            self.shots = _shots(p.cuts, p.end, p.total)
        finally:
            container.close()

    def _sample(self, p: "_Pass") -> Iterator[Frame]:
        next_t, kept, last_thumb = 0.0, 0, None
        for frame, t, cut in p.run(self.mode == "seek", lambda: next_t):
            if not cut and t + 1e-6 < next_t:
                continue
            if t + 1e-6 >= next_t:
                next_t = (np.floor(t / self.interval + 1e-9) + 1) * self.interval
            image = _image(frame, self.min_side)
            if self.skip_similar:
                thumb = _thumb(image)
                if not cut and last_thumb is not None and float(np.abs(thumb - last_thumb).mean()) < self.skip_similar:
                    continue
                last_thumb = thumb
            kept += 1
            yield Frame(max(0.0, round(t, 3)), image, len(p.cuts))
        if kept == 0:
            raise MediaError(f"{self.path}: no decodable video frames")


#: ContentDetector's score (mean change of hue, saturation and brightness, 0-255) that makes a cut: its default
CUT_THRESHOLD = 27.0
#: a cut closer than this to the previous one is a flash, not a shot (seconds)
MIN_SHOT_SECONDS = 0.5
#: width of the frames the cut detector sees (height keeps the aspect ratio)
ANALYSIS_WIDTH = 160
#: frames before a sample time (besides one per decoder thread) from which non-reference frames are
#: decoded again: covers the decoder's reordering delay (x264 uses up to 4 frames with B-pyramids)
NONREF_MARGIN = 5
#: seek only to skip at least this many seconds of frames (a seek costs a decoder flush)
MIN_SEEK_SKIP = 0.5


def _seek_pays(keyframes: list[float], total: float | None, interval: float) -> bool:
    """Whether seeking to the keyframe before each sample time skips at least half of the frames."""
    if len(keyframes) < 2 or not total:
        return False
    decoded, pos, s = 0.0, 0.0, 0.0
    while s < total:
        k = keyframes[max(0, int(np.searchsorted(keyframes, s + 1e-6)) - 1)]
        decoded += s - (k if k > pos + MIN_SEEK_SKIP else pos)
        pos, s = s, s + interval
    return decoded <= 0.5 * total


def _shots(cuts: list[float], last_end: float, total: float | None) -> list[Shot]:
    end = max(last_end, total or 0.0)
    starts = [0.0] + cuts
    return [Shot(a, b) for a, b in zip(starts, starts[1:] + [round(end, 3)])]


def _check_complete(p: "_Pass") -> None:
    if p.total is not None and p.end < p.total - 1.0:
        raise MediaError(f"{p.path}: truncated video: frames stop at {p.last_t:.1f}s of {p.total:.1f}s")


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


def _image(frame, min_side: int | None):
    """``frame`` as a PIL RGB image, at 1/2, 1/4 or 1/8 of its size while both sides stay >= ``min_side``."""
    scale = 1
    while min_side and scale < 8 and min(frame.width, frame.height) // (scale * 2) >= min_side:
        scale *= 2
    if scale == 1:
        return frame.to_image()
    return frame.to_image(width=frame.width // scale, height=frame.height // scale, interpolation="AREA")


def _planes(frame) -> list[np.ndarray]:
    return [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in frame.planes]


def _thumbnail(frame, size: tuple[int, int]) -> np.ndarray:
    """A small BGR picture of ``frame`` for the shot detector. Planar 4:2:0 frames (nearly all video)
    are strided down with numpy and converted at that size (about 0.05 ms); swscale's scaling pass
    costs 1-3 ms a frame, more than decoding the frame. Other pixel formats: swscale."""
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        return frame.to_ndarray(format="bgr24", width=size[0], height=size[1], interpolation="FAST_BILINEAR")
    import cv2

    y, u, v = _planes(frame)
    step = max(2, (frame.width // size[0]) // 2 * 2)  # even, so the chroma planes stride by half of it
    y = y[::step, ::step]
    u, v = u[:: step // 2, :: step // 2], v[:: step // 2, :: step // 2]
    h, w = min(len(y), len(u), len(v)), min(y.shape[1], u.shape[1], v.shape[1])
    yuv = np.ascontiguousarray(np.dstack([y[:h, :w], u[:h, :w], v[:h, :w]]))
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR)


@dataclass
class _Pass:
    """One pass over an open video: the decoder (restarted by each seek), the cut detector of the
    current continuous run, and what was found so far."""

    path: str
    container: object
    stream: object
    start: float  # the stream's first timestamp (seconds)
    fps: float  # nominal frame rate (for frames without timestamps)
    total: float | None  # the video stream's duration from the header
    keyframes: list[float]  # when keyframes are shown, from the file's index (empty when it has none)
    size: tuple[int, int]  # (width, height) of the frames the cut detector sees
    decoder: Iterator | None = None
    detector: "_CutDetector | None" = None
    cuts: list[float] = field(default_factory=list)  # start times of the shots after the first
    last_t: float = 0.0  # the latest frame time decoded
    gap: float = 0.0  # the longest a frame stays on screen
    decoded: int = 0
    run_t: float | None = None  # time of the previous frame of this continuous run
    probe: tuple[float, np.ndarray] | None = None  # (time, thumbnail) of the frame before a seek
    prime_until: float | None = None  # frames up to here were seen already: feed the detector only
    hold_until: float = -1.0  # do not seek again before this time (decoding a skipped stretch)
    skipping: str = "DEFAULT"  # what the decoder skips (FFmpeg's skip_frame): DEFAULT or NONREF
    sought: float | None = None  # the sample time of the latest seek
    last_duration: float | None = None  # how long the latest frame stays on screen, when the file says

    @property
    def end(self) -> float:
        """When the latest frame decoded leaves the screen."""
        return self.last_t + (self.last_duration or max(self.gap, 1.0 / self.fps))

    @classmethod
    def of(cls, path: str, container, stream) -> "_Pass":
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        fps = float(stream.average_rate) if stream.average_rate else 25.0
        keys = sorted({float(e.timestamp * stream.time_base) - start for e in stream.index_entries if e.is_keyframe})
        # mp4 indexes time keyframes in decoding order, ahead of display order by the B-frame delay
        # (the first keyframe is shown at the stream's start); seeking takes display times
        lead = max(0.0, -keys[0]) if keys else 0.0
        w, h = stream.width or ANALYSIS_WIDTH, stream.height or ANALYSIS_WIDTH
        size = (ANALYSIS_WIDTH, max(2, int(round(ANALYSIS_WIDTH * h / w / 2)) * 2))
        return cls(path, container, stream, start, fps, _stream_seconds(stream), [k + lead for k in keys], size)

    def run(self, seek: bool, target) -> Iterator[tuple[object, float, bool]]:
        """(frame, time, starts a shot) for each frame decoded, in time order; with ``seek``, jumps
        to the keyframe before ``target()`` (the next sample time) when one lies ahead."""
        self._restart(None)
        while (got := self._next()) is not None:
            frame, t = got
            thumb = _thumbnail(frame, self.size)
            if self.probe is not None and self._skipped_a_cut(t, thumb):
                continue
            if self.prime_until is not None and t <= self.prime_until + 1e-6:
                self.detector.is_cut(t, thumb)  # frames seen before the skipped stretch
                continue
            self.prime_until = None
            cut = self._cut(t, thumb)
            yield frame, t, cut
            n = target()
            self._skip("NONREF" if n - t > self._margin() else "DEFAULT")
            if seek and t >= self.hold_until:
                k = self._keyframe_before(n)
                if k > t + MIN_SEEK_SKIP and n != self.sought:  # one seek per sample time, whatever happens
                    self.probe, self.sought = (t, thumb), n
                    self._restart(n)
                    self._skip(self._after_seek(n, k))

    def _keyframe_before(self, t: float) -> float:
        """When the last keyframe at or before ``t`` is shown (0.0 without an index)."""
        return self.keyframes[max(0, int(np.searchsorted(self.keyframes, t + 1e-6)) - 1)] if self.keyframes else 0.0

    def _after_seek(self, n: float, k: float) -> str:
        """What the decoder may skip after seeking to keyframe ``k`` for the sample at ``n``:
        non-reference frames while ``n`` is far. (Skipping all but keyframes when ``k`` is the
        sample costs more: with frame threads the decoder then reads on to the next keyframe and
        decodes it before it hands over this one.)"""
        return "NONREF" if n - k > self._margin() else "DEFAULT"

    def _margin(self) -> float:
        """Seconds before a sample time from which every frame is decoded: the frames already handed
        to the decoder's threads and its reordering buffer are decoded with the setting they got."""
        cc = self.stream.codec_context
        return (NONREF_MARGIN + (cc.thread_count or 1)) / self.fps

    def _skip(self, level: str) -> None:
        if level != self.skipping:
            self.stream.codec_context.skip_frame = level
            self.skipping = level

    def _skipped_a_cut(self, t: float, thumb: np.ndarray) -> bool:
        """At the first frame after a seek: when it differs from the frame before the seek like a
        cut, go back and decode the skipped stretch (True: drop this frame)."""
        before_t, before = self.probe
        self.probe = None
        if not _CutDetector.differ(before, thumb, self.fps):
            return False
        self.hold_until = t
        self._restart(before_t)
        self._skip("DEFAULT")  # every frame of the stretch, to find the cut
        self.prime_until = before_t
        return True

    def _cut(self, t: float, thumb: np.ndarray) -> bool:
        cut = self.detector.is_cut(t, thumb)
        last = self.cuts[-1] if self.cuts else 0.0
        if cut and t - last >= MIN_SHOT_SECONDS:
            self.cuts.append(max(0.0, round(t, 3)))
            return True
        return False

    def _restart(self, at: float | None) -> None:
        """A new continuous run: from the start, or from the keyframe at or before ``at`` seconds."""
        if at is not None:
            try:
                # FFmpeg seeks by display time; int() could round 2.0 s down to a tick before the
                # keyframe shown then, and land on the one before it
                ts = round((at + self.start) / self.stream.time_base)
                self.container.seek(ts, stream=self.stream, backward=True, any_frame=False)
            except Exception as e:  # noqa: BLE001 - av raises its own errors for files it cannot seek in
                raise MediaError(f"{self.path}: cannot seek in the video ({_reason(e)})") from None
        self.decoder = self.container.decode(self.stream)
        self.detector = _CutDetector(self.fps)
        self.run_t = None

    def _next(self) -> tuple[object, float] | None:
        try:
            frame = next(self.decoder)
        except StopIteration:
            return None
        except Exception as e:  # av raises its own FFmpeg errors for broken streams
            if is_transient(e):
                raise MediaReadError(f"{self.path}: cannot read after {self.last_t:.1f}s: {_reason(e)}") from None
            raise MediaError(f"{self.path}: cannot decode video after {self.last_t:.1f}s ({_reason(e)})") from None
        t = _seconds(frame, self.stream, self.start)
        if t is None:  # no timestamp: count frames at the nominal rate
            t = self.run_t + 1.0 / self.fps if self.run_t is not None else (self.last_t if self.decoded else 0.0)
        if self.run_t is not None and self.skipping == "DEFAULT":  # skipped frames are not gaps
            self.gap = max(self.gap, t - self.run_t)
        if t >= self.last_t and frame.duration and frame.time_base:
            self.last_duration = float(frame.duration * frame.time_base)
        self.run_t, self.last_t, self.decoded = t, max(self.last_t, t), self.decoded + 1
        return frame, t


class _CutDetector:
    """PySceneDetect's ContentDetector, fed one low-resolution BGR frame at a time (one per run of
    consecutive frames; its own minimum scene length is off: _Pass applies MIN_SHOT_SECONDS)."""

    def __init__(self, fps: float):
        from scenedetect.detectors import ContentDetector

        self._detector = ContentDetector(threshold=CUT_THRESHOLD, min_scene_len=0)
        self._fps = fps

    def is_cut(self, t: float, bgr: np.ndarray) -> bool:
        """Whether this frame starts a new shot (compared with the frame fed before it)."""
        from scenedetect import FrameTimecode

        return bool(self._detector.process_frame(FrameTimecode(max(0.0, t), self._fps), bgr))

    @classmethod
    def differ(cls, a: np.ndarray, b: np.ndarray, fps: float) -> bool:
        """Whether two frames seconds apart differ like the two sides of a cut: by ContentDetector's
        score and by their colours (motion alone changes every pixel of a moving picture, not its colours)."""
        import cv2  # PySceneDetect's dependency

        d = cls(fps)
        d.is_cut(0.0, a)
        if not d.is_cut(1.0, b):
            return False
        ha, hb = (cv2.calcHist([cv2.cvtColor(x, cv2.COLOR_BGR2HSV)], [0, 1], None, [16, 16], [0, 180, 0, 256]) for x in (a, b))
        return 1.0 - cv2.compareHist(ha, hb, cv2.HISTCMP_CORREL) >= COLOUR_CHANGE


#: 1 - correlation of two frames' hue-saturation histograms that, with a cut's content score, makes a
#: seek go back and look for the cut in the frames it skipped
COLOUR_CHANGE = 0.3
