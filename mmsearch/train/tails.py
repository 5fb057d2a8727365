"""Cached-tower "tails": the last layers of a tower run on the cached inputs of those layers.

With the rest of a tower locked, its unlocked top layers (``TextTail``: an HF text tower's last
layers and pooler; ``ImageTail``: an EfficientNet-style trunk's last blocks, head convolution and
pooling) train on the hidden states / feature maps cached below them (``features``), without
re-running the locked layers every step.
"""

from __future__ import annotations

import copy

import numpy as np

from ..errors import BadArgumentError
from .features import (
    _flat_blocks,
    _maps,
    _pair,
    _text_layers,
    text_hidden_states,
    text_tower_features,
)


class TowerTail:
    """What the tails have in common: ``modules``, the layers that train (in order), on ``device``;
    their parameters, optimiser groups, train/eval mode and state, as the training loop needs them."""

    modules: list
    device: object

    def parameters(self) -> list:
        return [p for m in self.modules for p in m.parameters()]

    def param_groups(self, weight_decay: float, scale: float) -> list[dict]:
        """Optimiser groups of the parameters: matrices with ``weight_decay``, biases and norms
        without; each group's learning rate is the schedule's times ``scale``."""
        params = self.parameters()
        return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "scale": scale},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "scale": scale}]

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    def state_dict(self) -> list:
        return [copy.deepcopy(m.state_dict()) for m in self.modules]

    def load_state_dict(self, states: list) -> None:
        for m, state in zip(self.modules, states):
            m.load_state_dict(state)


class TextTail(TowerTail):
    """The last ``n`` layers of an HF text tower (and its pooler) run on cached hidden states, so
    those layers can train without re-running the locked ones below them. Called with caption
    indices, returns their pooled features (before the projection)."""

    def __init__(self, model, hidden: np.ndarray, mask: np.ndarray, n: int):
        self.text = model.text
        self.modules = _text_layers(self.text.transformer)[-n:]
        self.hidden, self.mask = hidden, mask
        self.device = next(self.text.parameters()).device

    def __len__(self) -> int:
        return len(self.mask)

    def __call__(self, idx):
        import types

        import torch

        idx = np.asarray(idx)
        m = torch.from_numpy(np.asarray(self.mask[idx], dtype=np.int64))
        t = max(1, int(m.sum(1).max()))
        m = m[:, :t].to(self.device)
        h = torch.from_numpy(np.asarray(self.hidden[idx, :t], dtype=np.float32)).to(self.device)
        ext = self._attention_mask(h, m)
        for layer in self.modules:
            h = layer(h, attention_mask=ext)
            h = h[0] if isinstance(h, tuple) else h
        return self.text.pooler(types.SimpleNamespace(last_hidden_state=h), m)

    def _attention_mask(self, h, m):
        try:
            from transformers.masking_utils import create_bidirectional_mask

            return create_bidirectional_mask(config=self.text.transformer.config, inputs_embeds=h, attention_mask=m)
        except ImportError:  # older transformers
            return self.text.transformer.get_extended_attention_mask(m, m.shape)

    def features(self, proj=None, batch: int = 512) -> np.ndarray:
        """Pooled features of all captions (no grad), or their projections by ``proj``."""
        import torch

        order = np.argsort(self.mask.sum(1), kind="stable")
        out = None
        with torch.no_grad():
            for s in range(0, len(order), batch):
                e = self(order[s:s + batch])
                e = (proj(e) if proj is not None else e).float()
                if out is None:
                    out = torch.zeros(len(order), e.shape[1])
                out[torch.from_numpy(order[s:s + batch])] = e.cpu()
        return out.numpy()

    def embed(self, proj, batch: int = 512) -> np.ndarray:
        """Normalised projected embeddings of all captions (no grad), for validation."""
        import torch

        return torch.nn.functional.normalize(torch.from_numpy(self.features(proj, batch)), dim=-1).numpy()


