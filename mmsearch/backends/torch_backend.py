"""The torch backend: any open_clip model (registry name + pretrained tag, ``hf-hub:`` id, local
checkpoint folder) or a built-in model, run by open_clip. Used for training, for export, and as the
fallback ``--backend torch``; its image transform and tokenizer are the references the ONNX path's
numpy preprocessing (mmsearch.preprocess) is checked against."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from urllib.parse import urlparse

import numpy as np

from .. import models
from ..config import ModelRef
from ..errors import ModelLoadError
from ..models import quiet_transformers


def _resolves(url: str) -> bool:
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


def _check_reference(ref: ModelRef, open_clip) -> str:
    """The name open_clip loads ``ref`` by; ModelLoadError for folders and names that cannot work."""
    name = ref.name
    if not os.path.exists(name) and (os.sep in name or name.startswith(".")) and not name.startswith("hf-hub:"):
        raise ModelLoadError(f"model folder not found: {name}: pass an existing checkpoint folder or a model name")
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "open_clip_config.json")):
            raise ModelLoadError(
                f"model folder {name} has no open_clip_config.json: pass an open_clip checkpoint "
                "folder (open_clip_config.json + weights), an exported model folder, or a model name"
            )
        return "local-dir:" + os.path.abspath(name)
    if ref.pretrained is None and not name.startswith("hf-hub:") and name in open_clip.list_models():
        raise ModelLoadError(
            f"model {name!r} needs pretrained weights: pass pretrained=TAG (one of "
            f"{', '.join(t for m, t in open_clip.list_pretrained() if m == name)[:200]})"
        )
    return name


def load_open_clip(ref: ModelRef, cache_dir: str | None):
    """(model, preprocess, tokenizer) for any open_clip reference; errors become ModelLoadError."""
    import open_clip


    name = _check_reference(ref, open_clip)
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


def load_model(ref: ModelRef, cache_dir: str | None = None):
    """(model, preprocess, tokenizer) of a built-in model or any open_clip reference, in eval mode."""

    if ref.name in models.BUILTINS and ref.pretrained is None:
        return models.build(name=ref.name), models.preprocess(ref.name), models.tokenizer()
    model, preprocess, tokenizer = load_open_clip(ref, cache_dir)
    return model.eval(), preprocess, tokenizer


class TorchBackend:
    """Embeds with an open_clip model in torch (CUDA with bf16/fp16 autocast when present)."""

    name = "torch"
    precision = "fp32"

    def __init__(self, ref: ModelRef, device: str | None = None, cache_dir: str | None = None) -> None:
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model, self._preprocess, self._tokenizer = load_model(ref, cache_dir)
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
            self.dim = int(self.embed_tokens(self.tokenize(["probe"])).shape[1])

    def preprocess(self, image) -> np.ndarray:
        """Decoded RGB PIL image -> the model's input (C, H, W) by open_clip's own transform."""
        return self._preprocess(image).numpy()

    def vocab(self) -> dict[str, int] | None:
        """The text tokenizer's vocabulary (HF tokenizers of HF text towers), else None."""
        get = getattr(getattr(self._tokenizer, "tokenizer", None), "get_vocab", None)
        return get() if get is not None else None

    def tokenize(self, texts):
        """Texts -> token id tensor (n, L), trailing padding columns trimmed for HF text towers."""
        tokens = self._tokenizer(list(texts))
        pad_id = self.model.text.config.pad_token_id if self._masks_padding else None
        if pad_id is not None and tokens.shape[0] > 0:
            # HF text towers mask padding themselves, so the shared all-pad tail is wasted work;
            # other towers (CLIP, SigLIP) see every position, so their tokens are left as they are
            used = (tokens != pad_id).any(dim=0).nonzero()
            tokens = tokens[:, : int(used.max()) + 1] if used.numel() else tokens
        return tokens

    def _autocast(self):
        """bf16 (else fp16) autocast on CUDA; full precision on the CPU."""
        import torch

        if self.device.type != "cuda":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def embed_pixels(self, pixels) -> np.ndarray:
        """(n, C, H, W) pixels (numpy or a tensor) -> float32 (n, d), not yet normalised."""
        import torch

        with torch.inference_mode(), self._autocast():
            x = torch.as_tensor(pixels).to(self.device, non_blocking=True)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model.encode_image(x)
        return out.float().cpu().numpy()

    def embed_tokens(self, tokens) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_text(torch.as_tensor(tokens).to(self.device))
        return out.float().cpu().numpy()
