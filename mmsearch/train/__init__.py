"""InfoNCE training (``mmsearch train``), open_clip's ``ClipLoss`` with a learnable temperature.

With the image tower locked (the LiT recipe), its pooled features are computed once and cached, for
the images and any augmented views; the text tower's pooled features too when it is locked, or its
hidden states below the unlocked layers (``TextTail``). Unlocked layers of an EfficientNet-style image
trunk train on its cached feature maps entering them (``ImageTail``). Training then runs only the small
heads and those layers: seconds to minutes on a CPU. Other unlocked towers train end to end on decoded
images.

- ``features``: the tower features that are cached, and ``FeatureCache`` (files and their keys);
- ``tails``: ``TextTail`` and ``ImageTail``, a tower's unlocked top layers run on cached inputs;
- ``fit``: the training loop with early stopping (``Trainer``), ``train_heads``, end-to-end training;
- ``run``: ``train_model``, what ``mmsearch train`` calls;
- ``bank``: ``build_query_bank``, a trained model's query bank for the hubness correction.

Importing this package imports no torch; its functions do.
"""

from .bank import build_query_bank
from .features import (
                       VIEWS,
                       ZOOM,
                       FeatureCache,
                       cached_features,
                       image_tower_features,
                       image_trunk_maps,
                       text_hidden_states,
                       text_tower_features,
                       train_views,
)
from .features import _text_layers as _text_layers  # noqa: F401 - private, imported by the tests and benchmarks
from .fit import Trainer, train_heads, validation_score
from .run import _lock_towers as _lock_towers  # noqa: F401
from .run import train_model, usable_images
from .tails import ImageTail, TextTail, TowerTail
from .tails import _image_tail_shape as _image_tail_shape  # noqa: F401

__all__ = [
    "VIEWS", "ZOOM", "FeatureCache", "ImageTail", "TextTail", "TowerTail", "Trainer", "build_query_bank",
    "cached_features", "image_tower_features", "image_trunk_maps", "text_hidden_states", "text_tower_features",
    "train_heads", "train_model", "train_views", "usable_images", "validation_score",
]
