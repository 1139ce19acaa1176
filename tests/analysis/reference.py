"""Independent float64 numpy references for the weight analysis (method.md section 5)."""

import numpy as np


def rows(w: np.ndarray) -> np.ndarray:
    return np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)


def norm_change_ref(wt: np.ndarray, ws: np.ndarray) -> np.ndarray:
    nt = np.linalg.norm(rows(wt), axis=1)
    ns = np.linalg.norm(rows(ws), axis=1)
    return np.abs(ns - nt) / nt


def direction_change_ref(wt: np.ndarray, ws: np.ndarray) -> np.ndarray:
    t, s = rows(wt), rows(ws)
    cos = (t * s).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(s, axis=1))
    return 1.0 - cos


def cumulative_energy_ref(wt: np.ndarray, ws: np.ndarray) -> np.ndarray:
    sigma = np.linalg.svd(rows(ws) - rows(wt), compute_uv=False)
    return np.cumsum(sigma**2) / np.sum(sigma**2)


def rotate_rows_ref(w: np.ndarray, phi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate each row by angle ``phi[i]`` in the plane of the row and a random orthogonal vector."""
    r = rows(w)
    out = np.empty_like(r)
    for i, row in enumerate(r):
        u = row / np.linalg.norm(row)
        v = rng.standard_normal(row.shape)
        v -= (v @ u) * u
        v /= np.linalg.norm(v)
        out[i] = np.linalg.norm(row) * (np.cos(phi[i]) * u + np.sin(phi[i]) * v)
    return out.reshape(w.shape)