class ImageTail(TowerTail):
    """The last ``n`` layer groups of an EfficientNet-style timm trunk (as open_clip's
    ``lock_image_tower(unlocked_groups=n)`` counts them: the last n blocks, the last one with the head
    convolution) and its pooling, run on cached feature maps entering them (``image_trunk_maps`` at
    ``ImageTail.first_block(model, n)``), so those layers can train without re-running the locked ones
    below. Batch norms keep their ImageNet statistics. ``maps`` is (n_images, C, H, W) or
    (views, n_images, C, H, W); called with view and image indices, returns pooled features (before
    the projection)."""

    def __init__(self, model, maps: np.ndarray, n: int):
        trunk = model.visual.trunk
        self.trunk = trunk
        self.modules = _flat_blocks(trunk)[self.first_block(model, n):] + [trunk.conv_head, trunk.bn2]
        self.maps = maps if maps.ndim == 5 else maps[None]
        self.device = next(trunk.parameters()).device

    @staticmethod
    def first_block(model, n: int) -> int:
        """Index (over all stages) of the first block the last ``n`` layer groups train."""
        blocks = len(_flat_blocks(model.visual.trunk))
        if not 0 < n <= blocks:
            raise BadArgumentError(f"cannot unlock {n} image layer groups: the trunk has {blocks}")
        return blocks - n

    @property
    def views(self) -> int:
        return self.maps.shape[0]

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.eval()  # batch-norm statistics stay those of ImageNet; there is no dropout in these layers

    def __len__(self) -> int:
        return self.maps.shape[1]

    def __call__(self, view, idx):
        import torch

        x = torch.from_numpy(np.asarray(self.maps[view, idx], dtype=np.float32)).to(self.device)
        for m in self.modules:
            x = m(x)
        return self.trunk.global_pool(x)

    def embed(self, head, batch: int = 256, view: int = 0) -> np.ndarray:
        """Normalised projected embeddings of all images in one view (no grad), for validation."""
        import torch

        with torch.no_grad():
            out = [head(self(view, np.arange(s, min(s + batch, len(self))))).float().cpu()
                   for s in range(0, len(self), batch)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).numpy()


# ---- can a tail drive this model? ---------------------------------------------------------------
def _tail_works(model, tokenizer, n: int) -> bool:
    """Whether TextTail reproduces this text tower's own output (so its last ``n`` layers can train
    on cached hidden states); checked on a few captions, to the precision of float16 storage."""
    import torch

    texts = ["a dog runs on the grass .", "two children play football in a park near the river", "a man"]
    try:
        with torch.inference_mode():
            layers = _text_layers(model.text.transformer)
            if not 0 < n <= len(layers):
                return False
            hidden, mask = text_hidden_states(model, tokenizer, texts, len(layers) - n)
            got = TextTail(model, hidden, mask, n)(np.arange(len(texts))).float().cpu().numpy()
        want = text_tower_features(model, tokenizer, texts)
        return bool(np.abs(got - want).max() <= 2e-2 * max(1.0, float(np.abs(want).max())))
    except Exception:  # any architecture TextTail cannot drive: train end to end instead
        return False


def _image_tail_shape(model, n: int) -> tuple[int, ...] | None:
    """The shape (C, H, W) of the maps ``ImageTail`` needs to train this image trunk's last ``n``
    layer groups, or None when it cannot: not an EfficientNet-style trunk, not the same parameters
    as open_clip unlocks (call after ``_lock_towers``), or not the trunk's own output on a test input."""
    import torch

    try:
        trunk = model.visual.trunk
        tail = ImageTail(model, np.zeros((1, 1, 1, 1), np.float16), n)
        if {id(p) for p in tail.parameters()} != {id(p) for p in trunk.parameters() if p.requires_grad}:
            return None
        device = next(trunk.parameters()).device
        x = torch.randn(2, 3, *_pair(model.visual.image_size), generator=torch.Generator().manual_seed(0))
        start = ImageTail.first_block(model, n)
        with torch.inference_mode():
            want = trunk.eval()(x.to(device)).float().cpu().numpy()
            maps = _maps(trunk, x.to(device), [start])[start].half().cpu().numpy()
            got = ImageTail(model, maps, n)(0, np.arange(2)).float().cpu().numpy()
        if np.abs(got - want).max() > 2e-2 * max(1.0, float(np.abs(want).max())):
            return None
        return tuple(maps.shape[1:])
    except Exception:  # any trunk ImageTail cannot drive: train end to end instead
        return None
