"""`mmsearch train`: InfoNCE on a few real pairs lowers the loss and writes a loadable checkpoint."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.config import TrainConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    from mmsearch.data import load_flickr8k
    from tests.conftest import flickr8k

    base = tmp_path_factory.mktemp("pairs")
    for name, split, n in (("train", "train", 40), ("val", "dev", 12)):
        pairs = load_flickr8k(flickr8k(), split).subset(n)
        with open(base / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for img, caps in zip(pairs.images, pairs.captions):
                for c in caps:
                    w.writerow([img, c])
    return base


def test_training_lowers_the_loss_and_writes_a_loadable_checkpoint(tables, tmp_path, pairs):
    from mmsearch.data import load_table
    from mmsearch.encoder import Encoder
    from mmsearch.train import train_model

    cfg = replace(TrainConfig(), epochs=6, patience=6, batch_size=16)
    out = tmp_path / "ckpt"
    rec = train_model(load_table(tables / "train.csv"), load_table(tables / "val.csv"), out, cfg=cfg,
                      cache_dir=tmp_path / "cache")
    losses = [h["loss"] for h in rec["history"]]
    assert rec["mode"] == "cached towers" and losses[-1] < losses[0] * 0.9, losses
    saved = json.loads((out / "mmsearch_train.json").read_text())
    assert saved["best_epoch"] == rec["best_epoch"] and len(saved["history"]) == 6
    enc = Encoder(str(out))
    v = enc.embed_images(pairs.images[:2])
    assert v.shape == (2, 256) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    # its own query bank (training photos and captions, calibrated on validation) comes with it
    bank = enc.query_bank
    assert bank is not None and bank.weights == enc.weights and saved["query_bank"]["text"]["bank"] == 40
    assert len(bank.vectors["image"]) == len(bank.vectors["text"]) == 40
    train_emb = enc.embed_images(load_table(tables / "train.csv").images)
    assert ((bank.vectors["image"] @ train_emb.T).max(1) > 0.999).all()  # the trained model's embeddings of them
    # same seed, same data -> the same model (features now come from the cache)
    rec2 = train_model(load_table(tables / "train.csv"), load_table(tables / "val.csv"), tmp_path / "again",
                       cfg=cfg, cache_dir=tmp_path / "cache")
    assert rec2["history"] == rec["history"]
    assert (tmp_path / "again" / "open_clip_model.safetensors").read_bytes() == (out / "open_clip_model.safetensors").read_bytes()


def test_a_bank_left_from_other_weights_is_an_error_not_silently_used(tables, tmp_path):
    import shutil

    from mmsearch.data import load_table
    from mmsearch.encoder import Encoder
    from mmsearch.errors import ModelLoadError
    from mmsearch.train import train_model

    cfg = replace(TrainConfig(), epochs=1, batch_size=16, query_bank=8)
    out = tmp_path / "ckpt"
    train_model(load_table(tables / "train.csv"), load_table(tables / "val.csv"), out, cfg=cfg,
                cache_dir=tmp_path / "cache")
    assert len(Encoder(str(out)).query_bank.vectors["text"]) == 8
    from safetensors.numpy import load_file, save_file

    weights = out / "open_clip_model.safetensors"
    copy = tmp_path / "copied"  # a copy of the folder (new mtimes) keeps its bank
    shutil.copytree(out, copy)
    assert Encoder(str(copy)).query_bank is not None
    state = load_file(str(weights))
    state["logit_scale"] = np.asarray(state["logit_scale"] + 1.0)
    save_file(state, str(weights))  # the weights replaced after the bank was built
    with pytest.raises(ModelLoadError, match="was built for other weights"):
        Encoder(str(out)).query_bank
    train_model(load_table(tables / "train.csv"), load_table(tables / "val.csv"), out,
                cfg=replace(cfg, query_bank=0), cache_dir=tmp_path / "cache")
    assert Encoder(str(out)).query_bank is None  # retrained without a bank: the old one is gone


def test_cli_train_then_index_with_the_checkpoint(tables, tmp_path, photo_dir):
    folder, _ = photo_dir
    out = tmp_path / "ckpt"
    r = runner.invoke(app, ["train", str(tables / "train.csv"), "--val", str(tables / "val.csv"), "--out", str(out),
                            "--epochs", "2", "--batch-size", "16", "--cache", str(tmp_path / "cache"), "-q"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stderr and f"--model {out}" in r.stderr
    r = runner.invoke(app, ["index", str(folder), "--model", str(out), "--index", str(tmp_path / "idx"), "-q"])
    assert r.exit_code == 0, r.output
    info = json.loads(runner.invoke(app, ["info", "--json", "--index", str(tmp_path / "idx")]).stdout)
    assert info["model"] == str(out) and info["count"] == 12


@pytest.mark.slow
def test_end_to_end_training_with_unlocked_layers(tables, tmp_path, monkeypatch):
    from mmsearch.data import load_table
    from mmsearch.encoder import Encoder
    from mmsearch.train import run, train_model

    monkeypatch.setattr(run, "MAX_CACHED_MAPS_BYTES", 0)  # as if the image maps were too large to cache

    train = load_table(tables / "train.csv").subset(16)
    cfg = replace(TrainConfig(), epochs=2, batch_size=8, lr=2e-4)  # small steps: the start is already trained
    rec = train_model(train, load_table(tables / "val.csv"), tmp_path / "e2e", cfg=cfg, unlock_image=1, unlock_text=1)
    assert rec["mode"] == "end to end" and rec["history"][-1]["loss"] < rec["history"][0]["loss"]
    assert rec["best_val"]["t2i"][10] > 0.8  # starting from mmsearch-lite, not wrecked by training
    assert Encoder(str(tmp_path / "e2e")).embed_texts(["a dog"]).shape == (1, 256)


def test_bad_training_input_is_reported(tables, tmp_path):
    lines = (tables / "train.csv").read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines[:11] + ["/nope/missing.jpg,a caption", f"{lines[1].split(',')[0]},"]) + "\n")
    r = runner.invoke(app, ["train", str(bad), "--val", str(tables / "val.csv"), "--out", str(tmp_path / "o"),
                            "--epochs", "1", "--cache", str(tmp_path / "cache"), "-q"])
    assert r.exit_code == 0, r.output
    assert "1 image(s) not found" in r.stderr and "/nope/missing.jpg" in r.stderr and "1 empty caption" in r.stderr
    (tmp_path / "cols.csv").write_text("path,text\na.jpg,hello\n")
    r = runner.invoke(app, ["train", str(tmp_path / "cols.csv"), "--val", str(tables / "val.csv"), "--out",
                            str(tmp_path / "o2")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "no column 'image', 'caption'" in r.stderr
    r = runner.invoke(app, ["train", str(tables / "train.csv"), "--out", str(tmp_path / "o3")])
    assert r.exit_code == 1 and "--val" in r.stderr


def test_undecodable_training_images_are_skipped_and_reported(tables, tmp_path):
    import shutil

    lines = (tables / "train.csv").read_text().splitlines()
    first = lines[1].split(",")[0]
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a jpeg")
    shutil.copy(first, tmp_path / "ok.jpg")
    table = tmp_path / "t.csv"
    table.write_text("\n".join(lines[:21] + [f"{tmp_path / 'zero.jpg'},a dog", f"{tmp_path / 'text.jpg'},a cat"]) + "\n")
    for extra in ([], ["--unlock-text", "1"]):  # cached features and end to end
        out = tmp_path / f"o{len(extra)}"
        r = runner.invoke(app, ["train", str(table), "--val", str(tables / "val.csv"), "--out", str(out),
                                "--epochs", "1", "--batch-size", "8", "--cache", str(tmp_path / "cache"), "-q",
                                *extra])
        assert r.exit_code == 0, r.output
        assert f"skipped {tmp_path / 'zero.jpg'}: zero-byte file" in r.stderr, r.stderr
        assert f"skipped {tmp_path / 'text.jpg'}" in r.stderr
        rec = json.loads((out / "mmsearch_train.json").read_text())
        assert rec["n_train_images"] == 4  # the 4 photos of the first 20 caption rows; the 2 bad files left out


def test_a_validation_folder_uses_its_dev_split(tmp_path, monkeypatch):
    """`train TABLE --val FLICKR_FOLDER` validates on the folder's dev split, never on its test split."""
    from mmsearch import train
    from mmsearch.errors import DataError
    from tests.conftest import flickr8k

    FLICKR = flickr8k()
    seen = {}

    def fake_train_model(train_pairs, val_pairs, out, **kw):
        seen["val"] = val_pairs.images
        raise DataError("stop here")  # a user-facing error: one line, exit code 1

    monkeypatch.setattr(train, "train_model", fake_train_model)
    (tmp_path / "t.csv").write_text("image,caption\n")
    from mmsearch.data import load_flickr8k

    dev = load_flickr8k(FLICKR, "dev").images
    r = runner.invoke(app, ["train", str(FLICKR), "--split", "train", "--val", str(FLICKR), "--out",
                            str(tmp_path / "o"), "-q"])
    assert r.exit_code == 1 and "stop here" in r.stderr and seen["val"] == dev


