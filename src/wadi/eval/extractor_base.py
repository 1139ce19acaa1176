"""What every feature extractor is: ``features(images) -> (B, D)`` and ``describe()``.

A leaf module, so an extractor in its own file (``vgg.py``) and the registry in
``extractors.py`` both import it without importing each other.
"""

from __future__ import annotations

import numpy as np


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"extractors take uint8 RGB images (B, H, W, 3), got {images.dtype} {images.shape}"
        )
    return images


class FeatureExtractor:
    """Base class: ``features(images) -> (B, D)`` and ``describe() -> dict``."""

    name: str = "base"
    #: size the protocol resizes images to before this extractor (None: keep as is)
    default_resize: int | None = 256

    def features(self, images) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError
