"""Tests of mmsearch.media: scanning folders (symlinks, loops, junk files) and decoding images safely."""

from __future__ import annotations

import os
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsearch import media
from mmsearch.config import IndexingConfig
from mmsearch.errors import MediaError
from mmsearch.media import MediaFile, Skipped, load_image, scan
from tests.conftest import flickr8k


@pytest.fixture(scope="module")
def real():
    """Four real Flickr8k photos; a test that needs them fails (never skips) without ../shared/data."""
    return sorted((flickr8k() / "images").glob("*.jpg"))[:4]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose IHDR declares width x height RGB pixels (its IDAT holds almost nothing)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def tree(tmp_path_factory, real):
    """A photo folder holding good images, junk, links and loops; returns (root, outside folder)."""
    base = tmp_path_factory.mktemp("media")
    root = base / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    shutil.copy(real[0], root / "a.jpg")
    shutil.copy(real[1], root / "B.JPG")
    shutil.copy(real[2], root / "sub" / "deeper" / "c.jpg")

    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")

    frame0 = Image.new("P", (32, 24), 1)
    frame0.putpalette([0, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    frame0.paste(0, (0, 0, 16, 24))  # left half: index 0, the transparent one
    frame1 = Image.new("P", (32, 24), 2)
    frame1.putpalette(frame0.getpalette())
    frame0.save(root / "anim.gif", save_all=True, append_images=[frame1], transparency=0, duration=100, loop=0)

    gray = np.tile(np.array([0, 32768, 65535], np.uint16), (10, 1))  # 3 wide, 10 high
    Image.fromarray(gray).save(root / "gray16.png")
    with Image.open(root / "gray16.png") as im:
        assert im.mode in ("I;16", "I")

    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (0, 0, 200)).save(root / "rotated.jpg", exif=exif)

    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not a picture\n")
    data = real[3].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "._a.jpg").write_bytes(b"\0\x05\x16\x07" + b"\0" * 60)  # AppleDouble resource fork
    (root / "notes.txt").write_text("ignored")
    (root / "README").write_text("ignored too")
    _png_header_only(root / "huge.png", 20_000, 20_000)
    shutil.copy(real[3], root / "locked.jpg")
    os.chmod(root / "locked.jpg", 0)

    os.symlink("..", root / "sub" / "loop")  # link to the parent folder
    os.symlink("sub", root / "a_alias")  # second path to a folder walked anyway (sorts before it)
    os.symlink("a.jpg", root / "A_link.jpg")  # second path to a file, sorting before it
    os.symlink("missing.jpg", root / "broken.jpg")
    os.symlink("selfloop.jpg", root / "selfloop.jpg")
    os.symlink("gone.txt", root / "broken.txt")  # non-image name: ignored
    outside = base / "elsewhere"
    outside.mkdir()
    shutil.copy(real[0], outside / "d.jpg")  # same bytes as a.jpg but another file: kept
    os.symlink(outside, root / "ext")
    return root, outside


def _p(root: Path, rel: str) -> str:
    return str(root / rel)


GOOD = ["B.JPG", "a.jpg", "anim.gif", "cmyk.jpg", "ext/d.jpg", "gray16.png", "rgba.png", "rotated.jpg",
        "sub/deeper/c.jpg"]  # fmt: skip
UNDECODABLE = ["huge.png", "text.png", "truncated.jpg"]  # found by scan (it never decodes), rejected by load_image


@pytest.fixture
def unreadable(tree, monkeypatch):
    """Make locked.jpg unreadable even when the tests run as root (where chmod 000 does not block reads)."""
    root, _ = tree
    locked = _p(root, "locked.jpg")
    if os.geteuid() == 0:
        real_access, real_open = os.access, open

        def fake_access(path, mode, **kw):
            return False if os.fspath(path) == locked else real_access(path, mode, **kw)

        def fake_open(path, *a, **kw):
            if os.fspath(path) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real_open(path, *a, **kw)

        monkeypatch.setattr(os, "access", fake_access)
        monkeypatch.setattr(media, "open", fake_open, raising=False)
    return locked


