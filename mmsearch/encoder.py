"""Encoder: turns images and texts into L2-normalised float32 vectors in one shared space.

Any open_clip model works: a registry name plus pretrained tag (downloaded and cached on machines
that can), an ``hf-hub:org/repo`` id, a local open_clip checkpoint folder (``open_clip_config.json``
+ weights), an exported model folder (``mmsearch export``), or a built-in offline model.

Two backends run a model (mmsearch.backends): ONNX Runtime over an exported folder, without torch,
and open_clip in torch. ``backend="auto"`` takes ONNX Runtime whenever the model has an export: an
exported folder given as the model, or the user's cache (``~/.cache/mmsearch/onnx/<fingerprint>``).
A built-in model is exported into the cache the first time it is used (that one time needs torch);
other open_clip models run in torch until ``mmsearch export`` has exported them.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence, Union

import numpy as np

from . import models
from ._util import ordered_map
from .backends.onnx_backend import OnnxBackend
from .config import DEFAULT_MODEL, ModelRef
from .errors import BadQueryError, ModelLoadError
from .exported import (
    PRECISIONS,
    ExportManifest,
    ModelRecord,
    cache_folder,
    cached_export,
    is_export,
)
from .lang import check_lang, route, script_route
from .media import load_image
from .multilingual import MultilingualTower
from .weights import (
    BANK_FILE,
    bank_path,
    default_precision,
    load_query_bank,
    model_record,
    shipped_multilingual,
)

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

ImageLike = Union[str, Path, "Image.Image"]
BACKENDS = ("auto", "onnx", "torch")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def torch_installed() -> bool:
    """Whether the torch extra (torch + open_clip) is installed, without importing it."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))


def _default_precision(record: ModelRecord, folder: Path | None) -> str:
    """The model's default precision where its export can run it: a cached export of a built-in
    model made before its int8 graph shipped gets it now; an exported folder without int8 runs fp32."""

    if folder is None or default_precision(record.name, record.weights) == "fp32":
        return "fp32"
    if "int8" in ExportManifest.load(folder).precisions:
        return "int8"
    if folder != cache_folder(record):
        return "fp32"  # the user's own folder: not ours to add files to
    from .quantize import add_shipped_int8

    add_shipped_int8(folder)
    return "int8"


def _onnx_folder(ref: ModelRef, record: ModelRecord, backend: str, cache_dir: str | None) -> Path | None:
    """The export to run ``ref`` from: cached, or made now for a built-in model (or with backend
    "onnx"); None when the model runs in torch (backend "auto", not built-in, not exported yet)."""

    if backend == "torch":
        return None
    folder = cached_export(record)
    if folder is not None or (backend == "auto" and ref.name not in models.BUILTINS):
        return folder
    if not torch_installed():
        raise ModelLoadError(
            f"{ref.key()} has no ONNX export in {cache_folder(record)} and torch is not "
            f"installed to make one: run `mmsearch export {ref.key()} --out DIR` where mmsearch[torch] is "
            "installed, then pass --model DIR (or copy DIR to that cache folder)"
        )
    from .export import export_model

    return export_model(ref, record=record, cache_dir=cache_dir)


