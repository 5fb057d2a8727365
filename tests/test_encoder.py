"""The encoder: output shape and norm, inputs, loading any open_clip model from a local folder."""

from __future__ import annotations

import numpy as np
import pytest

from mmsearch.errors import MediaError, ModelLoadError


def test_text_and_image_embeddings_are_unit_float32(encoder, pairs):
    t = encoder.embed_texts(["a dog on grass", "two children playing", ""])
    assert t.dtype == np.float32 and t.shape == (3, encoder.dim) and encoder.dim == 256
    assert np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    im = encoder.embed_images(pairs.images[:3])
    assert im.dtype == np.float32 and im.shape == (3, 256)
    assert np.allclose(np.linalg.norm(im, axis=1), 1, atol=1e-5)
    assert encoder.embed_texts([]).shape == (0, 256) and encoder.embed_images([]).shape == (0, 256)


def test_paths_and_pil_images_give_the_same_vectors(encoder, pairs):
    from PIL import Image

    by_path = encoder.embed_images(pairs.images[:2])
    by_pil = encoder.embed_images([Image.open(p) for p in pairs.images[:2]])
    assert np.allclose(by_path, by_pil, atol=1e-5)


def test_batching_does_not_change_results(encoder, pairs):
    a = encoder.embed_images(pairs.images[:5], batch_size=2)
    b = encoder.embed_images(pairs.images[:5], batch_size=5)
    assert np.allclose(a, b, atol=1e-4)
    texts = [c[0] for c in pairs.captions[:9]] + ["short", "a much longer sentence about a dog " * 3]
    whole = encoder.embed_texts(texts)
    one_by_one = np.concatenate([encoder.embed_texts([t]) for t in texts])
    assert np.allclose(whole, one_by_one, atol=1e-4)  # padding trimmed per batch changes nothing


def test_captions_match_their_own_photos(encoder, pairs):
    """A meaningful model: most captions rank their own photo in the top 3 of 12."""
    img = encoder.embed_images(pairs.images)
    txt = encoder.embed_texts([c[0] for c in pairs.captions])
    ranks = [(np.argsort(-img @ t) == i).nonzero()[0][0] for i, t in enumerate(txt)]
    assert sum(r < 3 for r in ranks) >= 9, ranks


def test_bad_image_raises_media_error(encoder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(MediaError, match="bad.jpg"):
        encoder.embed_images([bad])
    with pytest.raises(TypeError):
        encoder.embed_texts("one string")


def test_local_open_clip_checkpoint_folder_loads(fp32_encoder, torch_encoder, tmp_path, pairs):
    """The path real users take with their own or downloaded weights, tested with a local folder."""
    from mmsearch import models
    from mmsearch.encoder import Encoder

    folder = models.save_open_clip_folder(torch_encoder.model, tmp_path / "ckpt")
    other = Encoder(str(folder))
    assert other.name == str(folder) and other.dim == 256
    assert np.allclose(other.embed_texts(["a red bus"]), fp32_encoder.embed_texts(["a red bus"]), atol=1e-5)
    assert np.allclose(other.embed_images(pairs.images[:1]), fp32_encoder.embed_images(pairs.images[:1]), atol=1e-4)


def test_models_that_cannot_load_give_clear_errors(tmp_path, monkeypatch, capfd):
    from mmsearch.encoder import Encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="open_clip_config.json"):
        Encoder(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="no-such-model"):
        Encoder("no-such-model")
    with pytest.raises(ModelLoadError, match="needs pretrained weights"):
        Encoder("ViT-B-32")
    # a download that cannot happen (the hub's host does not resolve, as on a machine with no
    # network; simulated, so the check runs everywhere): a prompt, quiet, one-line error
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from mmsearch.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_resolves", lambda url: False)
    with pytest.raises(ModelLoadError, match=r"ViT-B-32.*(no network|hf-hub)") as err:
        Encoder("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # the library printed nothing


def test_missing_head_weights_are_a_clear_error(tmp_path):
    from mmsearch import models

    with pytest.raises(ModelLoadError, match="train_default_model"):
        models.build(heads=tmp_path / "missing.safetensors")


def test_a_plain_clip_checkpoint_folder_loads_and_its_tokens_are_not_trimmed(tmp_path):
    """A tiny random open_clip CLIP whose own text transformer sees padding positions: the encoder
    must feed it full-length tokens, so a text embeds the same alone or beside a longer one."""
    import torch
    from open_clip.model import CLIP

    from mmsearch import models
    from mmsearch.encoder import Encoder

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
           # SigLIP-shaped text side: an HF tokenizer (BERT's, saved in the folder) feeding open_clip's
           # own transformer with no causal mask and last-token pooling, so padding changes outputs
           "text_cfg": {"context_length": 32, "vocab_size": 30522, "width": 64, "heads": 2, "layers": 1,
                        "hf_tokenizer_name": "bert-tokenizer-in-folder", "no_causal_mask": True,
                        "pool_type": "last"}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIP(**cfg)
    folder = models.save_open_clip_folder(model, tmp_path / "tiny-clip", model_config=cfg)
    enc = Encoder(str(folder), backend="torch")  # (test_onnx exports these same weights to the cache)
    assert enc.backend.name == "torch" and not enc.backend._masks_padding and enc.dim == 32 and enc.image_size == 64
    alone = enc.embed_texts(["a dog"])
    beside = enc.embed_texts(["a dog", "a much longer caption about a dog running across a green field"])
    assert np.allclose(alone[0], beside[0], atol=1e-5)
    with torch.no_grad():
        direct = model.encode_text(enc.backend._tokenizer(["a dog"]))
    assert np.allclose(alone[0], torch.nn.functional.normalize(direct, dim=-1)[0].numpy(), atol=1e-5)