def test_scan_finds_each_image_once_sorted(tree, unreadable):
    root, _ = tree
    files, skipped = scan(root)
    assert [f.path for f in files] == sorted(_p(root, r) for r in GOOD + UNDECODABLE)
    assert all(os.path.isabs(f.path) and f.kind == "image" for f in files)
    a = next(f for f in files if f.path.endswith("/a.jpg"))
    st = os.stat(root / "a.jpg")
    assert (a.size, a.mtime_ns) == (st.st_size, st.st_mtime_ns)
    reasons = {s.path: s.reason for s in skipped}
    expected = {
        "empty.jpg": "zero-byte",
        "._a.jpg": "AppleDouble",
        "sub/loop": "symlink loop",
        "selfloop.jpg": "symlink loop",
        "broken.jpg": "broken symlink",
        "A_link.jpg": f"duplicate of {_p(root, 'a.jpg')}",
        "a_alias": f"duplicate of folder {_p(root, 'sub')}",
        "locked.jpg": "permission denied",
    }
    assert sorted(reasons) == sorted(_p(root, r) for r in expected)
    for rel, word in expected.items():
        assert word in reasons[_p(root, rel)], (rel, reasons[_p(root, rel)])
    assert [s.path for s in skipped] == sorted(reasons)
    assert scan(str(root)) == (files, skipped)  # deterministic, str or Path


def test_scan_without_following_symlinks(tree):
    root, _ = tree
    files, skipped = scan(root, IndexingConfig(follow_symlinks=False))
    assert _p(root, "ext/d.jpg") not in [f.path for f in files]
    reasons = {s.path: s.reason for s in skipped}
    for rel in ("A_link.jpg", "broken.jpg", "selfloop.jpg"):
        assert reasons[_p(root, rel)] == "symlink not followed"
    assert _p(root, "sub/loop") not in reasons and _p(root, "a_alias") not in reasons


def test_scan_extensions_are_case_insensitive(tmp_path):
    (tmp_path / "x.PnG").write_bytes(b"1")
    (tmp_path / "y.jpg").write_bytes(b"1")
    files, _ = scan(tmp_path, IndexingConfig(extensions=frozenset({".png"})))
    assert [f.path for f in files] == [str(tmp_path / "x.PnG")]


def test_scan_missing_or_wrong_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        scan(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="notes.txt"):
        scan(tmp_path / "notes.txt")
    (tmp_path / "one.jpg").write_bytes(b"not really")
    assert [f.path for f in scan(tmp_path / "one.jpg")[0]] == [str(tmp_path / "one.jpg")]


