"""Thumbnails and browser-playable video clips for `mmsearch serve`, on real photos and videos, and
one clip played in a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsearch.errors import BadArgumentError, MediaError
from mmsearch.serve.thumbs import Thumbnails
from mmsearch.serve.transcode import SpanClips, browser_playable
from tests.conftest import VIDEOS, flickr8k

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VTEST = VIDEOS / "vtest.avi"  # MS-MPEG4 in AVI: no browser plays it


def _photo(n: int = 0) -> Path:
    return sorted((flickr8k() / "images").glob("*.jpg"))[n]


def _video(name: str) -> Path:
    path = VIDEOS / name
    if not path.is_file():
        pytest.fail(f"test video not found: {path}")
    return path


@pytest.fixture(scope="module")
def camera_jpeg(tmp_path_factory) -> Path:
    """A 12 MP camera-like JPEG (4000x3000 stored, quality 90) whose EXIF says "rotate 90° clockwise"
    (orientation 6), so it shows as 3000x4000."""
    path = tmp_path_factory.mktemp("camera") / "IMG_0001.JPG"
    im = Image.open(_photo(3)).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, "JPEG", quality=90, exif=exif.tobytes())
    return path


def _jpeg(path: Path) -> Image.Image:
    im = Image.open(path)
    assert im.format == "JPEG"
    im.load()
    return im


def test_camera_photo_thumbnail_is_upright_small_jpeg_and_cached(tmp_path, camera_jpeg, monkeypatch):
    thumbs = Thumbnails(tmp_path / "thumbs")
    start = time.perf_counter()
    path, etag = thumbs.get(str(camera_jpeg), 256)
    cold = time.perf_counter() - start
    im = _jpeg(path)
    assert im.size == (192, 256)  # the EXIF rotation applied: portrait, longest side = size
    assert path.is_relative_to(tmp_path / "thumbs") and etag in path.name
    assert cold < 5.0, f"thumbnail of a 12 MP JPEG took {cold:.2f}s (draft decoding should make it fast)"

    # the second request is served from the cache: nothing decodes and the file is not re-hashed
    import mmsearch.media
    import mmsearch.serve.thumbs as thumbs_module

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(mmsearch.media, "load_image", boom)
    monkeypatch.setattr(thumbs_module, "_sha1_file", boom)
    assert thumbs.get(str(camera_jpeg), 256) == (path, etag)
    # another Thumbnails over the same folder (a restarted server) finds it too, by content
    monkeypatch.undo()
    again = Thumbnails(tmp_path / "thumbs")
    monkeypatch.setattr(mmsearch.media, "load_image", boom)
    assert again.get(str(camera_jpeg), 256) == (path, etag)


def test_sizes_give_different_files_and_bad_sizes_are_refused(tmp_path, camera_jpeg):
    thumbs = Thumbnails(tmp_path)
    small, etag_small = thumbs.get(str(camera_jpeg), 64)
    large, etag_large = thumbs.get(str(camera_jpeg), 1024)
    assert small != large and etag_small != etag_large
    assert _jpeg(small).size == (48, 64) and _jpeg(large).size == (768, 1024)
    for size in (31, 0, -5, 1025, 4096):
        with pytest.raises(BadArgumentError, match="32 to 1024"):
            thumbs.get(str(camera_jpeg), size)


def test_small_photos_are_not_upscaled_and_same_content_shares_a_thumbnail(tmp_path):
    thumbs = Thumbnails(tmp_path / "thumbs")
    photo = _photo(0)
    path, etag = thumbs.get(str(photo), 512)
    assert _jpeg(path).size == Image.open(photo).size  # a 224x224 Flickr8k photo stays 224x224
    copy = tmp_path / "copy.jpg"
    shutil.copyfile(photo, copy)
    assert thumbs.get(str(copy), 512) == (path, etag)  # keyed by content, not by path
    other, other_etag = thumbs.get(str(_photo(1)), 512)
    assert other_etag != etag
    copy.write_bytes(_photo(1).read_bytes())  # the file is replaced: its thumbnail changes
    assert thumbs.get(str(copy), 512) == (other, other_etag)


def test_corrupt_or_missing_files_raise_media_errors(tmp_path):
    thumbs = Thumbnails(tmp_path / "thumbs")
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a JPEG" * 100)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_photo(2).read_bytes()[:3000])
    for bad in (garbage, truncated):
        with pytest.raises(MediaError, match=bad.name):
            thumbs.get(str(bad), 128)
    with pytest.raises(MediaError):
        thumbs.get(str(garbage), 128, t=1.0)  # as a video
    with pytest.raises(FileNotFoundError):
        thumbs.get(str(tmp_path / "missing.jpg"), 128)
    assert not list((tmp_path / "thumbs").rglob("*.jpg"))  # nothing cached for them


def test_video_thumbnail_is_the_frame_at_its_time(tmp_path):
    thumbs = Thumbnails(tmp_path)
    video = _video("airplane_then_field.mp4")  # an airplane, then a field: the scene changes
    first, etag0 = thumbs.get(str(video), 256, t=0.0)
    later, etag8 = thumbs.get(str(video), 256, t=8.0)
    assert etag0 != etag8 and first != later
    a, b = _jpeg(first), _jpeg(later)
    assert a.size == b.size == (256, 144)  # 640x360 scaled to a 256 px long side
    diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
    assert diff > 10, f"the frames at 0s and 8s look the same (mean difference {diff:.1f})"
    assert thumbs.get(str(video), 256, t=8.0) == (later, etag8)
    for t in (-1.0, float("nan"), float("inf")):
        with pytest.raises(BadArgumentError):
            thumbs.get(str(video), 256, t=t)
    with pytest.raises(MediaError, match="no frame"):
        thumbs.get(str(video), 256, t=60.0)  # the video lasts 11.2 s


def test_threads_asking_for_the_same_thumbnail_make_it_once(tmp_path, camera_jpeg, monkeypatch):
    import mmsearch.media

    calls = []
    real = mmsearch.media.load_image

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(mmsearch.media, "load_image", counting)
    thumbs = Thumbnails(tmp_path)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:  # as the server calls it
        results = list(pool.map(lambda _: thumbs.get(str(camera_jpeg), 300), range(8)))
    assert len(set(results)) == 1 and len(calls) == 1
    assert _jpeg(results[0][0]).size == (225, 300)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [results[0][0].name]  # no temp files left


def _codec(path: Path) -> tuple[str, str]:
    import av

    with av.open(str(path)) as c:
        return c.format.name, c.streams.video[0].codec_context.name


def _make_video(path: Path, codec: str, fmt: str, frames: int = 10) -> Path:
    import av

    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.full((48, 64, 3), i * 20 % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def test_browser_playable_probes_container_and_codec(tmp_path):
    assert _codec(VTEST) == ("avi", "msmpeg4")
    assert _codec(_video("cup.mp4"))[1] == "h264"
    assert browser_playable(VTEST) is False
    assert browser_playable(_video("tree.avi")) is False  # Cinepak in AVI
    assert browser_playable(_video("cup.mp4")) is True
    assert browser_playable(_make_video(tmp_path / "vp8.webm", "libvpx", "webm")) is True
    # the extension says MP4 but the codec is MPEG-4 Part 2, which browsers do not decode
    assert browser_playable(_make_video(tmp_path / "part2.mp4", "mpeg4", "mp4")) is False
    renamed = tmp_path / "vtest.mp4"  # an AVI named .mp4 is still an AVI
    shutil.copyfile(VTEST, renamed)
    assert browser_playable(renamed) is False
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("hello")
    assert browser_playable(not_video) is False
    assert browser_playable(_photo(0)) is False


def _clip_facts(path: Path) -> tuple[float, str, int, int, Image.Image]:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        first = next(c.decode(s)).to_image()
        return c.duration / 1e6, s.codec_context.name, s.width, s.height, first


def _mean_diff(a: Image.Image, b: Image.Image) -> float:
    b = b.convert("RGB").resize(a.size)
    return float(np.abs(np.asarray(a.convert("RGB"), np.float32) - np.asarray(b, np.float32)).mean())


def test_span_clip_of_an_avi_is_a_cached_playable_mp4_of_the_span(tmp_path, monkeypatch):
    from mmsearch.video import frame_at

    clips = SpanClips(tmp_path / "clips")
    start = time.perf_counter()
    clip, mime = clips.get(str(VTEST), 40, 43)
    cold = time.perf_counter() - start
    assert mime == "video/mp4" and clip.is_file() and clip.is_relative_to(tmp_path / "clips")
    seconds, codec, width, height, first = _clip_facts(clip)
    assert abs(seconds - 3.0) < 0.15 and codec == "h264" and (width, height) == (640, 480)
    assert browser_playable(clip)
    assert cold < 20, f"transcoding 3 s took {cold:.1f}s"
    # the clip starts at the span: its first frame is the video's frame at 40 s, not at 0 s
    assert _mean_diff(first, frame_at(str(VTEST), 40.0)) < 0.5 * _mean_diff(first, frame_at(str(VTEST), 0.0))

    import mmsearch.serve.transcode as transcode_module

    monkeypatch.setattr(transcode_module, "transcode", lambda *a: pytest.fail("transcoded again"))
    start = time.perf_counter()
    assert clips.get(str(VTEST), 40, 43) == (clip, mime)
    assert time.perf_counter() - start < 0.5
    assert SpanClips(tmp_path / "clips").get(str(VTEST), 40.0, 43.0) == (clip, mime)  # after a restart too


def test_span_clips_are_clamped_and_bad_spans_refused(tmp_path):
    clips = SpanClips(tmp_path / "clips")
    tail, _ = clips.get(str(VTEST), 76, 500)  # vtest.avi lasts 79.5 s
    assert abs(_clip_facts(tail)[0] - 3.5) < 0.15
    other, _ = clips.get(str(VTEST), 2, 5)
    assert other != tail
    for start, end in ((5, 2), (-1, 3), (3, 3), (80, 90), (float("nan"), 3)):
        with pytest.raises(BadArgumentError):
            clips.get(str(VTEST), start, end)
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"RIFF" + b"\0" * 500)
    with pytest.raises(MediaError):
        clips.get(str(broken), 0, 3)
    cached = sorted(p.name for p in (tmp_path / "clips").rglob("*") if p.is_file())
    assert cached == sorted([tail.name, other.name])  # no clip and no temp file for the failures


def test_chromium_plays_the_clip(tmp_path):
    """The transcoded clip loads in a real browser (its metadata and first frame) and lasts the span;
    the AVI it came from does not (so the check can fail)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium not found: `apt-get install -y chromium` (this test plays a clip in Debian's chromium)")
    from playwright.sync_api import sync_playwright

    clip, _ = SpanClips(tmp_path / "clips").get(str(VTEST), 2, 5)
    page_file = tmp_path / "page.html"
    page_file.write_text("<!doctype html><title>clip</title><body></body>")
    load = """(src) => new Promise(done => {
        const v = document.createElement('video');
        v.muted = true; v.preload = 'auto';
        let meta = null;
        v.onloadedmetadata = () => { meta = [v.duration, v.videoWidth, v.videoHeight]; };
        v.onloadeddata = () => done({meta, frame: true, duration: v.duration});
        v.onerror = () => done({error: v.error ? v.error.code : -1});
        setTimeout(() => done({timeout: true, meta}), 15000);
        v.src = src; document.body.appendChild(v);
    })"""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(page_file.as_uri())
            can = page.evaluate("t => document.createElement('video').canPlayType(t)", 'video/mp4; codecs="avc1.42E01E"')
            played = page.evaluate(load, clip.as_uri())
            original = page.evaluate(load, VTEST.as_uri())
        finally:
            browser.close()
    assert can in ("probably", "maybe")
    assert played.get("frame") and played["meta"] is not None, played
    duration, width, height = played["meta"]
    assert abs(duration - 3.0) < 0.15 and (width, height) == (640, 480)
    assert "error" in original, original
