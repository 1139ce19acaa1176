"""scikit-learn's bundled 8x8 digits at 16x16 in [-1, 1], with a fixed held-out split.

Bundled with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

IMAGE_SIZE = 16
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def upsample_digits(images8: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) values in [0, 16] -> (N, 1, 16, 16) float32 in [-1, 1], bilinear."""
    x = torch.as_tensor(np.asarray(images8, dtype=np.float32) / 16.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(
        x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    return (x.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


@lru_cache(maxsize=1)
def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    return train_test_split(
        digits.images,
        digits.target,
        test_size=TEST_FRACTION,
        stratify=digits.target,
        random_state=SPLIT_SEED,
    )


def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_x, train_y, test_x, test_y): the fixed stratified 80/20 split (seed 0).

    Images are (N, 1, 16, 16) float32 in [-1, 1]; labels int64 digits 0-9.
    """
    tr_img, te_img, tr_y, te_y = _split()
    return (
        upsample_digits(tr_img),
        torch.as_tensor(tr_y, dtype=torch.long),
        upsample_digits(te_img),
        torch.as_tensor(te_y, dtype=torch.long),
    )