def test_mirrored_views_and_several_captions_per_step(tables, tmp_path):
    from mmsearch.data import load_table
    from mmsearch.train import train_model

    cfg = replace(TrainConfig(), epochs=5, patience=5, batch_size=16, flip_views=True, captions_per_step=3)
    rec = train_model(load_table(tables / "train.csv"), load_table(tables / "val.csv"), tmp_path / "o", cfg=cfg,
                      cache_dir=tmp_path / "cache")
    losses = [h["loss"] for h in rec["history"]]
    assert losses[-1] < losses[0] * 0.9, losses
    assert len(list((tmp_path / "cache").glob("img-flip-*.npy"))) == 1  # mirrored train features, cached
    assert rec["train_config"]["flip_views"] and rec["train_config"]["captions_per_step"] == 3


def test_unlocked_text_layers_train_on_cached_states(tables, tmp_path, pairs):
    """--unlock-text with the image tower locked: image features and the text tower's hidden states
    below the unlocked layers are cached; those layers change and the checkpoint uses them."""
    from safetensors.numpy import load_file

    from mmsearch import models
    from mmsearch.config import DEFAULT_MODEL
    from mmsearch.data import load_table
    from mmsearch.encoder import Encoder
    from mmsearch.train import train_model

    cfg = replace(TrainConfig(), epochs=4, patience=4, batch_size=16, tower_lr_scale=0.1)
    rec = train_model(load_table(tables / "train.csv"), load_table(tables / "val.csv"), tmp_path / "o", cfg=cfg,
                      unlock_text=1, cache_dir=tmp_path / "cache")
    assert rec["mode"] == "cached image tower, text layers on cached states"
    losses = [h["loss"] for h in rec["history"]]
    assert losses[-1] < losses[0] * 0.9, losses
    assert len(list((tmp_path / "cache").glob("txt-h5-*.npy"))) == 2  # train and validation captions
    saved = load_file(str(tmp_path / "o" / "open_clip_model.safetensors"))
    base = {k: v.detach().numpy() for k, v in models.build(name=DEFAULT_MODEL).state_dict().items()}
    changed = {k.split(".layer.")[1].split(".")[0] for k in saved
               if ".layer." in k and k.startswith("text.") and not np.array_equal(saved[k], base[k])}
    assert changed == {"5"}  # only the last of the 6 MiniLM layers was trained
    # the checkpoint reproduces the validation recall the training loop measured
    from mmsearch.evaluate import evaluate

    r = evaluate(Encoder(str(tmp_path / "o")), load_table(tables / "val.csv"))
    best = rec["best_val"]
    assert r["t2i"] == pytest.approx(best["t2i"], abs=0.02) and r["i2t"] == pytest.approx(best["i2t"], abs=0.02)


