"""int8 graphs for an exported folder (ONNX Runtime's quantiser; needs the onnx package, not torch).

- the image tower: static quantisation in QDQ format, int8 weights per channel, uint8 activations
  with min/max ranges calibrated on photos (the Flickr8k train split for the built-in models,
  never the test split). The built-in models ship theirs, made by benchmarks/build_int8.py;
- the text tower stays fp32: int8 pairs the int8 image graph with the fp32 text graph. Static int8
  text activations cost recall on dev, and dynamic ones (quantised per batch at run time) make a
  text's vector depend on the other texts of its batch (benchmarks/int8_choice.py measures both);
  a query is one short text, so fp32 costs little there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ._util import atomic_path, silenced
from .errors import BadArgumentError, MediaError, ModelLoadError
from .exported import TOKENIZER_FILE, ExportManifest, graph_files
from .media import load_image
from .preprocess import ImageConfig, TextTokenizer, to_pixels
from .weights import shipped_int8

#: images / captions the int8 activation ranges are calibrated on, sampled from the pairs given
CALIBRATION_IMAGES = 256
CALIBRATION_TEXTS = 512


def _calibration_sample(pairs, n_images: int, n_texts: int, seed: int) -> tuple[list[str], list[str]]:
    """Photos and captions to calibrate on, a seeded sample of ``pairs``."""
    rng = np.random.default_rng(seed)
    images = [pairs.images[i] for i in sorted(rng.choice(len(pairs), min(n_images, len(pairs)), replace=False))]
    texts, _ = pairs.flat()
    picked = sorted(rng.choice(len(texts), min(n_texts, len(texts)), replace=False))
    return images, [texts[i] for i in picked]


class _Batches:
    """An ONNX Runtime CalibrationDataReader over a list of input arrays."""

    def __init__(self, name: str, batches) -> None:
        self._it = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - asked only by some calibrators
        pass


def _image_batches(images: list[str], cfg: ImageConfig, bs: int = 32) -> list[np.ndarray]:
    """The calibration photos as pixel batches; photos that cannot be decoded are left out."""

    pixels = []
    for p in images:
        try:
            pixels.append(to_pixels(load_image(p, min_side=cfg.resize or cfg.size), cfg))
        except (MediaError, OSError):
            continue
    if not pixels:
        raise ModelLoadError(f"none of the {len(images)} calibration photos could be decoded: give other pairs")
    return [np.stack(pixels[i : i + bs]) for i in range(0, len(pixels), bs)]


def quantize_image_graph(src: Path, dest: Path, batches: list[np.ndarray]) -> None:
    """Static int8: QDQ format, per-channel int8 weights, uint8 activations with min/max ranges
    measured on ``batches`` of pixels."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, silenced():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(dest), _Batches("pixels", batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)


def quantize_text_graph(src: Path, dest: Path, batches: list[np.ndarray] | None = None) -> None:
    """int8 MatMul/Gemm weights per channel. With ``batches`` (token ids, all of one width)
    activations are static too, calibrated on them; without, they are quantised per batch at run
    time (dynamic), which keeps text vectors far closer to fp32 (benchmarks/int8_choice.py)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, silenced():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        if batches is None:
            quantize_dynamic(str(prepared), str(dest), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        else:
            quantize_static(str(prepared), str(dest), _Batches("input_ids", batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul", "Gemm"])


TEXT_INT8 = ("fp32", "dynamic", "static")  # how an int8 export treats the text tower (see the module docstring)


def _install_int8(folder: Path, manifest: ExportManifest, write_image, text: str, text_batches,
                  calibration: dict) -> None:
    """Write the int8 graphs into ``folder`` (``write_image(dest)`` makes the image one; the text one
    only if ``text`` is not "fp32"), each beside its final name then renamed; the manifest, written
    last, lists int8 once they are in place."""
    files = graph_files("int8")
    towers = {"image": write_image}
    if text != "fp32":
        towers["text"] = lambda dest: quantize_text_graph(folder / manifest.graphs["fp32"]["text"], dest, text_batches)
    for tower, write in towers.items():
        with atomic_path(folder / files[tower]) as tmp:
            write(tmp)
    manifest.graphs["int8"] = {"image": files["image"],
                               "text": files["text"] if text != "fp32" else manifest.graphs["fp32"]["text"]}
    manifest.calibration = calibration
    manifest.save(folder)


def add_int8(folder: str | os.PathLike, pairs, source: str, n_images: int = CALIBRATION_IMAGES,
             n_texts: int = CALIBRATION_TEXTS, seed: int = 0, text: str = "fp32") -> ExportManifest:
    """Add int8 graphs to an exported folder: the image tower static, activations calibrated on
    ``n_images`` photos of ``pairs`` (``source`` names them in the manifest). ``text``: "fp32"
    (the default: see the module docstring), "dynamic", or "static" (calibrated on ``n_texts``
    captions), the last two for comparison (benchmarks/int8_choice.py)."""

    if text not in TEXT_INT8:
        raise BadArgumentError(f"text must be one of {TEXT_INT8}, not {text!r}")
    folder = Path(folder)
    manifest = ExportManifest.load(folder)
    images, texts = _calibration_sample(pairs, n_images, n_texts, seed)
    tokenize = TextTokenizer(folder / TOKENIZER_FILE, manifest.text)
    text_batches = [tokenize(texts[i : i + 64], pad_to=manifest.text.context_length)
                    for i in range(0, len(texts), 64)] if text == "static" else None
    pixels = _image_batches(images, manifest.image)
    calibration = {"pairs": source, "images": len(images), "seed": seed, "image": "static QDQ, min/max",
                   "text": {"fp32": "fp32", "dynamic": "int8 weights, activations per batch (dynamic)",
                            "static": f"static QDQ, min/max, {len(texts)} captions"}[text]}
    image_src = folder / manifest.graphs["fp32"]["image"]
    _install_int8(folder, manifest, lambda dest: quantize_image_graph(image_src, dest, pixels), text, text_batches,
                  calibration)
    return manifest


def add_shipped_int8(folder: str | os.PathLike) -> ExportManifest:
    """Add int8 graphs to the export of a built-in model: the int8 image graph that ships with it
    (calibrated on Flickr8k train photos by benchmarks/build_int8.py), and the fp32 text graph.
    Copying a file: no quantiser, no onnx package needed. ModelLoadError if it ships none for these weights."""

    folder = Path(folder)
    manifest = ExportManifest.load(folder)
    shipped = shipped_int8(manifest.model.name, manifest.model.weights)
    if shipped is None:
        raise ModelLoadError(f"{manifest.model.key} ships no int8 graph for these weights: make one with "
                             f"`mmsearch export {manifest.model.key} --precision int8 --calibrate PAIRS`")
    graph, record = shipped
    _install_int8(folder, manifest, lambda dest: shutil.copyfile(graph, dest), "fp32", None,
                  dict(record["calibration"], shipped=graph.name))
    return manifest
