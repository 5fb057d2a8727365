"""ONNX Runtime backend: an exported model folder (mmsearch.exported) run without torch.

Sessions are made on first use of each tower (a text query never loads the image graph), with all
graph optimisations and one intra-op thread per available core. With CUDA present (onnxruntime-gpu),
the CUDA execution provider runs both towers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .._util import available_cores
from ..errors import ModelLoadError
from ..exported import TOKENIZER_FILE, ExportManifest
from ..preprocess import TextTokenizer, to_pixels


def _providers(device: str | None) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    if device is not None and device.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise ModelLoadError(f"device {device!r} asked for, but this onnxruntime has no CUDA provider "
                                 "(have: " + ", ".join(have) + "): pip install onnxruntime-gpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device is None and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackend:
    """Embeds with the graphs of one precision of an exported folder."""

    name = "onnx"

    def __init__(self, folder: str | os.PathLike, precision: str = "fp32", device: str | None = None,
                 threads: int | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = ExportManifest.load(self.folder)
        if precision not in self.manifest.precisions:
            raise ModelLoadError(
                f"exported model {self.folder} has no {precision} graphs (it has {', '.join(self.manifest.precisions)}): "
                f"make them with `mmsearch export {self.manifest.model.key} --precision {precision} --calibrate PAIRS`"
            )
        self.precision = precision
        self.files = self.manifest.graphs[precision]
        self.threads = threads or available_cores()
        self.providers = _providers(device)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.dim = self.manifest.dim
        self.image_size = self.manifest.image.size
        self._sessions: dict = {}
        self._tokenizer: TextTokenizer | None = None

    def session(self, tower: str):
        """The ONNX Runtime session of "image" or "text", made on first use."""
        if tower not in self._sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            # decoding threads run beside the model while indexing: idle ORT workers must not spin on their cores
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3  # errors only: the library never prints
            path = self.folder / self.files[tower]
            try:
                self._sessions[tower] = ort.InferenceSession(str(path), so, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile
                reason = " ".join(str(e).split())[:160]
                raise ModelLoadError(f"cannot load {path}: {reason}: export the model again "
                                     f"(`mmsearch export {self.manifest.model.key} --out DIR`)") from e
        return self._sessions[tower]

    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            try:
                self._tokenizer = TextTokenizer(self.folder / TOKENIZER_FILE, self.manifest.text)
            except Exception as e:  # tokenizers raises its own Exception for a damaged file
                raise ModelLoadError(f"cannot read {self.folder / TOKENIZER_FILE}: {str(e)[:120]}: "
                                     "export the model again") from e
        return self._tokenizer

    def warm(self, *towers: str) -> None:
        """Make these towers' sessions (and the tokenizer, for "text") now."""
        for tower in towers:
            self.session(tower)
            if tower == "text":
                self.tokenizer("warm")

    def vocab(self) -> dict[str, int]:
        """The text tokenizer's vocabulary."""
        return self.tokenizer.vocab()

    # ---- the backend interface Encoder uses -----------------------------------------------------
    def preprocess(self, image) -> np.ndarray:
        return to_pixels(image, self.manifest.image)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer(texts)

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        return self.session("image").run(None, {"pixels": pixels})[0]

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        return self.session("text").run(None, {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)})[0]
