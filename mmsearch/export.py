"""Export a model's two towers to ONNX (torch's exporter) and, on request, quantise them to int8.

``export_model`` writes a self-contained folder (mmsearch.exported): the image tower with a dynamic
batch axis (pixels -> unit vectors) and the text tower as one graph from token ids to the unit
vector (mean pooling / EOT pooling and projection inside), the tokenizer as ``tokenizer.json``,
the preprocessing numbers and the query bank. It is written beside its destination and renamed
into place, so a killed export leaves nothing half-written.

``add_int8`` adds int8 graphs to an export: static quantisation in QDQ format (ONNX Runtime), weights
per channel, activation ranges calibrated on image-caption pairs (the Flickr8k train split for the
built-in models; never the test split).

This module needs the torch extra (torch, open_clip, onnx); it is imported only to export.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ._util import fsync_dir
from .config import ModelRef
from .errors import ModelLoadError
from .exported import (
    MANIFEST, TOKENIZER_FILE, ExportManifest, ModelRecord, cache_folder, graph_files, is_export,
)
from .preprocess import INTERPOLATIONS, ImageConfig, TextConfig


class _ImageGraph(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)


class _TextGraph(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return torch.nn.functional.normalize(self.model.encode_text(input_ids).float(), dim=-1)


# ---- what the torch model's preprocessing and tokenizer are, in numbers -------------------------
def image_config(preprocess) -> ImageConfig:
    """Read open_clip's eval transform (Resize, CenterCrop, Normalize) into an ImageConfig;
    ModelLoadError for a transform the numpy path does not reproduce."""
    from torchvision import transforms as T

    resize = crop = mean = std = None
    interpolation, mode = "bicubic", "shortest"
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Resize):
            size = t.size if isinstance(t.size, int) else list(t.size)
            if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
                size, mode = size[0], "squash"
            elif isinstance(size, list) and len(size) == 1:
                size = size[0]
            if not isinstance(size, int) or t.max_size is not None:
                raise ModelLoadError(f"cannot export image preprocessing with Resize({t.size}, max_size={t.max_size})")
            resize, interpolation = size, t.interpolation.value
        elif isinstance(t, T.CenterCrop):
            if t.size[0] != t.size[1]:
                raise ModelLoadError(f"cannot export a non-square centre crop {t.size}")
            crop = t.size[0]
        elif isinstance(t, T.Normalize):
            mean, std = tuple(float(x) for x in t.mean), tuple(float(x) for x in t.std)
        elif type(t).__name__ not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "function"):
            raise ModelLoadError(f"cannot export image preprocessing step {type(t).__name__}: use --backend torch")
    if resize is None or mean is None or interpolation not in INTERPOLATIONS:
        raise ModelLoadError(f"cannot export image preprocessing {preprocess}: use --backend torch")
    crop = crop or resize
    return ImageConfig(size=crop, mean=mean, std=std, interpolation=interpolation, resize_mode=mode,
                       resize=None if resize == crop or mode == "squash" else resize)


def _clip_bpe_tokenizer_json(tok) -> str:
    """open_clip's SimpleTokenizer (CLIP's byte-level BPE) as an equal ``tokenizers`` file: the same
    vocabulary and merges, CLIP's split pattern, start/end tokens around the text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sot, eot = "<|startoftext|>", "<|endoftext|>"
    vocab = dict(tok.encoder)
    vocab[sot], vocab[eot] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=eot, end_of_word_suffix="</w>", fuse_unk=False))
    t.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                         normalizers.Lowercase()])
    split = Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="removed", invert=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.post_processor = processors.TemplateProcessing(single=f"{sot} $A {eot}",
                                                     special_tokens=[(sot, vocab[sot]), (eot, vocab[eot])])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(sot, special=True), AddedToken(eot, special=True)])
    return t.to_str()


def text_config(model, tok) -> tuple[TextConfig, str]:
    """(TextConfig, tokenizer.json text) of an open_clip tokenizer; ModelLoadError for kinds the
    ``tokenizers`` path does not reproduce."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer, _clean_lower, _clean_whitespace

    if isinstance(tok, HFTokenizer):
        if tok.clean_fn not in (_clean_whitespace, _clean_lower) or tok.strip_sep_token or tok.tokenizer_mode:
            raise ModelLoadError("cannot export this HF tokenizer's cleaning or mode: use --backend torch")
        if not getattr(tok.tokenizer, "is_fast", False):
            raise ModelLoadError("cannot export a slow (Python) HF tokenizer: use --backend torch")
        fixed = not isinstance(getattr(model, "text", None), HFTextEncoder)  # other towers see every position
        cfg = TextConfig(context_length=int(tok.context_length), pad_id=int(tok.tokenizer.pad_token_id or 0),
                         lower=tok.clean_fn is _clean_lower, fixed_length=fixed)
        return cfg, tok.tokenizer.backend_tokenizer.to_str()
    if isinstance(tok, SimpleTokenizer) and tok.reduction_fn is None and tok.clean_fn is _clean_lower \
            and tok.vocab_size == 49408:
        return TextConfig(context_length=int(tok.context_length), pad_id=0, lower=True, fixed_length=True), \
            _clip_bpe_tokenizer_json(tok)
    raise ModelLoadError(f"cannot export a {type(tok).__name__} tokenizer: use --backend torch")


# ---- writing the folder ---------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """torch's exporter prints its progress and warns a lot; the library never prints."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _export_graphs(model, image: ImageConfig, text: TextConfig, folder: Path) -> None:
    files = graph_files("fp32")
    pixels = torch.zeros(2, 3, image.size, image.size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ids = torch.full((2, min(16, text.context_length)), text.pad_id, dtype=torch.long)
    ids[:, 0] = 1
    dims: dict = {0: batch}
    if text.fixed_length:
        ids = torch.full((2, text.context_length), text.pad_id, dtype=torch.long)
    else:
        dims[1] = torch.export.Dim("seq", min=2, max=text.context_length)
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(_ImageGraph(model), (pixels,), str(folder / files["image"]), input_names=["pixels"],
                          output_names=["vector"], dynamic_shapes={"pixels": {0: batch}}, dynamo=True,
                          external_data=False)
        torch.onnx.export(_TextGraph(model), (ids,), str(folder / files["text"]), input_names=["input_ids"],
                          output_names=["vector"], dynamic_shapes={"input_ids": dims}, dynamo=True,
                          external_data=False)


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(folder)


def _place(tmp: Path, dest: Path) -> Path:
    """Rename the finished ``tmp`` folder to ``dest``, replacing an earlier export there."""
    try:
        os.rename(tmp, dest)
    except OSError:
        if not is_export(dest):  # another process finished first (a cache race): theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
            if is_export(dest):
                return dest
            raise
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dest.parent)
    return dest


