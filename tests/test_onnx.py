"""The torch-free path: exported models on ONNX Runtime against open_clip in torch (the reference),
numpy preprocessing and `tokenizers` against open_clip's transforms and tokenizer, exported folders
as a user handles them, and the query / index paths never importing torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmsearch.errors import ModelLoadError, ModelMismatchError

TRICKY = [
    "A dog runs on the grass .",
    "",
    "   ",
    "Café crème brûlée, naïve façade and a SMÖRGÅSBORD",
    "Tom &amp; Jerry &lt;3 &amp;amp; friends",
    "tab\tseparated\t\twords\nand a new line",
    "一只在草地上奔跑的狗",
    "mixed 中文 and English , with ＦＵＬＬＷＩＤＴＨ letters",
    "emoji 🐶🌭 and ligatures ﬁne ﬂower",
    "curly “quotes” and ‘apostrophes’ — dashes",
    "mojibake: cafÃ© and donâ€™t",
    "control\x07chars\x1b[31m red \x1b[0m",
    " ".join(["word"] * 100),
    " ".join(f"token{i}" for i in range(100)),
    "UPPER lower MiXeD 123 4.5 $6 #7 @eight",
]

HEAVY = ("torch", "open_clip", "timm", "transformers")


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ---- parity with the torch model ---------------------------------------------------------------
def test_default_encoder_runs_int8_on_onnx_runtime_from_the_cache(encoder, model_cache):
    """mmsearch-lite2's default: its shipped int8 image graph with the fp32 text graph."""
    assert encoder.backend.name == "onnx" and encoder.precision == "int8"
    assert encoder.export_folder.parent == model_cache / "onnx"
    manifest = json.loads((encoder.export_folder / "mmsearch_export.json").read_text())
    assert manifest["model"]["key"] == "mmsearch-lite2" and manifest["model"]["weights"] == encoder.weights
    assert manifest["graphs"] == {"fp32": {"image": "image.onnx", "text": "text.onnx"},
                                  "int8": {"image": "image.int8.onnx", "text": "text.onnx"}}
    assert manifest["calibration"]["pairs"] == "Flickr8k train split"
    assert {"image.onnx", "image.int8.onnx", "text.onnx", "tokenizer.json", "query_bank.safetensors",
            "mmsearch_export.json"} == {
        p.name for p in encoder.export_folder.iterdir()}
    from mmsearch import models

    shipped = models.builtin("mmsearch-lite2").int8_file.read_bytes()
    assert (encoder.export_folder / "image.int8.onnx").read_bytes() == shipped


def test_onnx_embeddings_equal_torch_on_real_photos_and_captions(fp32_encoder, torch_encoder, pairs):
    a, b = fp32_encoder.embed_images(pairs.images), torch_encoder.embed_images(pairs.images)
    assert _cos(a, b).min() >= 0.9999
    texts = [c for caps in pairs.captions for c in caps] + TRICKY
    a, b = fp32_encoder.embed_texts(texts), torch_encoder.embed_texts(texts)
    assert _cos(a, b).min() >= 0.9999



def test_eval_recall_on_the_flickr8k_test_split_equals_torchs(fp32_encoder, torch_encoder):
    """`mmsearch eval` ranks the same on both backends: 250 test photos x 1,250 captions, all twelve
    figures (both directions, R@1/5/10, with and without the hubness correction) within 0.002."""
    from mmsearch.data import load_flickr8k
    from mmsearch.evaluate import evaluate
    from tests.conftest import flickr8k

    test = load_flickr8k(flickr8k(), "test").subset(250)
    a, b = evaluate(fp32_encoder, test), evaluate(torch_encoder, test)
    figures = [(src, d, k) for src in ("corrected", "plain") for d in ("t2i", "i2t") for k in (1, 5, 10)]
    pick = lambda r, src, d, k: (r if src == "corrected" else r["plain"])[d][k]  # noqa: E731
    assert 0 < pick(a, "plain", "t2i", 1) < pick(a, "plain", "t2i", 10) < 1
    diffs = {f: abs(pick(a, *f) - pick(b, *f)) for f in figures}
    assert max(diffs.values()) <= 0.002, diffs

def test_numpy_preprocessing_equals_open_clips_transform(encoder, torch_encoder, pairs, tmp_path):
    """Shortest-side resize rounding, bicubic and centre-crop rounding on odd sizes and shapes."""
    photo = Image.open(pairs.images[0]).convert("RGB")
    shapes = [(224, 224), (261, 260), (260, 261), (500, 333), (333, 500), (1001, 77), (77, 1001), (13, 9), (640, 480)]
    for w, h in shapes:
        img = photo.resize((w, h))
        ours, ref = encoder.preprocess(img), torch_encoder.preprocess(img)
        assert ours.shape == ref.shape == (3, 260, 260) and ours.dtype == np.float32, (w, h)
        assert np.abs(ours - ref).max() < 1e-5, (w, h)


