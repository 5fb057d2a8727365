"""Encoder: turns images and texts into L2-normalised float32 vectors in one shared space.

Any open_clip model works: a registry name plus pretrained tag (downloaded and cached on machines
that can), an ``hf-hub:org/repo`` id, a local open_clip checkpoint folder (``open_clip_config.json``
+ weights), or the built-in offline default ``mmsearch-lite``.

Preprocessing (decode, resize, tokenise) is kept apart from the forward pass so the search layer can
later run on a torch-free backend; torch and open_clip are imported only when a model is loaded.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import numpy as np

from .config import DEFAULT_MODEL, ModelRef
from .errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

ImageLike = Union[str, Path, "Image.Image"]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _resolves(url: str) -> bool:
    import socket
    from urllib.parse import urlparse

    try:
        socket.getaddrinfo(urlparse(url).hostname or url, 443)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_hub():
    """Load quietly, and offline (cache only) when the hub's host does not even resolve.

    Without this, a machine with no network waits a minute of download retries before failing, and
    huggingface_hub / open_clip log warnings to stderr (the library never prints). Yields whether
    the hub was unreachable.
    """
    import logging

    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    unreachable = not before and not _resolves(hub.ENDPOINT)
    if unreachable:
        hub.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub.is_offline_mode()
    # silence only the loaders' own records: hub retries on its loggers, open_clip on the root logger
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "open_clip", "timm", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    drop = lambda r: not any(f"{os.sep}{m}{os.sep}" in r.pathname for m in ("open_clip", "timm"))  # noqa: E731
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield unreachable or before
    finally:
        hub.HF_HUB_OFFLINE = before
        root.removeFilter(drop)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_open_clip(ref: ModelRef, cache_dir: str | None):
    """(model, preprocess, tokenizer) for any open_clip reference; errors become ModelLoadError."""
    import open_clip

    name = ref.name
    if not os.path.exists(name) and (os.sep in name or name.startswith(".")) and not name.startswith("hf-hub:"):
        raise ModelLoadError(f"model folder not found: {name}: pass an existing checkpoint folder or a model name")
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "open_clip_config.json")):
            raise ModelLoadError(
                f"model folder {name} has no open_clip_config.json: pass an open_clip checkpoint "
                "folder (open_clip_config.json + weights) or a model name"
            )
        name = "local-dir:" + os.path.abspath(name)
    elif ref.pretrained is None and not name.startswith("hf-hub:") and name in open_clip.list_models():
        raise ModelLoadError(
            f"model {name!r} needs pretrained weights: pass pretrained=TAG (one of "
            f"{', '.join(t for m, t in open_clip.list_pretrained() if m == name)[:200]})"
        )
    from .models import quiet_transformers

    offline = False
    try:
        with _quiet_hub() as offline, quiet_transformers():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=ref.pretrained, cache_dir=cache_dir
            )
            tokenizer = open_clip.get_tokenizer(name)
    except ModelLoadError:
        raise
    except Exception as e:  # open_clip raises RuntimeError, OSError, HF and network errors
        what = f"{ref.name!r}" + (f" (pretrained {ref.pretrained!r})" if ref.pretrained else "")
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("no network and the weights are not in the local cache: download them on a machine "
                "with internet or pass a local checkpoint folder" if offline else
                "use a name from open_clip.list_pretrained(), an hf-hub: id, or a local checkpoint folder")
        raise ModelLoadError(f"cannot load model {what}: {reason[:200]} ({hint})") from e
    return model, preprocess, tokenizer


class Encoder:
    """Embeds images and texts with one model.

    >>> enc = Encoder()                       # built-in offline model
    >>> enc.embed_texts(["a dog"]).shape      # (1, 256), float32, unit rows
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
        cache_dir: str | None = None,
    ) -> None:
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if pretrained and os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)  # recorded in manifests: must work from any cwd
        self.ref = ModelRef(name=str(model), pretrained=pretrained, device=device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        from . import models

        if self.ref.name in models.BUILTINS and pretrained is None:
            self.model = models.build(name=self.ref.name)
            self._preprocess = models.preprocess(self.ref.name)
            self._tokenizer = models.tokenizer()
        else:
            self.model, self._preprocess, self._tokenizer = _load_open_clip(self.ref, cache_dir)
        self.model.eval().to(self.device)
        if self.device.type == "cpu":
            # convnets run about twice as fast on CPU in channels-last layout
            self.model.visual.to(memory_format=torch.channels_last)
        from open_clip.hf_model import HFTextEncoder

        self._masks_padding = isinstance(getattr(self.model, "text", None), HFTextEncoder)
        size = getattr(self.model.visual, "image_size", None)
        #: shortest input side the model sees; lets decoders downscale large JPEGs early
        self.image_size = min(size) if isinstance(size, (tuple, list)) else size
        with torch.inference_mode():
            self.dim = int(self.embed_texts(["probe"]).shape[1])
        #: fingerprint of the weights loaded (recorded in index manifests; None for registry tags)
        self.weights = models.fingerprint(self.ref.name, pretrained)
        self._query_bank = False  # not looked up yet

    @property
    def name(self) -> str:
        """The model reference recorded in index manifests."""
        return self.ref.key()

    @property
    def query_bank(self):
        """The model's ``mmsearch.hubness.QueryBank`` (shipped with the built-in models, written by
        `mmsearch train`), or None: cross-modal search then ranks by plain cosine."""
        if self._query_bank is False:
            from .hubness import load_query_bank

            self._query_bank = load_query_bank(self.ref)
        return self._query_bank

    # ---- preprocessing (no forward pass) -------------------------------------------------------
    def preprocess(self, image: "Image.Image"):
        """Decoded RGB PIL image -> the model's input tensor (C, H, W)."""
        return self._preprocess(image)

    def tokenize(self, texts: Sequence[str]):
        """Texts -> token id tensor (n, L), trailing padding columns trimmed for HF text towers."""
        tokens = self._tokenizer(list(texts))
        pad_id = self.model.text.config.pad_token_id if self._masks_padding else None
        if pad_id is not None and tokens.shape[0] > 0:
            # HF text towers mask padding themselves, so the shared all-pad tail is wasted work;
            # other towers (CLIP, SigLIP) see every position, so their tokens are left as they are
            used = (tokens != pad_id).any(dim=0).nonzero()
            tokens = tokens[:, : int(used.max()) + 1] if used.numel() else tokens
        return tokens

    # ---- forward passes ------------------------------------------------------------------------
    def _autocast(self):
        """bf16 (else fp16) autocast on CUDA; full precision on the CPU."""
        import contextlib

        import torch

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def embed_pixels(self, pixels) -> np.ndarray:
        """A batch tensor (n, C, H, W) from ``preprocess`` -> float32 (n, d), L2-normalised."""
        import torch

        with torch.inference_mode(), self._autocast():
            x = pixels.to(self.device, non_blocking=True)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model.encode_image(x)
        return _normalise(out.float().cpu().numpy())

    def embed_tokens(self, tokens) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_text(tokens.to(self.device))
        return _normalise(out.float().cpu().numpy())

    def embed_images(self, images: Iterable[ImageLike], batch_size: int | None = None) -> np.ndarray:
        """Paths or PIL images -> float32 (n, d), L2-normalised. A bad file raises MediaError."""
        import torch

        from .media import load_image

        bs = batch_size or self.batch_size
        out, batch = [], []
        for item in images:
            img = item if hasattr(item, "convert") else load_image(item, min_side=self.image_size)
            if getattr(img, "mode", "RGB") != "RGB":
                img = img.convert("RGB")
            batch.append(self.preprocess(img))
            if len(batch) == bs:
                out.append(self.embed_pixels(torch.stack(batch)))
                batch = []
        if batch:
            out.append(self.embed_pixels(torch.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Texts -> float32 (n, d), L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, not one string")
        texts = list(texts)
        bs = batch_size or max(self.batch_size, 256)
        # sort by length so each batch pads only to its own longest text
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), getattr(self, "dim", 0) or 0), np.float32)
        chunks = []
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            chunks.append((idx, self.embed_tokens(self.tokenize([texts[i] for i in idx]))))
        if chunks:
            out = np.zeros((len(texts), chunks[0][1].shape[1]), np.float32)
            for idx, emb in chunks:
                out[idx] = emb
        return out


_CACHE: dict[tuple, Encoder] = {}


def get_encoder(model: str = DEFAULT_MODEL, pretrained: str | None = None, device: str | None = None) -> Encoder:
    """A shared Encoder per (model, pretrained, device): loading a model takes seconds, so a process
    that indexes and queries (a test run, a service) loads each model once."""
    key = (str(model), pretrained, device)
    if key not in _CACHE:
        _CACHE[key] = Encoder(model, pretrained=pretrained, device=device)
    return _CACHE[key]