class Encoder:
    """Embeds images and texts with one model.

    >>> enc = Encoder()                       # built-in offline model, on ONNX Runtime
    >>> enc.embed_texts(["a dog"]).shape      # (1, 256), float32, unit rows
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = None,
        device: str | None = None,
        batch_size: int = 32,
        cache_dir: str | None = None,
        backend: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
    ) -> None:
        """``backend``: "auto" (ONNX Runtime when the model has an export, see the module docstring),
        "onnx" (export now if need be) or "torch"; ``precision``: "fp32" or "int8" (ONNX only: the
        int8 graphs a built-in model ships, or ``mmsearch export --precision int8`` makes), None for
        the model's default (``mmsearch.weights.default_precision``: int8 for mmsearch-lite2 on ONNX
        Runtime, else fp32); ``cache_dir``: where open_clip keeps downloaded weights; ``threads``:
        ONNX Runtime's threads per forward pass (None: one per core this process may use)."""
        if backend not in BACKENDS:
            raise ModelLoadError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
        if precision is not None and precision not in PRECISIONS:
            raise ModelLoadError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
        if pretrained and os.path.isfile(pretrained):
            pretrained = os.path.abspath(pretrained)  # recorded in manifests: must work from any cwd
        self.batch_size = batch_size
        self.export_folder: Path | None = None
        if is_export(str(model)):
            record = ExportManifest.load(model).model  # an exported folder stands for the model it came from
            self.export_folder = Path(model).resolve()
            if backend == "torch":
                raise ModelLoadError(f"{model} is an exported model: it runs on ONNX Runtime, not --backend torch")
        else:
            record = model_record(ModelRef(str(model), pretrained))
            if precision not in (None, "fp32") and backend == "torch":
                raise ModelLoadError(f"precision {precision} runs on ONNX Runtime only: drop --backend torch")
            self.export_folder = _onnx_folder(ModelRef(str(model), pretrained), record, backend, cache_dir)
        if precision is None:
            precision = _default_precision(record, self.export_folder)
        self.ref = ModelRef(name=record.name, pretrained=record.pretrained, device=device)
        #: fingerprint of the weights (recorded in index manifests; None for registry tags)
        self.weights = record.weights
        if self.export_folder is not None:
            self.backend = OnnxBackend(self.export_folder, precision=precision, device=device, threads=threads)
        else:
            if precision != "fp32":
                raise ModelLoadError(f"{self.ref.key()} has no export: make its {precision} graphs with "
                                     f"`mmsearch export {self.ref.key()} --precision {precision} --calibrate PAIRS`")
            from .backends.torch_backend import TorchBackend

            self.backend = TorchBackend(ModelRef(str(model), pretrained), device=device, cache_dir=cache_dir)
        self.precision = self.backend.precision
        self.dim = self.backend.dim
        #: shortest input side the model sees; lets decoders downscale large JPEGs early
        self.image_size = self.backend.image_size
        self._query_bank = False  # not looked up yet
        self._multilingual: MultilingualTower | None = None
        self._multi_head = shipped_multilingual(self.ref.name, self.weights)  # its file, if the model ships one
        self._english_words: frozenset[str] | None = None
        self._lock = threading.Lock()  # lazy loads: a service's requests and the Searcher's loader thread

    @property
    def name(self) -> str:
        """The model reference recorded in index manifests."""
        return self.ref.key()

    @property
    def model(self):
        """The open_clip model (torch backend only)."""
        try:
            return self.backend.model
        except AttributeError:
            raise AttributeError("this encoder runs on ONNX Runtime: Encoder(..., backend='torch') has a torch model") from None

    @property
    def query_bank(self):
        """The model's ``mmsearch.hubness.QueryBank`` (shipped with the built-in models and their
        exports, written by `mmsearch train`), or None: cross-modal search then ranks by plain cosine."""
        if self._query_bank is False:
            exported = self.export_folder / BANK_FILE if self.export_folder is not None else None
            bank = load_query_bank(self.ref, path=exported, weights=self.weights)
            if bank is not None and bank.dim != self.dim:
                raise ModelLoadError(f"query bank {exported or bank_path(self.ref)} holds {bank.dim}-d vectors, "
                                     f"{self.name} embeds {self.dim}-d: delete it, or rebuild it with `mmsearch train`")
            self._query_bank = bank
        return self._query_bank

    def warm(self, *towers: str) -> None:
        """Load what embedding with these towers ("text", "image", "multi": the multilingual one) needs
        now rather than on first use."""
        if "multi" in towers and self.multilingual is not None:
            self.multilingual.encoder  # noqa: B018 - loads the sentence encoder
        warm = getattr(self.backend, "warm", None)
        others = [t for t in towers if t != "multi"]
        if warm is not None and others:
            warm(*others)

    # ---- preprocessing (no forward pass) -------------------------------------------------------
    def preprocess(self, image: "Image.Image") -> np.ndarray:
        """Decoded RGB PIL image -> the model's input, float32 (C, H, W)."""
        return self.backend.preprocess(image)

    def tokenize(self, texts: Sequence[str]):
        """Texts -> token ids (n, L) for ``embed_tokens``."""
        return self.backend.tokenize(texts)

    # ---- forward passes ------------------------------------------------------------------------
    def embed_pixels(self, pixels) -> np.ndarray:
        """A batch (n, C, H, W) of ``preprocess`` outputs -> float32 (n, d), L2-normalised."""
        return _normalise(self.backend.embed_pixels(pixels))

    def embed_tokens(self, tokens) -> np.ndarray:
        return _normalise(self.backend.embed_tokens(tokens))

    def _pixels_of(self, item) -> np.ndarray:
        img = item if hasattr(item, "convert") else load_image(item, min_side=self.image_size)
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        return self.preprocess(img)

    def embed_images(self, images: Iterable[ImageLike], batch_size: int | None = None) -> np.ndarray:
        """Paths or PIL images -> float32 (n, d), L2-normalised. A bad file raises MediaError.
        Files are decoded in worker threads, ahead of the forward pass."""
        bs = batch_size or self.batch_size
        out, batch = [], []
        for pixels in ordered_map(self._pixels_of, images, ahead=2 * bs):
            batch.append(pixels)
            if len(batch) == bs:
                out.append(self.embed_pixels(np.stack(batch)))
                batch = []
        if batch:
            out.append(self.embed_pixels(np.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @property
    def multilingual(self) -> MultilingualTower | None:
        """The model's multilingual query tower (mmsearch.multilingual), or None: only a built-in
        model ships one, trained for its current weights. A damaged head file raises ModelLoadError."""
        if self._multi_head is None:
            return None
        with self._lock:
            if self._multilingual is None:
                self._multilingual = MultilingualTower(self._multi_head)
            return self._multilingual

    @property
    def english_words(self) -> frozenset[str] | None:
        """The whole words of the text tower's vocabulary (for ``mmsearch.lang.route``), None if unknown."""
        with self._lock:
            if self._english_words is None:
                vocab = self.backend.vocab()
                if vocab is not None:
                    self._english_words = frozenset(w for w in vocab if w.isalpha())
            return self._english_words

    def routes(self, texts: Sequence[str], lang: str = "auto") -> list[str]:
        """The tower ("en" or "multi") each text goes to under ``lang`` (see mmsearch.lang)."""
        if check_lang(lang) == "multi" and self._multi_head is None:
            raise ModelLoadError(f"{self.name} has no multilingual query tower (mmsearch-lite2 ships one): "
                                 "query with --lang auto or en")
        if lang == "en" or (lang == "auto" and self._multi_head is None):
            return ["en"] * len(texts)
        if lang == "multi":
            return ["multi"] * len(texts)
        by_script = [script_route(t) for t in texts]  # the English vocabulary is read only for Latin text
        return [r or route(t, self.english_words) for r, t in zip(by_script, texts)]

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None, lang: str = "auto") -> np.ndarray:
        """Texts -> float32 (n, d), L2-normalised. ``lang`` picks the text tower: "auto" routes each
        text by its language (English and undetermined to the model's own tower, other languages
        to its multilingual tower when it has one; mmsearch.lang), "en" or "multi" force one."""
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of strings, not one string")
        texts = list(texts)
        routes = self.routes(texts, lang)
        multi = [i for i, r in enumerate(routes) if r == "multi"]
        if not multi:
            return self._embed_english(texts, batch_size)
        out = np.zeros((len(texts), self.dim), np.float32)
        out[multi] = self.multilingual.embed([texts[i] for i in multi])
        english = [i for i, r in enumerate(routes) if r == "en"]
        if english:
            out[english] = self._embed_english([texts[i] for i in english], batch_size)
        return out

    def _embed_english(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        bs = batch_size or max(self.batch_size, 256)
        # sort by length so each batch pads only to its own longest text
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            out[idx] = self.embed_tokens(self.tokenize([texts[i] for i in idx]))
        return out


def embed_texts_with(encoder, texts: Sequence[str], lang: str = "auto") -> np.ndarray:
    """``encoder.embed_texts`` with the language routing of ``lang`` where the encoder has it (an
    ``Encoder``); any other object with ``embed_texts(texts)`` embeds with its one tower ("auto" only)."""
    try:
        takes_lang = isinstance(encoder, Encoder) or "lang" in inspect.signature(encoder.embed_texts).parameters
    except (TypeError, ValueError):  # a callable without a signature
        takes_lang = False
    if takes_lang:
        return encoder.embed_texts(texts, lang=lang)
    if lang not in ("auto", "en"):
        raise BadQueryError(f"language choice {lang!r} needs an encoder with language routing (mmsearch's Encoder)")
    return encoder.embed_texts(texts)


_CACHE: dict[tuple, Encoder] = {}


def get_encoder(model: str = DEFAULT_MODEL, pretrained: str | None = None, device: str | None = None,
                backend: str = "auto", precision: str | None = None, threads: int | None = None) -> Encoder:
    """A shared Encoder per (model, pretrained, device, backend, precision): loading a model takes
    time, so a process that indexes and queries (a test run, a service) loads each model once."""
    key = (str(model), pretrained, device, backend, precision, threads)
    if key not in _CACHE:
        _CACHE[key] = Encoder(model, pretrained=pretrained, device=device, backend=backend, precision=precision,
                              threads=threads)
    return _CACHE[key]