def test_token_ids_equal_open_clips_tokenizer_on_tricky_captions(encoder, torch_encoder):
    ref = torch_encoder.backend._tokenizer(TRICKY).numpy()  # open_clip pads to the context length
    ours = encoder.backend.tokenizer(TRICKY, pad_to=ref.shape[1])
    assert ref.shape == (len(TRICKY), 64)  # the model's context length, not the file's 128
    assert np.array_equal(ours, ref)
    # and without pad_to, padded only to the longest text of the batch
    short = encoder.tokenize(["a dog", "a dog on the grass"])
    assert short.shape[1] == (short != 0).sum(1).max() < 64


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=9, max_codepoint=126), max_size=60))
def test_ascii_fast_path_of_text_cleaning_equals_ftfy(text):
    import html

    import ftfy

    from mmsearch.preprocess import clean_text

    slow = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split())
    assert clean_text(text) == slow


def test_batching_and_length_sorting_keep_onnx_text_vectors(encoder):
    texts = ["short", "a much longer sentence about a dog " * 3, "a cat", ""]
    whole = encoder.embed_texts(texts)
    one_by_one = np.concatenate([encoder.embed_texts([t]) for t in texts])
    assert np.allclose(whole, one_by_one, atol=1e-5)


def test_image_decoding_in_threads_keeps_order_and_reports_bad_files(encoder, pairs, tmp_path):
    from mmsearch.errors import MediaError

    one_by_one = np.concatenate([encoder.embed_images([p]) for p in pairs.images[:7]])
    assert np.allclose(encoder.embed_images(pairs.images[:7], batch_size=3), one_by_one, atol=1e-5)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(MediaError, match="broken.jpg"):
        encoder.embed_images(pairs.images[:5] + [bad] + pairs.images[5:9], batch_size=2)


# ---- no torch on the query and index paths -------------------------------------------------------
def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)


def test_import_query_and_index_never_import_torch(encoder, pairs, tmp_path):
    """`import mmsearch`, an index run and a query of the built-in model, each in a fresh process
    (the export is in the session's cache, as after a first use)."""
    from tests.conftest import copy_photos

    copy_photos(pairs, tmp_path / "photos")
    heavy = f"sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})"
    steps = {
        "import": "import mmsearch",
        "index": f"from mmsearch.indexing import index_folder; "
                 f"r = index_folder({str(tmp_path / 'photos')!r}, {str(tmp_path / 'idx')!r}); assert r.added == 12",
        "library query": f"from mmsearch import Searcher; "
                         f"h = Searcher({str(tmp_path / 'idx')!r}).search_text('a dog', k=3); assert len(h) == 3",
        "cli query": f"from mmsearch.cli import app; app(['query', 'a dog', '--index', {str(tmp_path / 'idx')!r}], "
                     "standalone_mode=False)",
    }
    for name, code in steps.items():
        p = _run(f"import sys\n{code}\nprint('HEAVY', {heavy})")
        assert p.returncode == 0, (name, p.stderr[-2000:])
        assert "HEAVY []" in p.stdout, (name, p.stdout[-500:])
    assert "torch" in _run(f"import sys\nimport torch\nprint('HEAVY', {heavy})").stdout  # the check can fail


def test_without_torch_a_missing_export_is_one_clear_line(tmp_path, monkeypatch):
    from mmsearch import encoder as enc_mod

    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(enc_mod, "torch_installed", lambda: False)
    with pytest.raises(ModelLoadError, match=r"no ONNX export .* torch is not installed.*mmsearch export") as e:
        enc_mod.Encoder("mmsearch-lite2")
    assert "\n" not in str(e.value)


# ---- exported folders as a user handles them -----------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mmsearch.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="session")
def exported(tmp_path_factory, encoder):
    """`mmsearch export mmsearch-lite2 --out DIR`, run as a user runs it."""
    out = tmp_path_factory.mktemp("export") / "lite2-onnx"
    p = _cli("export", "mmsearch-lite2", "--out", out)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(out)
    return out


def test_export_folder_is_self_contained_and_embeds_like_the_cache(exported, encoder, pairs):
    from mmsearch.encoder import Encoder

    names = {p.name for p in exported.iterdir()}
    assert names == {"mmsearch_export.json", "image.onnx", "image.int8.onnx", "text.onnx", "tokenizer.json",
                     "query_bank.safetensors"}
    other = Encoder(str(exported))
    assert other.precision == encoder.precision == "int8"
    assert other.name == "mmsearch-lite2" and other.weights == encoder.weights  # it stands for its model
    assert np.allclose(other.embed_images(pairs.images[:3]), encoder.embed_images(pairs.images[:3]), atol=1e-5)
    assert other.query_bank is not None and other.query_bank.digests == encoder.query_bank.digests