def test_augmented_views_of_the_image_tower(pairs, tmp_path):
    """flip = the mirrored image; zoom = the centre, enlarged (the same as cropping it first); NaN rows
    for files that do not decode."""
    from PIL import Image

    from mmsearch import models
    from mmsearch.train import image_tower_features

    model, pre = models.build(heads=None), models.preprocess()
    photo = pairs.images[0]
    Image.open(photo).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirrored.png")
    w, h = Image.open(photo).size
    cw, ch = round(w / 1.125), round(h / 1.125)
    Image.open(photo).crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)).save(tmp_path / "centre.png")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    orig = image_tower_features(model, pre, [photo, str(tmp_path / "bad.jpg")])
    assert np.isnan(orig[1]).all() and np.isfinite(orig[0]).all()
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    flip = image_tower_features(model, pre, [photo], view="flip")[0]
    assert np.allclose(flip, image_tower_features(model, pre, [str(tmp_path / "mirrored.png")])[0], atol=1e-4)
    zoom = image_tower_features(model, pre, [photo], view="zoom")[0]
    assert cos(zoom, image_tower_features(model, pre, [str(tmp_path / "centre.png")])[0]) > 0.97
    assert cos(zoom, orig[0]) < 0.97 and cos(flip, orig[0]) < 0.99  # real augmentations, not copies
    with pytest.raises(ValueError, match="unknown image view"):
        image_tower_features(model, pre, [photo], view="rotate")


