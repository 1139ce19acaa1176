"""Independent float64 numpy reference of LoRaD (method.md section 2)."""

import numpy as np


def rotate_reference(weight: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Rotate column pairs (2k, 2k+1) of each row of the flattened weight, in float64."""
    shape = weight.shape
    w = weight.reshape(shape[0], -1).astype(np.float64)
    out = w.copy()
    for k in range(w.shape[1] // 2):
        c, s = np.cos(theta[:, k]), np.sin(theta[:, k])
        out[:, 2 * k] = w[:, 2 * k] * c - w[:, 2 * k + 1] * s
        out[:, 2 * k + 1] = w[:, 2 * k] * s + w[:, 2 * k + 1] * c
    return out.reshape(shape)