def _check_destination(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ModelLoadError(f"--out {out} is a file: give a folder for the exported model")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise ModelLoadError(f"--out {out} holds other files: give a new or empty folder (an earlier export is replaced)")


def export_model(ref: ModelRef, out: str | os.PathLike | None = None, record: ModelRecord | None = None,
                 cache_dir: str | None = None) -> Path:
    """Export ``ref`` (fp32) into ``out``, default the cache folder of its weights; returns the folder."""
    from importlib.metadata import version

    from .backends.torch_backend import load_model
    from .encoder import model_record
    from .hubness import BANK_FILE, load_query_bank

    record = record or model_record(ref)
    dest = Path(out) if out is not None else cache_folder(record)
    _check_destination(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model, preprocess, tok = load_model(ref, cache_dir)
    model = model.float().eval()
    image, (text, tokenizer_json) = image_config(preprocess), text_config(model, tok)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        _export_graphs(model, image, text, tmp)
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json)
        bank = load_query_bank(ref)
        if bank is not None:
            bank.save(tmp / BANK_FILE)
        manifest = ExportManifest(model=record, dim=_dim(model, image), image=image, text=text,
                                  exporter=f"torch {torch.__version__}, onnx {version('onnx')}")
        (tmp / MANIFEST).write_text(manifest.to_json())
        _fsync_tree(tmp)
        return _place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dim(model, image: ImageConfig) -> int:
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, image.size, image.size)).shape[-1])



# ---- int8 ----------------------------------------------------------------------------------------
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
    from .media import load_image
    from .preprocess import to_pixels

    pixels = [to_pixels(load_image(p, min_side=cfg.resize or cfg.size), cfg) for p in images]
    return [np.stack(pixels[i : i + bs]) for i in range(0, len(pixels), bs)]


def quantize_image_graph(src: Path, dest: Path, batches: list[np.ndarray]) -> None:
    """Static int8: QDQ format, per-channel int8 weights, uint8 activations with min/max ranges
    measured on ``batches`` of pixels."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, _quiet():
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
        CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        if batches is None:
            quantize_dynamic(str(prepared), str(dest), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
        else:
            quantize_static(str(prepared), str(dest), _Batches("input_ids", batches), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["MatMul", "Gemm"])


def add_int8(folder: str | os.PathLike, pairs, source: str, n_images: int = CALIBRATION_IMAGES,
             n_texts: int = CALIBRATION_TEXTS, seed: int = 0, static_text: bool = False) -> ExportManifest:
    """Add int8 graphs to an exported folder: the image tower static (activations calibrated on
    ``n_images`` photos of ``pairs``), the text tower with dynamic activations (static ones,
    ``static_text``, calibrated on ``n_texts`` captions, cost recall: benchmarks/int8_choice.py).
    ``source`` names the pairs in the manifest. Each graph is written beside its final name and
    renamed; the manifest, written last, lists int8 only once both graphs are in place."""
    from .preprocess import TextTokenizer

    folder = Path(folder)
    manifest = ExportManifest.load(folder)
    images, texts = _calibration_sample(pairs, n_images, n_texts, seed)
    tokenize = TextTokenizer(folder / TOKENIZER_FILE, manifest.text)
    text_batches = [tokenize(texts[i : i + 64], pad_to=manifest.text.context_length)
                    for i in range(0, len(texts), 64)] if static_text else None
    files, fp32 = graph_files("int8"), graph_files("fp32")
    for tower in ("image", "text"):
        tmp = folder / f".{files[tower]}.{os.getpid()}.tmp"
        try:
            if tower == "image":
                quantize_image_graph(folder / fp32["image"], tmp, _image_batches(images, manifest.image))
            else:
                quantize_text_graph(folder / fp32["text"], tmp, text_batches)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, folder / files[tower])
        finally:
            tmp.unlink(missing_ok=True)
    fsync_dir(folder)
    manifest.precisions = sorted(set(manifest.precisions) | {"int8"}, key=["fp32", "int8"].index)
    manifest.calibration = {
        "pairs": source, "images": len(images), "seed": seed, "image": "static QDQ, min/max",
        "text": f"static QDQ, min/max, {len(texts)} captions" if static_text else "dynamic (activations per batch)"}
    manifest.save(folder)
    return manifest