def test_query_with_an_exported_folder_and_backends_agree(exported, fp32_encoder, pairs, tmp_path):
    from mmsearch.indexing import index_folder
    from tests.conftest import copy_photos

    copy_photos(pairs, tmp_path / "photos")
    index = tmp_path / "idx"
    index_folder(tmp_path / "photos", index, encoder=fp32_encoder)  # fp32: the precision torch also runs
    via_folder = _cli("query", "a dog running", "--index", index, "--model", exported, "--json")
    via_cache = _cli("query", "a dog running", "--index", index, "--json")
    via_torch = _cli("query", "a dog running", "--index", index, "--json", "--backend", "torch")
    for p in (via_folder, via_cache, via_torch):
        assert p.returncode == 0, p.stderr
    paths = [[h["path"] for h in json.loads(p.stdout)] for p in (via_folder, via_cache, via_torch)]
    assert paths[0] == paths[1] == paths[2] and len(paths[0]) == 10
    bad = _cli("query", "a dog", "--index", index, "--model", index)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --model") and bad.stderr.count("\n") == 1


def test_an_int8_index_with_the_torch_backend_is_one_clear_line(built_index):
    index, _ = built_index
    p = _cli("query", "a dog", "--index", index, "--backend", "torch")
    assert p.returncode == 1 and "int8 runs on ONNX Runtime only" in p.stderr and p.stderr.count("\n") == 1