def test_scan_reports_unlistable_folder(tmp_path, monkeypatch):
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "x.jpg").write_bytes(b"1")
    (tmp_path / "y.jpg").write_bytes(b"1")
    real_scandir = os.scandir

    def fake_scandir(path):
        if os.fspath(path).endswith("private"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    files, skipped = scan(tmp_path)
    assert [f.path for f in files] == [str(tmp_path / "y.jpg")]
    assert skipped == [Skipped(str(tmp_path / "private"), "cannot list folder: permission denied", unreadable=True)]


def test_scan_does_not_follow_links_to_ancestors_outside_root(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"1")
    (tmp_path / "other.png").write_bytes(b"1")  # outside the scanned root: must not be found via the link
    os.symlink(tmp_path, tmp_path / "a" / "b" / "top")
    files, skipped = scan(tmp_path / "a")
    assert [f.path for f in files] == [str(tmp_path / "a/b/x.png")]
    assert skipped == [Skipped(str(tmp_path / "a/b/top"), "symlink loop")]


def test_scan_survives_links_to_ancestors(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.png").write_bytes(b"1")
    os.symlink(tmp_path, tmp_path / "a" / "b" / "up")
    os.symlink("../..", tmp_path / "a" / "b" / "up2")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "up3")
    files, skipped = scan(tmp_path)
    assert files == [MediaFile(str(tmp_path / "a/b/x.png"), 1, os.stat(tmp_path / "a/b/x.png").st_mtime_ns, "image")]
    assert [(s.path, s.reason) for s in skipped] == [
        (str(tmp_path / "a/b" / n), "symlink loop") for n in ("up", "up2", "up3")
    ]


def test_load_image_good_files(tree, real):
    root, _ = tree
    for rel in GOOD:
        im = load_image(root / rel)
        assert im.mode == "RGB"
        im.getpixel((0, 0))  # fully decoded
    for photo, rel in zip(real, ["a.jpg", "B.JPG", "sub/deeper/c.jpg"]):
        with Image.open(photo) as im:
            assert load_image(root / rel).size == im.size

    rgba = np.asarray(load_image(root / "rgba.png"))
    assert rgba.shape == (30, 40, 3)
    assert tuple(rgba[5, 5]) == (255, 0, 0) and tuple(rgba[5, 35]) == (255, 255, 255)  # transparent -> white

    gif = np.asarray(load_image(root / "anim.gif"))  # first frame: transparent left half, green right half
    assert gif.shape == (24, 32, 3)
    assert tuple(gif[5, 5]) == (255, 255, 255) and tuple(gif[5, 30]) == (0, 255, 0)

    gray = np.asarray(load_image(root / "gray16.png"))
    assert gray.shape == (10, 3, 3)
    assert list(gray[0, :, 0]) == [0, 128, 255]

    cmyk = np.asarray(load_image(root / "cmyk.jpg")).astype(int)
    assert cmyk[4, 8, 0] > 200 and cmyk[4, 8, 1] < 60 and cmyk[4, 8, 2] < 60

    assert load_image(root / "rotated.jpg").size == (20, 40)  # EXIF orientation applied


def test_load_image_bad_files(tree, unreadable):
    root, _ = tree
    cases = {
        "empty.jpg": "zero-byte file",
        "text.png": "not an image",
        "truncated.jpg": "truncated or corrupt",
        "huge.png": "too large",
        "locked.jpg": "permission denied",
    }
    for rel, word in cases.items():
        with pytest.raises(MediaError) as info:
            load_image(root / rel)
        msg = str(info.value)
        assert msg.startswith(_p(root, rel) + ": ") and word in msg and "\n" not in msg, msg
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(root / "missing.jpg")
    with pytest.raises(FileNotFoundError, match="broken.jpg"):
        load_image(root / "broken.jpg")


def test_max_pixels_checked_before_decoding(tree):
    root, _ = tree
    with pytest.raises(MediaError, match=r"a.jpg: too large: 224x224 = 0.1 MP > 0.001 MP limit"):
        load_image(root / "a.jpg", max_pixels=1000)
    assert load_image(root / "a.jpg", max_pixels=224 * 224).mode == "RGB"


def test_huge_headers_rejected_quietly(tmp_path):
    """Header-only giants: Pillow's warning (> ~89 MP) and error (> ~179 MP) both end as MediaError."""
    before = Image.MAX_IMAGE_PIXELS
    _png_header_only(tmp_path / "110mp.png", 11_000, 10_000)
    _png_header_only(tmp_path / "400mp.png", 20_000, 20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning escaping load_image fails the test
        with pytest.raises(MediaError, match=r"110mp.png: too large: 11000x10000 = 110.0 MP > 100 MP limit"):
            load_image(tmp_path / "110mp.png")
        with pytest.raises(MediaError, match=r"400mp.png: too large: 400.0 MP > 100 MP limit"):
            load_image(tmp_path / "400mp.png")
        with pytest.raises(MediaError, match="too large"):
            load_image(tmp_path / "400mp.png", max_pixels=10**12)  # Pillow's own limit still holds
    assert Image.MAX_IMAGE_PIXELS == before


def test_decoding_in_threads_leaves_the_warning_filters_as_they_were(tmp_path, tree):
    """Several threads silencing Pillow at once must not leave "ignore" installed for the process."""
    from mmsearch._util import ordered_map

    root, _ = tree
    _png_header_only(tmp_path / "110mp.png", 11_000, 10_000)  # Pillow warns about this one
    paths = sorted(p for p in root.rglob("*.jpg")) * 20 + [tmp_path / "110mp.png"] * 20
    before = list(warnings.filters)

    def decode(p):
        try:
            return load_image(p, min_side=64).size
        except (MediaError, OSError):
            return None

    results = list(ordered_map(decode, paths, workers=4, ahead=16))
    assert len(results) == len(paths) and results[-1] is None and any(results)
    assert warnings.filters == before
