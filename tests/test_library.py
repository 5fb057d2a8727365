"""docs/library.md's example runs as written, and the library API keeps its promises."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_library_example_runs(tmp_path, pairs, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "library.md").read_text(), re.S).group(1)
    (tmp_path / "photos").mkdir()
    shutil.copy(pairs.images[0], tmp_path / "photos" / "a.jpg")
    shutil.copy(pairs.images[1], tmp_path / "photos" / "b.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/library.md", "exec"), scope)
    assert scope["img"].shape == (2, 256) and scope["D"].shape == (1, 2)
    assert set(scope["I"][0]) == {10, 11}
    assert (tmp_path / "photos.faiss").is_file()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(str(tmp_path / "photos") in line for line in lines)


def test_import_is_light_and_errors_subclass_builtins():
    import mmsearch

    assert issubclass(mmsearch.IndexNotFoundError, FileNotFoundError)
    assert issubclass(mmsearch.EmptyIndexError, ValueError)
    assert issubclass(mmsearch.ModelLoadError, RuntimeError)
    assert all(issubclass(getattr(mmsearch, n), mmsearch.MmsearchError) for n in mmsearch.__all__ if n.endswith("Error") and n != "MmsearchError")
    with pytest.raises(AttributeError):
        mmsearch.NoSuchThing  # noqa: B018


def test_searcher_refuses_an_encoder_of_another_model(built_index):
    from mmsearch.errors import ModelMismatchError
    from mmsearch.search import Searcher

    class Other:
        name = "ViT-B-32@laion2b_s34b_b79k"

    with pytest.raises(ModelMismatchError, match="mmsearch-lite"):
        Searcher(built_index[0], encoder=Other())


def test_search_vectors_is_numpy_in_numpy_out(built_index, encoder, pairs):
    from mmsearch.search import Searcher

    idx, mapping = built_index
    s = Searcher(idx, encoder=encoder)
    q = encoder.embed_images(pairs.images[:3])
    D, I = s.search_vectors(q, k=100)
    assert D.shape == I.shape == (3, 12) and I.dtype == np.int64 and (I >= 0).all()
    assert np.all(np.diff(D, axis=1) <= 1e-6)
    # exact search equals brute force over the stored embeddings
    emb = np.asarray(s.collection.embeddings)
    ref = np.sort(q @ emb.T, axis=1)[:, ::-1]
    assert np.allclose(D, ref, atol=1e-5)
    hits = s.hits(D, I)
    assert [h.path for h in hits[0][:1]] == [mapping[pairs.images[0]]]
