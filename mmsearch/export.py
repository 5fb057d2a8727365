"""Export a model's two towers to ONNX (torch's exporter) and, on request, quantise them to int8.

``export_model`` writes a self-contained folder (mmsearch.exported): the image tower with a dynamic
batch axis (pixels -> unit vectors) and the text tower as one graph from token ids to the unit
vector (mean pooling / EOT pooling and projection inside), the tokenizer as ``tokenizer.json``,
the preprocessing numbers and the query bank. It is written beside its destination and renamed
into place, so a killed export leaves nothing half-written.

int8 graphs are made by mmsearch.quantize. This module needs the torch extra (torch, open_clip,
onnx); it is imported only to export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ._util import atomic_path, atomic_write_text, fsync_dir, silenced
from .config import ModelRef
from .errors import ModelLoadError
from .exported import (
    TOKENIZER_FILE,
    ExportManifest,
    ModelRecord,
    cache_folder,
    graph_files,
    is_export,
)
from .preprocess import INTERPOLATIONS, ImageConfig, TextConfig
from .weights import BANK_FILE, load_query_bank, model_record, shipped_int8


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
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

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
    from open_clip.tokenizer import (
        HFTokenizer,
        SimpleTokenizer,
        _clean_lower,
        _clean_whitespace,
    )

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
    with silenced(), torch.inference_mode(False), torch.no_grad():
        with atomic_path(folder / files["image"]) as dest:
            torch.onnx.export(_ImageGraph(model), (pixels,), str(dest), input_names=["pixels"],
                              output_names=["vector"], dynamic_shapes={"pixels": {0: batch}}, dynamo=True,
                              external_data=False)
        with atomic_path(folder / files["text"]) as dest:
            torch.onnx.export(_TextGraph(model), (ids,), str(dest), input_names=["input_ids"],
                              output_names=["vector"], dynamic_shapes={"input_ids": dims}, dynamo=True,
                              external_data=False)


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
        atomic_write_text(tmp / TOKENIZER_FILE, tokenizer_json)
        bank = load_query_bank(ref)
        if bank is not None:
            bank.save(tmp / BANK_FILE)
        manifest = ExportManifest(model=record, dim=_dim(model, image), image=image, text=text,
                                  exporter=f"torch {torch.__version__}, onnx {version('onnx')}")
        manifest.save(tmp)
        if shipped_int8(record.name, record.weights) is not None:
            from .quantize import add_shipped_int8

            add_shipped_int8(tmp)  # the built-in models' default precision: ready from the first use
        return _place(tmp, dest)  # every file above was written through _util.atomic_path
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _dim(model, image: ImageConfig) -> int:
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, image.size, image.size)).shape[-1])
