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

Writes benchmarks/results/video_throughput_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmsearch.config import DEFAULT_FRAME_INTERVAL, DEFAULT_MODEL, IndexingConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", default=str(ROOT.parent / "shared" / "data" / "videos"))
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--interval", type=float, default=DEFAULT_FRAME_INTERVAL)
    args = ap.parse_args()

    import numpy as np
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
