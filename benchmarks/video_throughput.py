"""Video indexing throughput: frames decoded and embedded end to end vs the model's forward pass,
and index size per hour of video.

On the real clips in ../shared/data/videos (6 clips, about 2.5 minutes), in one process:
1. forward only: the sampled frames decoded and preprocessed beforehand, timed around
   ``embed_pixels`` alone (best of 3 passes);
2. decode only: PyAV decoding + frame sampling + preprocessing, no model;
3. end to end: ``index_folder`` on the clips (scan, decode in a thread, embed, faiss, commit) with
   the model already loaded, frames/s from its wall time;
4. index size: bytes on disk per frame, scaled to one hour of video at the sampling interval.

    python benchmarks/video_throughput.py [--model mmsearch-lite2] [--interval 1.0]

Writes benchmarks/results/video_throughput_<model>.json. With ``--long-gop`` it instead makes (once,
cached) 1080p and 4K H.264 clips from the shared ones with a keyframe every 10 s or 1 s, and measures
sampling before shots and seeking (every frame decoded), ``decode``, ``seek`` and ``auto`` mode,
end-to-end indexing and the shot detector's share of it; writes video_long_gop_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.config import DEFAULT_FRAME_INTERVAL, DEFAULT_MODEL, IndexingConfig  # noqa: E402


# ---- long-GOP HD and 4K: full decoding vs seeking, and the shot detector's cost --------------------

LONG_GOP_CLIPS = [  # (name, width, height, seconds between keyframes)
    ("1080p_gop10s", 1920, 1080, 10.0),
    ("4k_gop10s", 3840, 2160, 10.0),
    ("4k_gop1s", 3840, 2160, 1.0),
]
CLIP_FPS = 25


def make_clip(sources: list[str], out: Path, size: tuple[int, int], gop_s: float, seconds: float) -> None:
    """The shared clips one after another, upscaled to ``size`` (swscale), H.264 (x264 veryfast, two
    B-frames, a keyframe every ``gop_s`` seconds and no others) at 25 fps, ``seconds`` long."""
    import av

    tmp = out.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as o:
        s = o.add_stream("libx264", rate=CLIP_FPS)
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        g = str(int(gop_s * CLIP_FPS))
        s.options = {"preset": "veryfast", "bf": "2", "crf": "23", "x264-params": f"keyint={g}:min-keyint={g}:scenecut=0"}
        n = 0
        while n < seconds * CLIP_FPS:
            for src in sources:
                with av.open(src) as c:
                    for f in c.decode(video=0):
                        if n >= seconds * CLIP_FPS:
                            break
                        big = f.reformat(width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC")
                        big.pts, big.time_base = n, Fraction(1, CLIP_FPS)
                        big.pict_type = av.video.frame.PictureType.NONE  # not the source's keyframes
                        o.mux(s.encode(big))
                        n += 1
        o.mux(s.encode())
    tmp.replace(out)


def baseline_times(path: str, interval: float) -> list[float]:
    """The sampler before shots and seeking (kept here as the reference it is measured against):
    every frame decoded with FFmpeg's threads, the first at or after each sample time converted to
    RGB in full. Returns the sampled times."""
    import av

    times, next_t = [], 0.0
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        start = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        for frame in c.decode(s):
            t = float(frame.pts * s.time_base) - start
            if t + 1e-6 >= next_t:
                next_t = (int(t / interval + 1e-9) + 1) * interval
                frame.to_image()
                times.append(round(t, 3))
    return times


class DetectorClock:
    """Time spent in the shot detector (thumbnails and PySceneDetect) while sampling, by wrapping
    mmsearch.video's functions for the duration of a ``with`` block."""

    def __init__(self):
        self.seconds = 0.0

    def _timed(self, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t
        return wrapper

    def __enter__(self):
        from mmsearch import video

        self._saved = (video._thumbnail, video._CutDetector.is_cut)
        video._thumbnail = self._timed(video._thumbnail)
        video._CutDetector.is_cut = self._timed(video._CutDetector.is_cut)
        return self

    def __exit__(self, *exc):
        from mmsearch import video

        video._thumbnail, video._CutDetector.is_cut = self._saved


def _best(fn, repeats: int) -> tuple[float, object]:
    """(fastest wall seconds, its result) of ``repeats`` calls."""
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        runs.append((time.perf_counter() - t, out))
    return min(runs, key=lambda r: r[0])


def reference_frames_seconds(path: str) -> float:
    """Decoding only the frames others refer to (``skip_frame=NONREF``), nothing converted: the least
    any sampler that returns exact frames must decode between two keyframes."""
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type, s.codec_context.skip_frame = "AUTO", "NONREF"
        t = time.perf_counter()
        for _ in c.decode(s):
            pass
        return time.perf_counter() - t


def long_gop_row(path: Path, gop_s: float, interval: float, enc, repeats: int) -> dict:
    before, ref = _best(lambda: baseline_times(str(path), interval), repeats)
    row = {"clip": path.name, "keyframe_every_s": gop_s, "interval_s": interval, "before_seconds": round(before, 3)}
    for mode in ("decode", "seek", "auto"):
        best, (times, sampler) = _best(lambda: _sampled(str(path), interval, mode, enc.image_size), repeats)
        row[mode] = {"seconds": round(best, 3), "frames": len(times), "decoded": sampler.decoded,
                     "mode": sampler.mode, "shots": len(sampler.shots),
                     "max_shift_vs_full_decoding_frames": _max_shift(ref, times, 1.0 / CLIP_FPS)}
    row["speedup_auto_vs_before"] = round(before / row["auto"]["seconds"], 2)
    return row | _end_to_end(path, interval, enc, row["auto"]["frames"])


def _sampled(path: str, interval: float, mode: str, min_side: int):
    from mmsearch.video import VideoSampler

    sampler = VideoSampler(path, interval, mode=mode, min_side=min_side)
    return [f.t for f in sampler.frames()], sampler


def _end_to_end(path: Path, interval: float, enc, frames: int) -> dict:
    """index_folder on a folder holding only ``path``, and the shot detector's time within it."""
    from mmsearch.indexing import index_folder

    with tempfile.TemporaryDirectory() as tmp, DetectorClock() as clock:
        folder = Path(tmp) / "clip"
        folder.mkdir()
        (folder / path.name).symlink_to(path)
        t = time.perf_counter()
        index_folder(str(folder), Path(tmp) / "index", encoder=enc, config=IndexingConfig(frame_interval=interval))
        wall = time.perf_counter() - t
    return {"end_to_end_seconds": round(wall, 3), "end_to_end_frames_per_s": round(frames / wall, 1),
            "detector_seconds": round(clock.seconds, 3), "detector_share_of_end_to_end": round(clock.seconds / wall, 3)}


def _max_shift(ref: list[float], times: list[float], frame: float) -> float:
    """Largest distance, in frames, from a full-decoding sample time to the nearest time sampled."""
    got = np.asarray(times)
    return round(max(float(np.abs(got - r).min()) for r in ref) / frame, 2)


def long_gop(args, enc) -> None:
    """Make (once, cached) the long-GOP clips and measure each; writes video_long_gop_<model>.json."""
    import onnxruntime

    from mmsearch._util import available_cores

    cache = Path(args.clip_cache)
    cache.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in Path(args.videos).iterdir() if p.suffix == ".mp4")
    rows = []
    for name, w, h, gop in LONG_GOP_CLIPS:
        path = cache / f"{name}_{args.seconds:g}s.mp4"
        if not path.exists():
            make_clip(sources, path, (w, h), gop, args.seconds)
        floor = min(reference_frames_seconds(str(path)) for _ in range(args.repeats))
        for interval in args.intervals:
            rows.append(long_gop_row(path, gop, interval, enc, args.repeats)
                        | {"resolution": f"{w}x{h}", "reference_frames_only_seconds": round(floor, 3)})
            print(json.dumps(rows[-1]), flush=True)
    record = {
        "what": f"sampling one frame every {' or '.join(f'{i:g}' for i in args.intervals)} s from {args.seconds:g} s H.264 clips made from the "
                f"shared .mp4 clips (upscaled, x264 veryfast, 2 B-frames, {CLIP_FPS} fps, one keyframe every "
                f"N s); before = every frame decoded and each sampled one converted in full (the sampler before "
                f"issue 17); best of {args.repeats}; end to end = index_folder on the clip with model {enc.name}",
        "command": f"python benchmarks/video_throughput.py --long-gop --model {args.model} "
                   f"--intervals {','.join(f'{i:g}' for i in args.intervals)} --seconds {args.seconds:g} --repeats {args.repeats}",
        "model": enc.name,
        "clips": rows,
        "machine": f"{platform.machine()}, {available_cores()} cpus, onnxruntime {onnxruntime.__version__}",
    }
    out = ROOT / "benchmarks" / "results" / f"video_long_gop_{Path(enc.name).name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", default=str(ROOT.parent / "shared" / "data" / "videos"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--interval", type=float, default=DEFAULT_FRAME_INTERVAL)
    ap.add_argument("--long-gop", action="store_true", help="measure 1080p and 4K long-GOP clips instead")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each long-GOP clip")
    ap.add_argument("--intervals", type=lambda v: [float(x) for x in v.split(",")], default=[1.0, 10.0],
                    help="long-GOP sampling intervals, comma-separated seconds")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clip-cache", default=str(Path(tempfile.gettempdir()) / "mmsearch-long-gop-clips"))
    args = ap.parse_args()
    if args.long_gop:
        from mmsearch.encoder import get_encoder

        return long_gop(args, get_encoder(args.model))

    import onnxruntime

    from mmsearch._util import available_cores
    from mmsearch.encoder import get_encoder
    from mmsearch.indexing import index_folder
    from mmsearch.store import Collection
    from mmsearch.video import VIDEO_EXTENSIONS, duration, sample_frames

    clips = sorted(str(p) for p in Path(args.videos).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    seconds = sum(duration(c) or 0.0 for c in clips)
    enc = get_encoder(args.model)

    # 2. decode only (also collects the inputs for 1.)
    t = time.perf_counter()
    pixels = [enc.preprocess(f.image) for c in clips for f in sample_frames(c, args.interval)]
    decode_fps = len(pixels) / (time.perf_counter() - t)

    # 1. forward only
    bs = 32
    enc.embed_pixels(np.stack(pixels[:bs]))  # warm-up
    passes = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(0, len(pixels), bs):
            enc.embed_pixels(np.stack(pixels[i:i + bs]))
        passes.append(len(pixels) / (time.perf_counter() - t))
    forward_fps = max(passes)
    n_frames = len(pixels)
    del pixels

    # 3. end to end through the indexing pipeline
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        report = index_folder(args.videos, Path(tmp) / "index", encoder=enc,
                              config=IndexingConfig(frame_interval=args.interval))
        wall = time.perf_counter() - t
        c = Collection.open(Path(tmp) / "index")
        if c.count != n_frames:
            raise SystemExit(f"indexed {c.count} frames, sampled {n_frames}: the pipeline and the sampler disagree")
        disk = c.disk_bytes()

    per_frame = disk / n_frames
    record = {
        "what": f"video indexing on {len(clips)} real clips ({seconds:.1f} s of video), model {enc.name}, "
                f"one frame every {args.interval:g} s",
        "model": enc.name,
        "command": f"python benchmarks/video_throughput.py --model {args.model} --interval {args.interval:g}",
        "clips": [Path(c).name for c in clips],
        "video_seconds": round(seconds, 1),
        "frames": n_frames,
        "forward_only_frames_per_s": round(forward_fps, 1),
        "forward_only_passes_frames_per_s": [round(x, 1) for x in passes],
        "decode_sample_preprocess_frames_per_s": round(decode_fps, 1),
        "index_end_to_end_frames_per_s": round(n_frames / wall, 1),
        "ratio_end_to_end_vs_forward": round(n_frames / wall / forward_fps, 3),
        "index_wall_seconds": round(wall, 2),
        "video_seconds_indexed_per_wall_second": round(seconds / wall, 2),
        "index_bytes_per_frame": round(per_frame, 1),
        "index_megabytes_per_hour_of_video": round(per_frame * 3600 / args.interval / 1e6, 2),
        "index_kind": report.index_kind,
        "backend": f"{enc.backend.name} {enc.precision}",
        "machine": f"{platform.machine()}, {available_cores()} cpus, onnxruntime {onnxruntime.__version__}",
    }
    out = ROOT / "benchmarks" / "results" / f"video_throughput_{Path(enc.name).name}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
