"""Image->text search over texts in the index, pair tables, and `mmsearch eval`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.data import load_pairs, load_table
from mmsearch.indexing import index_folder, index_texts
from mmsearch.search import Searcher
from mmsearch.store import Collection
from tests.conftest import CountingEncoder

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def captions_file(tmp_path, pairs):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(c for caps in pairs.captions for c in caps) + "\n\n")
    return path


def test_image_query_returns_its_own_captions(photo_dir, pairs, captions_file, encoder, tmp_path):
    folder, mapping = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    r = index_texts(captions_file, idx, encoder=encoder)
    assert (r.added, r.total) == (60, 72)
    s = Searcher(idx, encoder=encoder)
    found = 0
    for i, photo in enumerate(pairs.images):
        hits = s.search_image(mapping[photo], k=5)  # auto: an image query on a mixed index -> texts
        assert [h.kind for h in hits] == ["text"] * 5 and all(h.text for h in hits)
        found += any(h.text in pairs.captions[i] for h in hits)
    assert found >= 8, found  # most photos find one of their own five captions in the top 5
    # restricting by kind, and text -> images stays cross-modal by default
    assert {h.kind for h in s.search_image(mapping[pairs.images[0]], k=20, kind="image")} == {"image"}
    assert {h.kind for h in s.search_text("a dog", k=30)} == {"image"}
    assert len(s.search_text("a dog", k=100, kind="all")) == 72
    assert [h.kind for h in s.search_text("a dog", k=100, kind="text")] == ["text"] * 60


def test_texts_are_indexed_incrementally(captions_file, encoder, tmp_path):
    idx = tmp_path / "idx"
    index_texts(captions_file, idx, encoder=encoder)
    before = Collection.open(idx)
    ids = dict(zip(before.items.path, before.items.id.tolist()))
    lines = captions_file.read_text().splitlines()
    lines[0] = "A completely new sentence about a red bicycle ."
    del lines[5]  # a deleted line: later lines move up, their (unchanged) texts are re-matched by line
    captions_file.write_text("\n".join(lines[:10]) + "\n")
    r = index_texts(captions_file, idx, encoder=encoder)
    after = Collection.open(idx)
    assert after.count == 10 and r.removed >= 50
    assert after.items.text[after.items.path.index(f"{captions_file}#1")].startswith("A completely new")
    assert int(after.items.id[after.items.path.index(f"{captions_file}#2")]) == ids[f"{captions_file}#2"]
    again = index_texts(captions_file, idx, encoder=encoder)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, 10)


def test_a_moved_line_keeps_its_vector_without_re_encoding(captions_file, encoder, tmp_path):
    idx = tmp_path / "idx"
    index_texts(captions_file, idx, encoder=encoder)
    before = Collection.open(idx)
    vec = {t: np.array(e) for t, e in zip(before.items.text, before.embeddings)}
    lines = captions_file.read_text().splitlines()
    captions_file.write_text("\n".join(["A brand new first line about a green kite ."] + lines) + "\n")
    counting = CountingEncoder(encoder)
    r = index_texts(captions_file, idx, encoder=counting)
    assert counting.texts == 1  # only the new line is encoded; the 60 shifted lines reuse their vectors
    assert (r.added, r.updated, r.total) == (1, 60, 61)  # lines are keyed by number: 60 moved, 1 appended
    after = Collection.open(idx)
    for t, e in zip(after.items.text, after.embeddings):
        if t in vec:
            np.testing.assert_array_equal(e, vec[t])
    hits = Searcher(idx, encoder=encoder).search_text("a green kite", k=1, kind="text")
    assert hits[0].text.startswith("A brand new first line")


def test_texts_inside_an_image_folder_survive_re_indexing_the_folder(photo_dir, pairs, encoder, tmp_path):
    folder, _ = photo_dir
    captions = folder / "captions.txt"
    captions.write_text("\n".join(pairs.captions[0]) + "\n")
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    index_texts(captions, idx, encoder=encoder)
    r = index_folder(folder, idx, encoder=encoder)  # the folder scan finds no "captions.txt#1" files
    assert (r.removed, r.total) == (0, 17)
    counts = Collection.open(idx).manifest.counts_by_kind
    assert counts == {"image": 12, "text": 5}
    next(folder.glob("*.jpg")).unlink()
    r = index_folder(folder, idx, encoder=encoder)
    assert (r.removed, r.total) == (1, 16)
    r = index_texts(captions, idx, encoder=encoder)  # and the texts source leaves the images alone
    assert (r.removed, r.unchanged, r.total) == (0, 5, 16)


def test_cli_texts_and_kind(photo_dir, captions_file, tmp_path):
    folder, _ = photo_dir
    idx = tmp_path / "idx"
    r = run("index", folder, "--texts", captions_file, "--index", idx, "-q")
    assert r.exit_code == 0 and "texts 60 added" in r.stderr, r.output
    photo = next(folder.glob("*.jpg"))
    out = run("query", "--image", photo, "-k", "3", "--json", "--index", idx).stdout
    hits = json.loads(out)
    assert [h["kind"] for h in hits] == ["text"] * 3 and all(h["text"] and "#" in h["path"] for h in hits)
    lines = run("query", "--image", photo, "-k", "3", "--index", idx).stdout.splitlines()
    assert [line.split("\t")[1] for line in lines] == [h["text"] for h in hits]
    assert json.loads(run("query", "--image", photo, "--kind", "image", "-k", "1", "--json",
                          "--index", idx).stdout)[0]["path"] == str(photo)
    assert run("query", "x", "--kind", "video", "--index", idx).exit_code == 1
    r = run("index", "--index", tmp_path / "i2")
    assert r.exit_code == 1 and "nothing to index" in r.stderr


def test_pairs_table_reports_problems(tmp_path, pairs):
    shutil.copy(pairs.images[0], tmp_path / "a.jpg")
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\na.jpg,a first caption\na.jpg,\nmissing.jpg,lost\n"
                     f"{pairs.images[1]},absolute path caption\n")
    p = load_table(table)
    assert p.images == [str(tmp_path / "a.jpg"), pairs.images[1]]
    assert p.captions == [["a first caption"], ["absolute path caption"]]
    assert p.missing_images == [str(tmp_path / "missing.jpg")] and p.empty_captions == 1
    assert any("1 image(s) not found" in line and "missing.jpg" in line for line in p.problems())
    bad = tmp_path / "bad.tsv"
    bad.write_text("file\ttext\nx.jpg\thello\n")
    with pytest.raises(ValueError, match="no column 'image', 'caption'"):
        load_table(bad)
    with pytest.raises(ValueError, match="split"):
        load_pairs(table, "test")


def test_eval_json_on_a_pairs_table_matches_the_library(tmp_path, pairs, encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmsearch.evaluate import evaluate

    table = tmp_path / "pairs.parquet"
    rows = [(img, c) for img, caps in zip(pairs.images, pairs.captions) for c in caps]
    pq.write_table(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}), table)
    r = run("eval", table, "--json", "-q")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert set(got) >= {"t2i", "i2t", "n_images", "n_texts"} and set(got["t2i"]) == {"1", "5", "10"}
    assert (got["n_images"], got["n_texts"]) == (12, 60)
    want = evaluate(encoder, load_table(table))
    assert got["t2i"] == {str(k): v for k, v in want["t2i"].items()}
    assert got["i2t"] == {str(k): v for k, v in want["i2t"].items()}
    assert got["t2i"]["1"] <= got["t2i"]["5"] <= got["t2i"]["10"] <= 1
    assert 0 < got["t2i"]["1"] < 1


def test_eval_via_index_reports_ann_recall(pairs, encoder):
    from mmsearch.config import IndexSpec
    from mmsearch.evaluate import evaluate

    r = evaluate(encoder, pairs, via_index=IndexSpec(index_type="flat"))
    assert r["via_index"]["t2i"] == r["t2i"] and r["via_index"]["ann_recall"] == {1: 1.0, 5: 1.0, 10: 1.0}
    r = evaluate(encoder, pairs, via_index=IndexSpec(index_type="ivfpq"))
    assert r["via_index"]["index"]["kind"] == "ivfpq" and 0 < r["via_index"]["ann_recall"][10] <= 1
    # fewer images than k: the exact top-10 is all 5 images, and an exact index returns all of them
    r = evaluate(encoder, pairs.subset(5), via_index=IndexSpec(index_type="flat"))
    assert r["via_index"]["ann_recall"] == {1: 1.0, 5: 1.0, 10: 1.0} and r["t2i"][5] == 1.0


def test_eval_on_the_flickr8k_folder_cli(tmp_path):
    from tests.conftest import flickr8k

    r = run("eval", flickr8k(), "--split", "nope")
    assert r.exit_code == 1 and "unknown split" in r.stderr
    r = run("eval", tmp_path, "-q")
    assert r.exit_code == 1 and "Flickr8k" in r.stderr


def test_bad_texts_files_are_one_line_errors(photo_dir, tmp_path):
    folder, _ = photo_dir
    photo = next(folder.glob("*.jpg"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 on a street\n".encode("latin-1"))
    idx = tmp_path / "idx"
    for source, message in ((photo, "is not a text file"), (empty, "no texts in"), (latin1, "is not UTF-8 text"),
                            (tmp_path / "nope.txt", "texts file not found")):
        r = run("index", "--texts", source, "--index", idx, "-q")
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and message in r.stderr, (source, r.stderr)
        assert not (idx / "manifest.json").exists()  # nothing was written


def test_tables_saved_by_excel_and_problem_reports(tmp_path, pairs):
    from mmsearch.data import load_flickr8k

    shutil.copy(pairs.images[0], tmp_path / "a.jpg")
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\na.jpg,a dog runs\n,no image\n,\n".encode("utf-8"))
    p = load_table(tmp_path / "bom.csv")
    assert p.captions == [["a dog runs"]] and p.problems() == ["2 row(s) without an image path skipped"]
    # a Flickr8k-style folder with a blank caption and a split entry without any caption
    root = tmp_path / "f8k"
    (root / "images").mkdir(parents=True)
    shutil.copy(pairs.images[0], root / "images" / "a.jpg")
    shutil.copy(pairs.images[1], root / "images" / "b.jpg")
    (root / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog .\na.jpg#1\t \n")
    (root / "Flickr_8k.testImages.txt").write_text("a.jpg\nb.jpg\n")
    p = load_flickr8k(root, "test")
    assert p.captions == [["A dog ."]]
    assert p.problems() == ["1 empty caption(s) skipped",
                            f"1 image(s) without a caption skipped (first: {root / 'images' / 'b.jpg'})"]
    r = run("eval", tmp_path / "nosuch", "-q")
    assert r.exit_code == 1 and "nosuch not found" in r.stderr and r.stderr.count("\n") == 1


def test_filtered_search_through_the_index_matches_exact_filtering(photo_dir, captions_file, encoder, tmp_path,
                                                                    monkeypatch):
    from mmsearch import search

    folder, _ = photo_dir
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    index_texts(captions_file, idx, encoder=encoder)
    s = Searcher(idx, encoder=encoder)
    q = encoder.embed_texts(["a dog runs on grass", "two people", "a child"])
    exact = {kind: s.search_vectors(q, 8, kind) for kind in ("image", "text")}
    monkeypatch.setattr(search, "EXACT_FILTER_MAX", 0)  # every filtered search goes through the faiss index
    for kind, (D, I) in exact.items():
        D2, I2 = Searcher(idx, encoder=encoder).search_vectors(q, 8, kind)
        assert I2.tolist() == I.tolist() and np.allclose(D2, D, atol=1e-5)
        kinds = Collection.open(idx).items.kind
        rows = Collection.open(idx).rows_of(I2)
        assert {kinds[r] for r in rows} == {kind}
