"""Video: frames sampled by timestamp from the real clips in ../shared/data/videos, indexed next to
photos, answered as (video, time span); broken videos skipped; `mmsearch frame`."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import IndexingConfig
from mmsearch.errors import MediaError
from mmsearch.manifest import Sampling
from mmsearch.indexing import index_folder
from mmsearch.search import Searcher
from mmsearch.store import Collection
from mmsearch.video import Shot, VideoSampler, detect_shots, duration, frame_at, sample_frames
from tests.conftest import VIDEOS

runner = CliRunner()
CLIPS = ["airplane_then_field.mp4", "box.mp4", "chaplin.mp4", "cup.mp4", "tree.avi", "vtest.avi"]
#: airplane_then_field.mp4 cuts from the airliner to the field between these times (seconds; found by
#: sampling every 0.1 s: the last airplane frame and the first field frame)
CUT = (3.4, 3.5)


def clip(name: str) -> str:
    path = VIDEOS / name
    if not path.is_file():
        pytest.fail(f"test video not found at {path}: the repo expects ../shared/data beside it")
    return str(path)


def test_frames_are_sampled_by_timestamp():
    times = [f.t for f in sample_frames(clip("chaplin.mp4"), 1.0)]
    assert times == [float(i) for i in range(10)]  # 9.64 s at 25 fps: the first frame, then one per second
    # 25 fps: 2.5 s falls between frames, so the frame at 2.52 s is the first at or after it
    assert [f.t for f in sample_frames(clip("chaplin.mp4"), 2.5)] == [0.0, 2.52, 5.0, 7.52]
    # tree.avi has irregular frame times: each kept frame is the first one at or after its second
    every = [f.t for f in sample_frames(clip("tree.avi"), 0.001)]  # all frames
    frames = list(sample_frames(clip("tree.avi"), 1.0))
    expected = sorted({min(t for t in every if t >= s) for s in range(int(every[-1]) + 1) if any(t >= s for t in every)})
    assert [f.t for f in frames] == expected and frames[0].t == 0.0
    assert frames[0].image.size == (320, 240) and frames[0].image.mode == "RGB"


def test_skip_similar_drops_static_frames():
    every = list(sample_frames(clip("vtest.avi"), 1.0))
    fewer = list(sample_frames(clip("vtest.avi"), 1.0, skip_similar=1000.0))  # everything is "similar"
    assert len(every) == 80 and [f.t for f in fewer] == [0.0]


def test_the_cut_in_airplane_then_field_is_where_the_test_says():
    """Ground truth for the timestamp test below, checked on pixels: the sky-only airplane shots are
    bright at the bottom, the field shots have dark grass there."""
    frames = list(sample_frames(clip("airplane_then_field.mp4"), 0.1))
    bottom = [(f.t, float(np.asarray(f.image.convert("L"))[-60:].mean())) for f in frames if f.t < 6]
    before = [v for t, v in bottom if t <= CUT[0]]
    after = [v for t, v in bottom if t >= CUT[1]]
    assert min(before) > max(after) + 20, (min(before), max(after))


def test_frame_at_and_duration():
    assert duration(clip("vtest.avi")) == pytest.approx(79.5)
    image = frame_at(clip("vtest.avi"), 41.3)
    assert image.size == (768, 576)
    same = next(f for f in sample_frames(clip("vtest.avi"), 41.3) if f.t > 0)
    assert same.t == pytest.approx(41.3) and np.array_equal(np.asarray(image), np.asarray(same.image))
    with pytest.raises(MediaError, match="no frame at 500"):
        frame_at(clip("vtest.avi"), 500)


@pytest.mark.parametrize("data", [b"\xff\xd8\xff\xe0 not a video at all" * 50, (VIDEOS / "box.mp4").read_bytes()[:4096]])
def test_frame_at_of_a_broken_file_is_a_media_error(tmp_path, data):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(data)
    with pytest.raises(MediaError):  # never a bare PyAV error (a thumbnail of it must be a clean 4xx)
        frame_at(str(broken), 3.0)


def test_truncated_video_raises_after_its_frames(tmp_path):
    data = (VIDEOS / "box.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    got = []
    with pytest.raises(MediaError, match=r"truncated video: frames stop at \d+\.\ds of 15\.2s"):
        for f in sample_frames(str(cut)):
            got.append(f.t)
    assert len(got) >= 3 and got[0] == 0.0  # frames came first; the error follows them


def test_broken_videos_are_clear_errors(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video at all\n" * 50)
    with pytest.raises(MediaError, match="notes.mp4"):
        list(sample_frames(str(fake)))
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="zero-byte"):
        list(sample_frames(str(empty)))
    with pytest.raises(FileNotFoundError):
        list(sample_frames(str(tmp_path / "missing.mp4")))


@pytest.fixture(scope="module")
def video_index(tmp_path_factory, encoder):
    """The six real clips and a truncated copy of one, indexed at the default 1 s interval."""
    base = tmp_path_factory.mktemp("videos")
    folder = base / "media"
    folder.mkdir()
    for name in CLIPS:
        shutil.copy2(clip(name), folder / name)
    data = (VIDEOS / "box.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(data[: len(data) // 3])  # a download cut off: decodes 1/3, then ends
    skipped = []
    report = index_folder(folder, base / "index", encoder=encoder, on_skip=skipped.append)
    return folder, base / "index", report, skipped


def test_videos_are_indexed_frame_by_frame(video_index):
    folder, idx, report, skipped = video_index
    assert report.added == 6 and [s.path for s in skipped] == [str(folder / "truncated.mp4")]
    assert "truncated video: frames stop at" in skipped[0].reason  # none of its frames are kept
    c = Collection.open(idx)
    kinds = np.asarray(c.items.kind)
    assert set(kinds) == {"video"}
    per_video = {p: np.sort(c.items.t[[i for i, q in enumerate(c.items.path) if q == p]]) for p in set(c.items.path)}
    assert len(per_video[str(folder / "vtest.avi")]) == 80
    np.testing.assert_array_equal(per_video[str(folder / "chaplin.mp4")], np.arange(10.0))


@pytest.mark.parametrize("query,video", [
    ("people walking on a path", "vtest.avi"),
    ("an old black and white film of a man in a hat", "chaplin.mp4"),
    ("a large airplane flying in the grey sky", "airplane_then_field.mp4"),
])
def test_text_queries_find_the_right_video(video_index, encoder, query, video):
    folder, idx, _, _ = video_index
    hits = Searcher(idx, encoder=encoder).search_text(query, k=5)
    assert hits[0].kind == "video" and hits[0].path == str(folder / video), [(h.path, h.start) for h in hits]
    assert hits[0].start <= hits[0].end


def test_spans_find_when_the_scene_changes(video_index, encoder):
    """airplane_then_field.mp4: the airplane query's span ends, and the field query's span starts,
    within one sampling interval (1 s) of the cut."""
    folder, idx, _, _ = video_index
    s = Searcher(idx, encoder=encoder)
    path = str(folder / "airplane_then_field.mp4")
    plane = next(h for h in s.search_text("an airplane flying in the sky", k=20) if h.path == path)
    field = next(h for h in s.search_text("people sitting on a grassy field with a tree", k=20) if h.path == path)
    assert plane.start == 0.0 and CUT[0] - 1.0 <= plane.end <= CUT[1] + 1.0, plane
    assert CUT[0] - 1.0 <= field.start <= CUT[1] + 1.0, field


def test_video_output_on_the_cli_and_the_frame_command(video_index, tmp_path):
    folder, idx, _, _ = video_index
    r = runner.invoke(app, ["query", "people walking on a path", "--index", str(idx), "-k", "3"])
    assert r.exit_code == 0, r.output
    score, path, span = r.stdout.splitlines()[0].split("\t")
    start, end = map(float, span.split("-"))
    assert path == str(folder / "vtest.avi") and 0 <= start <= end <= 79.5
    r = runner.invoke(app, ["query", "people walking on a path", "--index", str(idx), "-k", "3", "--json"])
    top = json.loads(r.stdout)[0]
    assert (top["kind"], top["path"], top["start"], top["end"]) == ("video", path, start, end)
    out = tmp_path / "hit.jpg"
    r = runner.invoke(app, ["frame", path, "--at", str(start), "-o", str(out)])
    assert r.exit_code == 0, r.output
    from PIL import Image

    assert Image.open(out).size == (768, 576)
    r = runner.invoke(app, ["frame", path, "--at", "999", "-o", str(out)])
    assert r.exit_code == 1 and "no frame at 999" in r.stderr
    r = runner.invoke(app, ["query", "a dog", "--index", str(idx), "--kind", "image"])
    assert r.exit_code == 1 and "holds no image items" in r.stderr


def test_changed_and_deleted_videos(tmp_path, encoder):
    folder = tmp_path / "media"
    folder.mkdir()
    for name in ("chaplin.mp4", "tree.avi"):
        shutil.copy2(clip(name), folder / name)
    idx = tmp_path / "index"
    cfg = IndexingConfig(frame_interval=2.0)
    assert index_folder(folder, idx, encoder=encoder, config=cfg).added == 2
    first = Collection.open(idx)
    chaplin = [i for i, p in enumerate(first.items.path) if p.endswith("chaplin.mp4")]
    np.testing.assert_array_equal(first.items.t[chaplin], [0, 2, 4, 6, 8])
    again = index_folder(folder, idx, encoder=encoder, config=cfg)
    assert (again.added, again.updated, again.unchanged, again.changed) == (0, 0, 2, False)
    st = os.stat(folder / "chaplin.mp4")
    os.utime(folder / "chaplin.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "edited"
    r = index_folder(folder, idx, encoder=encoder, config=cfg)
    assert (r.added, r.updated, r.unchanged) == (0, 1, 1)
    c = Collection.open(idx)
    assert c.count == first.count  # old frames replaced, not duplicated
    (folder / "tree.avi").unlink()
    r = index_folder(folder, idx, encoder=encoder, config=cfg)
    assert r.removed == 1 and set(Collection.open(idx).items.path) == {str(folder / "chaplin.mp4")}
    r = index_folder(folder, idx, encoder=encoder, config=IndexingConfig(frame_interval=5.0))  # new interval
    assert r.updated == 1
    np.testing.assert_array_equal(np.sort(Collection.open(idx).items.t), [0, 5])


def test_an_image_query_finds_the_video_it_came_from(video_index, encoder, tmp_path):
    folder, idx, _, _ = video_index
    still = tmp_path / "still.jpg"
    frame_at(str(folder / "chaplin.mp4"), 4.0).save(still)  # a sampled frame, re-encoded as JPEG
    hits = Searcher(idx, encoder=encoder).search_image(still, k=3)
    assert hits[0].kind == "video" and hits[0].path == str(folder / "chaplin.mp4")
    assert hits[0].score > 0.95 and hits[0].start <= 4.0 <= hits[0].end, hits[0]


def _write_video(path, seconds: int, fps=2) -> None:
    """A test video (320x240, mpeg4), each second a different flat colour; ``fps`` may be a Fraction."""
    from fractions import Fraction

    import av

    fps = Fraction(fps)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for i in range(int(seconds * fps)):
            level = int(i / fps) * 37 % 256
            img = np.full((240, 320, 3), level, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_a_long_video_streams_in_constant_memory(tmp_path):
    """Sampling a 40-minute video needs no more memory than a 2-minute one (frames stream through)."""
    import subprocess
    import sys

    short, long = tmp_path / "short.mp4", tmp_path / "long.mp4"
    _write_video(short, 120)
    _write_video(long, 2400)
    code = ("import resource, sys; from mmsearch.video import sample_frames\n"
            "n = sum(1 for _ in sample_frames(sys.argv[1], 1.0))\n"
            "print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    res = {}
    for p in (short, long):
        out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, check=True).stdout
        res[p.name] = tuple(map(int, out.split()))
    assert res["short.mp4"][0] == 120 and res["long.mp4"][0] == 2400
    # peak RSS in KiB: kept in memory, the long video's 2,400 frames would add 2400 x 225 KiB = 530 MiB
    assert res["long.mp4"][1] < res["short.mp4"][1] + 50_000, res


def test_a_slow_frame_rate_is_not_mistaken_for_truncation(tmp_path):
    """One frame every 2 s: the last frame starts at 8 s of a 10 s video and lasts to its end."""
    from fractions import Fraction

    slow = tmp_path / "slow.mp4"
    _write_video(slow, 10, fps=Fraction(1, 2))
    assert [f.t for f in sample_frames(str(slow), 1.0)] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_indexing_texts_does_not_reset_how_videos_were_sampled(tmp_path, encoder):
    from mmsearch.indexing import index_texts

    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy2(clip("chaplin.mp4"), folder / "chaplin.mp4")
    idx = tmp_path / "index"
    cfg = IndexingConfig(frame_interval=3.0)
    index_folder(folder, idx, encoder=encoder, config=cfg)
    (tmp_path / "captions.txt").write_text("a man in a hat\n")
    index_texts(tmp_path / "captions.txt", idx, encoder=encoder)  # default config: 1 s interval
    r = index_folder(folder, idx, encoder=encoder, config=cfg)
    assert (r.unchanged, r.updated, r.changed) == (1, 0, False)
    assert Collection.open(idx).manifest.video_sampled == {
        str(folder / "chaplin.mp4"): Sampling(frame_interval=3.0, skip_similar=0.0)}
    # a later run that does not mention the interval keeps the index's (no re-sampling at 1 s)
    r = index_folder(folder, idx, encoder=encoder)
    assert (r.unchanged, r.updated) == (1, 0)


def _write_shots(path, shots, fps=25, gop=250, size=(160, 120), bframes=0) -> None:
    """A libx264 test video (keyframe every ``gop`` frames) of ``shots``: (seconds, seed) pairs, each a
    different random picture that drifts a pixel every 8 frames (motion within a shot, a cut between shots)."""
    import av

    w, h = size
    options = {"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "preset": "ultrafast", "bf": str(bframes)}
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for seconds, seed in shots:
            rng = np.random.default_rng(seed)
            tint = np.array([(250, 60, 60), (60, 250, 60), (60, 60, 250), (250, 250, 60)][seed % 4])  # its own colours
            base = (rng.integers(0, 128, (h // 8, w // 8 * 3, 3)) + tint // 2).astype(np.uint8).repeat(8, 0).repeat(8, 1)
            for i in range(round(seconds * fps)):
                img = np.ascontiguousarray(base[:, i // 8 % (w * 2): i // 8 % (w * 2) + w])
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.xfail(strict=True, reason="the change at 3.4-3.5 s is a 0.3 s dissolve (ContentDetector scores <= 6.2 a frame, "
                                       "a cut is 27; HistogramDetector does not separate it from hand motion in box.mp4 either)")
def test_the_cut_in_airplane_then_field_is_found():
    shots = detect_shots(clip("airplane_then_field.mp4"))
    assert any(abs(s.start - sum(CUT) / 2) <= 0.5 for s in shots[1:]), shots
    frames = list(VideoSampler(clip("airplane_then_field.mp4"), 1.0).frames())
    assert any(f.shot == 1 and CUT[0] - 1.0 <= f.t <= CUT[1] + 1.0 for f in frames), [(f.t, f.shot) for f in frames]


@pytest.mark.parametrize("name,seconds", [("vtest.avi", 79.5), ("chaplin.mp4", 9.64)])
def test_a_static_shot_is_not_split(name, seconds):
    """vtest.avi: a fixed camera on people walking for 80 s; chaplin.mp4: one continuous shot."""
    assert detect_shots(clip(name)) == [Shot(0.0, seconds)]
    sampler = VideoSampler(clip(name), 1.0)
    assert {f.shot for f in sampler.frames()} == {0} and sampler.shots == [Shot(0.0, seconds)]


@pytest.mark.parametrize("mode", ["decode", "seek"])
def test_a_short_shot_between_samples_gets_its_first_frame(tmp_path, mode):
    video = tmp_path / "shots.mp4"
    _write_shots(video, [(2.2, 1), (0.6, 2), (3.2, 3)], gop=25)  # a 0.6 s shot between the samples at 2 and 3 s
    sampler = VideoSampler(str(video), 1.0, mode=mode)
    got = [(f.t, f.shot) for f in sampler.frames()]
    assert got == [(0.0, 0), (1.0, 0), (2.0, 0), (2.2, 1), (2.8, 2), (3.0, 2), (4.0, 2), (5.0, 2)]
    assert sampler.shots == [Shot(0.0, 2.2), Shot(2.2, 2.8), Shot(2.8, 6.0)] and sampler.mode == mode


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """150 s, keyframes every 10 s, cuts at 37 s, 61.4 s (inside a keyframe stretch) and 130 s."""
    video = tmp_path_factory.mktemp("long") / "long.mp4"
    _write_shots(video, [(37, 1), (24.4, 2), (68.6, 3), (20, 4)], gop=250)
    return str(video)


@pytest.mark.parametrize("interval", [1.0, 7.0, 20.0, 45.0])
def test_seeking_samples_the_frames_full_decoding_does(long_video, interval):
    full, seek = VideoSampler(long_video, interval, mode="decode"), VideoSampler(long_video, interval, mode="seek")
    a, b = list(full.frames()), list(seek.frames())
    assert [f.t for f in b] == pytest.approx([f.t for f in a], abs=0.04)  # within one frame at 25 fps
    assert [f.shot for f in b] == [f.shot for f in a]
    assert full.shots == seek.shots == [Shot(0.0, 37.0), Shot(37.0, 61.4), Shot(61.4, 130.0), Shot(130.0, 150.0)]
    assert {37.0, 61.4, 130.0} <= {f.t for f in b}  # each shot's first frame is sampled
    assert np.array_equal(np.asarray(a[-1].image), np.asarray(b[-1].image))  # the same picture, too
    assert full.decoded == 3750
    if interval == 20.0:  # 2 of its 7 skipped stretches hold a cut and are decoded to find it; 45 s: all 3 do
        assert seek.decoded < 3750 / 2, seek.decoded


def test_auto_mode_seeks_only_when_that_skips_frames(long_video):
    for interval, mode in [(1.0, "decode"), (7.0, "decode"), (20.0, "seek"), (45.0, "seek")]:
        sampler = VideoSampler(long_video, interval)
        assert sampler.mode == "decode"  # nothing sampled yet
        list(sampler.frames())
        assert sampler.mode == mode, interval
    sampler = VideoSampler(clip("chaplin.mp4"), 20.0)  # one keyframe: nothing to seek to
    list(sampler.frames())
    assert sampler.mode == "decode"
    with pytest.raises(ValueError, match="sampling mode"):
        VideoSampler(long_video, 1.0, mode="fast")


def test_a_truncated_video_is_an_error_when_seeking_too(tmp_path, long_video):
    data = open(long_video, "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError):
        list(VideoSampler(str(cut), 20.0, mode="seek").frames())


def _every_frame(path: str, interval: float) -> tuple[int, list[tuple[float, np.ndarray]]]:
    """The naive reference: decode every frame, keep the first at or after each sample time."""
    import av

    kept, n, next_t = [], 0, 0.0
    with av.open(path) as c:
        for frame in c.decode(video=0):
            n, t = n + 1, float(frame.pts * frame.time_base)
            if t + 1e-6 >= next_t:
                next_t = (np.floor(t / interval + 1e-9) + 1) * interval
                kept.append((round(t, 3), frame.to_ndarray(format="rgb24")))
    return n, kept


@pytest.mark.parametrize("interval", [1.0, 0.5])
def test_frames_nobody_refers_to_are_skipped_and_the_samples_are_the_same(tmp_path, interval):
    video = tmp_path / "bframes.mp4"
    _write_shots(video, [(12, 5)], gop=250, bframes=3)  # one shot; B-frames that no frame refers to
    n, reference = _every_frame(str(video), interval)
    sampler = VideoSampler(str(video), interval, mode="decode")
    frames = list(sampler.frames())
    assert [f.t for f in frames] == [t for t, _ in reference]
    assert all(np.array_equal(np.asarray(f.image), pixels) for f, (_, pixels) in zip(frames, reference))
    assert sampler.decoded < 0.8 * n, (sampler.decoded, n)  # skipped, yet no sampled frame is missed
    assert sampler.shots == [Shot(0.0, 12.0)]


def test_frames_are_converted_at_a_reduced_size_only_down_to_min_side():
    path = clip("chaplin.mp4")  # 640x360
    full = next(iter(VideoSampler(path, 5.0).frames())).image
    assert full.size == (640, 360)
    assert next(iter(VideoSampler(path, 5.0, min_side=224).frames())).image.size == (640, 360)  # half would be < 224
    half = next(iter(VideoSampler(path, 5.0, min_side=180).frames())).image
    assert half.size == (320, 180)
    diff = np.abs(np.asarray(half, np.float32) - np.asarray(full.resize((320, 180), Image.BOX), np.float32))
    assert diff.mean() < 3.0, diff.mean()  # the same picture, averaged 2x2