def test_export_refuses_a_folder_of_other_files_and_damage_is_one_line(exported, tmp_path, pairs):
    from mmsearch.encoder import Encoder

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    p = _cli("export", "mmsearch-lite2", "--out", tmp_path / "mine")
    assert p.returncode == 1 and "holds other files" in p.stderr and p.stderr.count("\n") == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    data = (damaged / "text.onnx").read_bytes()
    (damaged / "text.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=r"cannot load .*text.onnx.*export the model again") as e:
        Encoder(str(damaged)).embed_texts(["a dog"])
    assert "\n" not in str(e.value)
    (damaged / "mmsearch_export.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="damaged"):
        Encoder(str(damaged))


def test_a_failed_export_leaves_no_folder_behind(tmp_path, monkeypatch):
    from mmsearch import export
    from mmsearch.config import ModelRef

    def broken(model, image, text, folder):
        (folder / "image.onnx").write_bytes(b"half a graph")
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(export, "_export_graphs", broken)
    with pytest.raises(RuntimeError, match="killed"):
        export.export_model(ModelRef("mmsearch-lite"), out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---- int8 ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def int8_export(tmp_path_factory, exported):
    """A copy of the export with int8 graphs, calibrated on 16 Flickr8k *train* photos."""
    from tests.conftest import flickr8k

    folder = tmp_path_factory.mktemp("int8") / "lite2-int8"
    shutil.copytree(exported, folder)
    (folder / "image.int8.onnx").unlink()  # as for a model that ships no int8 graph
    manifest = json.loads((folder / "mmsearch_export.json").read_text())
    manifest["graphs"].pop("int8")
    (folder / "mmsearch_export.json").write_text(json.dumps(manifest))
    p = _cli("export", "mmsearch-lite2", "--out", folder, "--precision", "int8", "--calibrate", flickr8k(),
             "--calibrate-images", 16)
    assert p.returncode == 0, p.stderr
    return folder


def test_int8_graphs_stay_close_to_fp32_and_indexes_record_their_precision(int8_export, exported, pairs, tmp_path):
    from mmsearch.encoder import Encoder
    from tests.conftest import copy_photos

    manifest = json.loads((int8_export / "mmsearch_export.json").read_text())
    assert list(manifest["graphs"]) == ["fp32", "int8"] and manifest["calibration"]["images"] == 16
    e8, e32 = Encoder(str(int8_export), precision="int8"), Encoder(str(exported), precision="fp32")
    assert e8.precision == "int8" and e8.backend.files == {"image": "image.int8.onnx", "text": "text.onnx"}
    assert _cos(e8.embed_images(pairs.images), e32.embed_images(pairs.images)).mean() > 0.95
    texts = [c[0] for c in pairs.captions]
    assert np.array_equal(e8.embed_texts(texts), e32.embed_texts(texts))  # int8 keeps the fp32 text graph
    fp32_only = tmp_path / "fp32-only"
    shutil.copytree(exported, fp32_only)
    manifest = json.loads((fp32_only / "mmsearch_export.json").read_text())
    manifest["graphs"].pop("int8")
    (fp32_only / "mmsearch_export.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="no int8 graphs"):
        Encoder(str(fp32_only), precision="int8")
    assert Encoder(str(fp32_only)).precision == "fp32"  # the default falls back where int8 is missing

    copy_photos(pairs, tmp_path / "photos")
    p = _cli("index", tmp_path / "photos", "--index", tmp_path / "idx8", "--model", int8_export, "--precision", "int8",
             "-q")
    assert p.returncode == 0, p.stderr
    info = json.loads(_cli("info", "--index", tmp_path / "idx8", "--json").stdout)
    assert info["precision"] == "int8" and info["model"] == "mmsearch-lite2"
    q = _cli("query", "a dog", "--index", tmp_path / "idx8", "--model", int8_export, "--json")
    assert q.returncode == 0 and len(json.loads(q.stdout)) == 10, q.stderr
    # one index never mixes precisions
    mixed = _cli("index", tmp_path / "photos", "--index", tmp_path / "idx8", "--precision", "fp32", "-q")
    assert mixed.returncode == 1 and "mix precisions" in mixed.stderr and mixed.stderr.count("\n") == 1


def test_precision_is_the_indexs_own_and_older_indexes_stay_fp32(encoder, fp32_encoder, pairs, tmp_path):
    from mmsearch.indexing import index_folder
    from mmsearch.search import Searcher
    from tests.conftest import copy_photos

    copy_photos(pairs, tmp_path / "photos")
    index_folder(tmp_path / "photos", tmp_path / "idx32", encoder=fp32_encoder)
    with pytest.raises(ModelMismatchError, match="holds fp32 vectors"):
        Searcher(tmp_path / "idx32", encoder=encoder)
    assert Searcher(tmp_path / "idx32").encoder.precision == "fp32"  # its own model at its own precision
    # an index written before precisions existed records none: its vectors are fp32
    manifest_path = tmp_path / "idx32" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["model"]["precision"]
    manifest_path.write_text(json.dumps(manifest))
    p = _cli("index", tmp_path / "photos", "--index", tmp_path / "idx32", "-q")
    assert p.returncode == 0, p.stderr
    assert json.loads(_cli("info", "--index", tmp_path / "idx32", "--json").stdout)["precision"] == "fp32"
    # a new index takes the model's default, int8
    p = _cli("index", tmp_path / "photos", "--index", tmp_path / "idx8", "-q")
    assert p.returncode == 0, p.stderr
    assert json.loads(_cli("info", "--index", tmp_path / "idx8", "--json").stdout)["precision"] == "int8"
    mixed = _cli("index", tmp_path / "photos", "--index", tmp_path / "idx8", "--precision", "fp32", "-q")
    assert mixed.returncode == 1 and "would mix precisions" in mixed.stderr


# ---- any open_clip model, on request -------------------------------------------------------------
def _tiny_clip(text_cfg: dict):
    import torch
    from open_clip.model import CLIP

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16,
                                           "head_width": 32}, "text_cfg": text_cfg}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIP(**cfg), cfg


@pytest.mark.parametrize("tokenizer", ["clip-bpe", "hf-bert"])
def test_any_open_clip_checkpoint_exports_with_equal_tokens_and_vectors(tokenizer, tmp_path, pairs):
    """A tiny random open_clip CLIP with CLIP's own BPE tokenizer, or an HF tokenizer feeding
    open_clip's text transformer (fixed-length graphs: that tower sees padding positions)."""
    from mmsearch import models
    from mmsearch.encoder import Encoder
    from mmsearch.export import export_model
    from mmsearch.config import ModelRef

    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    if tokenizer == "hf-bert":
        text_cfg = {"context_length": 32, "vocab_size": 30522, "width": 64, "heads": 2, "layers": 1,
                    "hf_tokenizer_name": "bert-tokenizer-in-folder", "no_causal_mask": True, "pool_type": "last"}
    model, cfg = _tiny_clip(text_cfg)
    folder = models.save_open_clip_folder(model, tmp_path / "ckpt", model_config=cfg)
    torch_enc = Encoder(str(folder), backend="torch")
    out = export_model(ModelRef(str(folder)), out=tmp_path / "ckpt-onnx")
    onnx_enc = Encoder(str(out))
    assert onnx_enc.backend.name == "onnx" and onnx_enc.name == torch_enc.name and onnx_enc.dim == 32
    ref = torch_enc.backend._tokenizer(TRICKY).numpy()
    assert np.array_equal(onnx_enc.tokenize(TRICKY), ref)
    assert _cos(onnx_enc.embed_texts(TRICKY[:6]), torch_enc.embed_texts(TRICKY[:6])).min() >= 0.9999
    assert _cos(onnx_enc.embed_images(pairs.images[:3]), torch_enc.embed_images(pairs.images[:3])).min() >= 0.9999
    # after `mmsearch export`, the checkpoint folder itself runs on ONNX Runtime through the cache
    export_model(ModelRef(str(folder)))
    assert Encoder(str(folder)).backend.name == "onnx"
