"""Shared fixtures: a few real Flickr8k photos (copied into tmp, never into the repo) and one
shared encoder of the built-in model (loading it takes seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
VIDEOS = ROOT.parent / "shared" / "data" / "videos"
N_PHOTOS = 12


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """A fresh mmsearch cache for the session (ONNX exports, file hashes): tests never touch
    ~/.cache, and the first use of a built-in model exports it here, as on a new machine."""
    import os

    folder = tmp_path_factory.mktemp("mmsearch-cache")
    before = os.environ.get("MMSEARCH_CACHE")
    os.environ["MMSEARCH_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("MMSEARCH_CACHE", None)
    else:
        os.environ["MMSEARCH_CACHE"] = before


def _require_data() -> None:
    if not (FLICKR / "images").is_dir():
        pytest.fail(f"test data not found at {FLICKR}: the repo expects ../shared/data beside it")


def flickr8k() -> Path:
    """The Flickr8k folder of ../shared/data; the calling test fails (never skips) without it."""
    _require_data()
    return FLICKR


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    """Tests see the CLI's default error output, whatever MMSEARCH_DEBUG the developer exported."""
    monkeypatch.delenv("MMSEARCH_DEBUG", raising=False)


@pytest.fixture(scope="session")
def pairs():
    """The first N_PHOTOS images of the Flickr8k test split, with their captions."""
    _require_data()
    from mmsearch.data import load_flickr8k

    return load_flickr8k(FLICKR, "test").subset(N_PHOTOS)


@pytest.fixture(scope="session")
def encoder():
    """The built-in default model as a user gets it: on ONNX Runtime, exported on first use, at its
    default precision (int8 for mmsearch-lite2)."""
    from mmsearch.encoder import get_encoder

    return get_encoder()


@pytest.fixture(scope="session")
def fp32_encoder():
    """The same model's fp32 graphs on ONNX Runtime."""
    from mmsearch.encoder import get_encoder

    return get_encoder(precision="fp32")


@pytest.fixture(scope="session")
def torch_encoder():
    """The same model run by open_clip in torch: the reference the ONNX path is checked against."""
    from mmsearch.encoder import get_encoder

    return get_encoder(backend="torch")


def copy_photos(pairs, dest: Path) -> dict[str, str]:
    """Copy the photos into dest (a third of them into a nested folder); original -> copy path."""
    mapping = {}
    for i, src in enumerate(pairs.images):
        sub = dest / "trip" / "day2" if i % 3 == 2 else dest
        sub.mkdir(parents=True, exist_ok=True)
        target = sub / Path(src).name
        shutil.copy2(src, target)
        mapping[src] = str(target)
    return mapping


@pytest.fixture
def photo_dir(tmp_path, pairs):
    """A fresh folder of real photos; returns (folder, {original path: copied path})."""
    folder = tmp_path / "photos"
    return folder, copy_photos(pairs, folder)


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, pairs, encoder):
    """One index over the photos, built once through the library (read-only for tests)."""
    from mmsearch.indexing import index_folder

    base = tmp_path_factory.mktemp("built")
    mapping = copy_photos(pairs, base / "photos")
    index_folder(base / "photos", base / "index", encoder=encoder)
    return base / "index", mapping


class CountingEncoder:
    """Wraps the real encoder and counts the images and texts it embeds."""

    def __init__(self, inner):
        self.inner, self.embedded, self.texts = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def embed_pixels(self, pixels):
        self.embedded += len(pixels)
        return self.inner.embed_pixels(pixels)

    def embed_texts(self, texts):
        self.texts += len(texts)
        return self.inner.embed_texts(texts)
