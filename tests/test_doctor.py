"""`mmsearch doctor`: damage an index the ways a disk or a hand does, check that doctor names the
damage, and that --repair brings back a searchable index, re-embedding only what was lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch import doctor
from mmsearch.cli import app
from mmsearch.indexing import index_folder
from mmsearch.search import Searcher
from mmsearch.store import Collection, read_manifest
from tests.conftest import CountingEncoder

runner = CliRunner()


@pytest.fixture
def two_commits(pairs, encoder, tmp_path):
    """An index committed twice: 8 photos, then 4 more from a second folder (gen-000001 is kept)."""
    first, second = tmp_path / "photos", tmp_path / "more"
    for folder, images in ((first, pairs.images[:8]), (second, pairs.images[8:])):
        folder.mkdir()
        for src in images:
            shutil.copy2(src, folder / Path(src).name)
    idx = tmp_path / "idx"
    index_folder(first, idx, encoder=encoder)
    index_folder(second, idx, encoder=encoder)
    return idx, first, second


def _flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def _ranked(idx: Path, encoder) -> list[str]:
    return [h.path for h in Searcher(idx, encoder=encoder).search_text("a dog running on the grass", k=12)]


def test_a_healthy_index_is_healthy_and_keeps_its_previous_generation(two_commits):
    idx, _, _ = two_commits
    r = runner.invoke(app, ["doctor", "--index", str(idx)])
    assert r.exit_code == 0 and r.stdout.strip().endswith("healthy"), r.output
    assert "gen-000002, 12 items, gen-000001 kept to fall back to" in r.stdout
    report = json.loads(runner.invoke(app, ["doctor", "--index", str(idx), "--json"]).stdout)
    assert report["healthy"] and report["found"] == [] and report["previous"] == "gen-000001"
    m = read_manifest(idx)
    assert set(m.checksums) == {"items.parquet", "embeddings.npy", "index.faiss"} and m.previous == "gen-000001"
    assert json.loads((idx / "gen-000002" / "manifest.json").read_text()) == json.loads((idx / "manifest.json").read_text())


def test_a_flipped_byte_in_the_faiss_index_is_found_and_rebuilt_without_embedding(two_commits, encoder):
    idx, _, _ = two_commits
    before = _ranked(idx, encoder)
    _flip_byte(idx / "gen-000002" / "index.faiss")
    r = runner.invoke(app, ["doctor", "--index", str(idx)])
    assert r.exit_code == 1 and "gen-000002/index.faiss: its bytes changed since the commit" in r.stdout
    assert r.stderr.strip().splitlines() == [f"error: index {idx} has 1 problem(s): repair with "
                                             f"`mmsearch doctor --index {idx} --repair`"]
    counting = CountingEncoder(encoder)
    report = doctor.repair(idx, encoder=counting)
    assert report.healthy and report.reembedded == 0 and counting.embedded == 0
    assert any("rebuilt the flat index from embeddings.npy (12 vectors)" in line for line in report.repaired)
    assert _ranked(idx, encoder) == before


def test_a_truncated_manifest_names_doctor_and_is_restored_from_the_generations_copy(two_commits, encoder):
    idx, _, _ = two_commits
    before = _ranked(idx, encoder)
    text = (idx / "manifest.json").read_text()
    (idx / "manifest.json").write_text(text[: len(text) // 3])
    r = runner.invoke(app, ["query", "a dog", "--index", str(idx)])
    assert r.exit_code == 1 and f"`mmsearch doctor --index {idx} --repair`" in r.stderr  # not "run index" again
    r = runner.invoke(app, ["doctor", "--index", str(idx), "--repair"])
    assert r.exit_code == 0, r.output
    assert "repaired: restored manifest.json from gen-000002/manifest.json" in r.stdout
    assert _ranked(idx, encoder) == before and read_manifest(idx).count == 12


def test_a_deleted_manifest_is_restored(two_commits):
    idx, _, _ = two_commits
    (idx / "manifest.json").unlink()
    report = doctor.repair(idx)
    assert report.healthy and Collection.open(idx).count == 12


def test_truncated_embeddings_fall_back_to_the_previous_generation_and_only_the_lost_photos_are_embedded(
        two_commits, encoder):
    idx, first, second = two_commits
    emb = idx / "gen-000002" / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:1000])
    counting = CountingEncoder(encoder)
    report = doctor.repair(idx, encoder=counting)
    assert report.healthy and report.lost == []
    assert "went back to gen-000001" in report.repaired[0]
    assert report.reembedded == 4 and counting.embedded == 4  # the second folder's photos, not all 12
    c = Collection.open(idx)
    assert c.count == 12 and sorted(c.items.path) == sorted(str(p) for p in (*first.iterdir(), *second.iterdir()))


def test_damaged_items_with_no_previous_generation_start_empty_and_reembed_everything(pairs, encoder, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in pairs.images[:6]:
        shutil.copy2(src, folder / Path(src).name)
    idx = tmp_path / "idx"
    index_folder(folder, idx, encoder=encoder)
    (idx / "gen-000001" / "items.parquet").write_bytes(b"not a parquet file")
    found = doctor.examine(idx)
    assert not found.healthy and found.found[0].where == "gen-000001/items.parquet"
    report = doctor.repair(idx, encoder=encoder)
    assert report.healthy and report.reembedded == 6 and Collection.open(idx).count == 6


def test_hub_values_from_another_query_bank_are_measured_again(two_commits, encoder):
    idx, _, _ = two_commits
    data = json.loads((idx / "manifest.json").read_text())
    want = data["hubness"]["text"]["digest"]
    data["hubness"]["text"]["digest"] = "0" * 16
    (idx / "manifest.json").write_text(json.dumps(data))
    found = doctor.examine(idx)
    assert [f.problem for f in found.found] == ["hub values were measured with another query bank than the model's"]
    report = doctor.repair(idx)
    assert report.healthy and read_manifest(idx).hubness["text"]["digest"] == want
    assert not np.isnan(Collection.open(idx).items.hub).any()


def test_leftovers_of_killed_runs_are_swept_and_a_users_folder_is_not(two_commits):
    idx, _, _ = two_commits
    shutil.copytree(idx / "gen-000002", idx / ".gen-000003.partial")
    shutil.copytree(idx / "gen-000002", idx / "gen-000007")
    (idx / "notes").mkdir()
    found = doctor.examine(idx)
    assert sorted(f.where for f in found.found) == [".gen-000003.partial", "gen-000007"]
    report = doctor.repair(idx)
    assert report.healthy and not (idx / "gen-000007").exists() and not (idx / ".gen-000003.partial").exists()
    assert (idx / "notes").is_dir() and (idx / "gen-000001").is_dir()


def test_an_index_without_any_manifest_copy_cannot_be_repaired_and_says_so(two_commits):
    idx, _, _ = two_commits
    for gen in ("gen-000001", "gen-000002"):
        (idx / gen / "manifest.json").unlink()  # as indexes written before copies were kept
    (idx / "manifest.json").write_text("{")
    r = runner.invoke(app, ["doctor", "--index", str(idx), "--repair"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "cannot be repaired" in r.stderr and "mmsearch index FOLDER --index NEW_FOLDER" in r.stderr


def test_doctor_on_a_folder_that_is_no_index_is_one_line(tmp_path):
    for target in (tmp_path / "nothing", tmp_path):
        r = runner.invoke(app, ["doctor", "--index", str(target)])
        assert r.exit_code == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


def test_a_repair_stopped_before_re_embedding_goes_on_at_the_next_repair(two_commits, encoder, monkeypatch):
    idx, first, second = two_commits
    emb = idx / "gen-000002" / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:1000])

    def killed(self, *a, **k):
        raise KeyboardInterrupt  # as a Ctrl-C (or a kill) between going back and re-embedding

    monkeypatch.setattr(doctor.Doctor, "reembed", killed)
    with pytest.raises(KeyboardInterrupt):
        doctor.repair(idx, encoder=encoder)
    monkeypatch.undo()
    assert Collection.open(idx).count == 8  # back to the first commit; the rest is recorded as still to embed
    found = doctor.examine(idx)
    assert [f.problem for f in found.found] == [f"files under {second}, {first} are still to be embedded again "
                                                "after a repair"]
    report = doctor.repair(idx, encoder=encoder)
    assert report.healthy and report.reembedded == 4 and Collection.open(idx).count == 12
    assert read_manifest(idx).reembed == []
