"""Model inputs without torch: image pixels with Pillow + numpy, token ids with ``tokenizers``.

Both equal what open_clip's eval transforms and tokenizers give, so an exported model (ONNX Runtime)
and the torch model embed the same inputs:

- images: shortest side resized to the model's size with torchvision's rounding (the long side is
  ``int(size * long / short)``), Pillow bicubic, centre crop with torchvision's rounding, scaled to
  [0, 1], then ``(x - mean) / std``, channels first;
- texts: open_clip's cleaning (ftfy, HTML entities unescaped twice, whitespace collapsed; lower-cased
  for CLIP's own tokenizer), then the model's ``tokenizer.json`` with truncation to the model's
  context length (not the 128 a MiniLM file records) and padding to the longest text of the batch
  (text towers mask padding, so trailing pad columns change nothing).
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class ImageConfig:
    """How a model's image tower wants its input (open_clip's eval transform, in numbers)."""

    size: int  # side of the square crop the tower sees
    mean: tuple[float, float, float]  # per channel, of [0, 1] pixels
    std: tuple[float, float, float]
    interpolation: str = "bicubic"  # Pillow resampling filter of the resize
    resize_mode: str = "shortest"  # "shortest": short side to `resize`, then centre crop; "squash": both sides to size
    resize: int | None = None  # short side before the crop ("shortest" mode); None = size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageConfig":
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=d.get("interpolation", "bicubic"), resize_mode=d.get("resize_mode", "shortest"),
                   resize=d.get("resize"))


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) after resizing the short side to ``size``, rounded as torchvision rounds."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def to_pixels(image: Image.Image, cfg: ImageConfig) -> np.ndarray:
    """A decoded RGB image -> float32 (3, size, size), as open_clip's eval transform makes it."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    resample = INTERPOLATIONS[cfg.interpolation]
    if cfg.resize_mode == "squash":
        image = image.resize((cfg.size, cfg.size), resample)
    else:
        w, h = resized_size(image.width, image.height, cfg.resize or cfg.size)
        image = image.resize((w, h), resample)
        top, left = int(round((h - cfg.size) / 2.0)), int(round((w - cfg.size) / 2.0))
        image = image.crop((left, top, left + cfg.size, top + cfg.size))
    x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    x -= np.asarray(cfg.mean, np.float32)
    x /= np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


_PLAIN = frozenset(chr(c) for c in range(32, 127) if chr(c) != "&") | {"\t", "\n", "\r"}


def clean_text(text: str, lower: bool = False) -> str:
    """open_clip's text cleaning: ftfy, HTML entities unescaped twice, whitespace collapsed.

    Printable ASCII without "&" is left as it is by ftfy and by unescaping (tests check it against
    open_clip), so most queries skip importing ftfy (50 ms of a cold query)."""
    if not _PLAIN.issuperset(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    text = " ".join(text.split())
    return text.lower() if lower else text


@dataclass(frozen=True)
class TextConfig:
    """How a model's text tower wants its input."""

    context_length: int  # tokens per text, special tokens included; longer texts are truncated
    pad_id: int  # the id padding positions hold (the text graph masks them)
    lower: bool = False  # lower-case after cleaning (CLIP's own tokenizer does; BERT-family files do it themselves)
    fixed_length: bool = False  # pad every text to context_length (towers whose graph has a fixed length)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        return cls(int(d["context_length"]), int(d["pad_id"]), bool(d.get("lower", False)),
                   bool(d.get("fixed_length", False)))


class TextTokenizer:
    """Texts -> int64 token ids (n, L) from a ``tokenizer.json``, L = the longest text's length."""

    def __init__(self, tokenizer_file: str | Path, cfg: TextConfig) -> None:
        from tokenizers import Tokenizer

        self.cfg = cfg
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.enable_truncation(max_length=cfg.context_length)
        self._tok.no_padding()

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()

    def __call__(self, texts: Sequence[str], pad_to: int | None = None) -> np.ndarray:
        """``pad_to`` pads every row to that length (open_clip pads to the context length)."""
        cleaned = [clean_text(t, self.cfg.lower) for t in texts]
        encoded = self._tok.encode_batch(cleaned) if cleaned else []
        pad_to = self.cfg.context_length if self.cfg.fixed_length else pad_to
        width = max([len(e.ids) for e in encoded] + [pad_to or 1])
        ids = np.full((len(cleaned), width), self.cfg.pad_id, np.int64)
        for row, e in enumerate(encoded):
            ids[row, : len(e.ids)] = e.ids
        return ids