def test_image_tail_reproduces_the_trunk(tmp_path, pairs):
    """ImageTail, the trunk's last layer groups run on cached feature maps, gives the trunk's own
    pooled features (naive reference: the whole trunk on the decoded image); undecodable files give
    NaN maps; it trains exactly the parameters open_clip unlocks."""
    import torch

    from mmsearch import models
    from mmsearch.train import ImageTail, _image_tail_shape, _lock_towers, image_tower_features, image_trunk_maps

    model, pre = models.build(heads=None), models.preprocess()
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    photos = pairs.images[:3] + [str(tmp_path / "bad.jpg")]
    starts = [ImageTail.first_block(model, n) for n in (1, 6)]
    maps1, maps6 = image_trunk_maps(model, pre, photos, starts)
    assert maps1.dtype == np.float16 and np.isnan(maps1[3]).all() and np.isfinite(maps1[:3]).all()
    ref = image_tower_features(model, pre, photos[:3])
    for n, maps in ((1, maps1), (6, maps6)):
        with torch.no_grad():
            got = ImageTail(model, maps, n)(0, np.arange(3)).numpy()
        assert np.allclose(got, ref, atol=2e-3, rtol=1e-2), n
    mirrored = image_trunk_maps(model, pre, photos[:1], starts[:1], view="flip")[0]
    with torch.no_grad():
        assert np.allclose(ImageTail(model, mirrored, 1)(0, [0]).numpy(),
                           image_tower_features(model, pre, photos[:1], view="flip"), atol=2e-3, rtol=1e-2)
    _lock_towers(model, 2, 0)
    entering = image_trunk_maps(model, pre, photos[:1], [ImageTail.first_block(model, 2)])[0]
    assert _image_tail_shape(model, 2) == entering.shape[1:]
    assert _image_tail_shape(model, 3) is None  # not the parameters open_clip unlocked
    with pytest.raises(ValueError, match="cannot unlock 99 image layer groups"):
        ImageTail.first_block(model, 99)


def test_unlocked_image_layers_train_on_cached_maps(tables, tmp_path):
    """--unlock-image with the built-in model: the maps entering the unlocked blocks are cached; only
    those layers change, and the checkpoint reproduces the validation recall training measured."""
    from safetensors.numpy import load_file

    from mmsearch import models
    from mmsearch.config import DEFAULT_MODEL
    from mmsearch.data import load_table
    from mmsearch.encoder import Encoder
    from mmsearch.evaluate import evaluate
    from mmsearch.train import train_model

    # one step per epoch over all 40 pairs and their 5 captions, so the epochs' losses compare (the
    # default model has seen these photos in training already: its loss starts low); no query bank,
    # so evaluate() below ranks by plain cosine, as training's validation does
    cfg = replace(TrainConfig(), epochs=4, patience=4, batch_size=40, captions_per_step=5, warmup_steps=1,
                  feature_dropout=0.0, tower_lr_scale=0.1, flip_views=True, query_bank=0)
    rec = train_model(load_table(tables / "train.csv"), load_table(tables / "val.csv"), tmp_path / "o", cfg=cfg,
                      unlock_image=1, cache_dir=tmp_path / "cache")
    assert rec["mode"] == "image layers on cached maps, cached text tower"
    losses = [h["loss"] for h in rec["history"]]
    assert losses[-1] < losses[0] * 0.9, losses
    assert len(list((tmp_path / "cache").glob("img-b*-flip-*.npy"))) == 1  # mirrored train maps
    assert len(list((tmp_path / "cache").glob("img-b*.npy"))) == 3  # train, train mirrored, validation
    saved = load_file(str(tmp_path / "o" / "open_clip_model.safetensors"))
    base = {k: v.detach().numpy() for k, v in models.build(name=DEFAULT_MODEL).state_dict().items()}
    changed = {".".join(k.split(".")[2:4]) if ".blocks." in k else k.split(".")[2]
               for k in saved if k.startswith("visual.trunk.") and not np.array_equal(saved[k], base[k])}
    last = f"blocks.{len(models.build(heads=None).visual.trunk.blocks) - 1}"
    assert changed == {last, "conv_head", "bn2"}, changed
    r = evaluate(Encoder(str(tmp_path / "o")), load_table(tables / "val.csv"))
    best = rec["best_val"]
    assert r["t2i"] == pytest.approx(best["t2i"], abs=0.02) and r["i2t"] == pytest.approx(best["i2t"], abs=0.02)


def test_the_feature_cache_computes_once_and_rekeys_edited_photos(tmp_path):
    """Features are computed once per key and written whole (no temp files left); editing a photo, or
    other captions or model weights, gives a new key, so stale features are never read back."""
    import os

    from mmsearch.train import FeatureCache, cached_features

    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"one")
    cache = FeatureCache(tmp_path / "cache", ("model", "weights-1"))
    calls = []

    def compute():
        calls.append(1)
        return np.arange(6, dtype=np.float32).reshape(2, 3)

    first = cache.image_file([str(photo)])
    computed, loaded = cached_features(first, compute), cached_features(first, compute)
    assert len(calls) == 1 and np.array_equal(computed, loaded) and loaded.dtype == np.float32
    assert os.listdir(tmp_path / "cache") == [first.name]
    assert first.name.startswith("img-") and cache.image_file([str(photo)], view="flip").name.startswith("img-flip-")
    assert cache.image_file([str(photo)], first_block=20).name.startswith("img-b20-")
    photo.write_bytes(b"edited")
    assert cache.image_file([str(photo)]) != first
    assert FeatureCache(tmp_path / "cache", ("model", "weights-2")).image_file([str(photo)]) != cache.image_file([str(photo)])
