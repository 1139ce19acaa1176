"""ReVersion's three training terms as pure functions (Huang et al., 2023).

- :func:`steer_loss`: relation-steering contrastive learning.  A multi-instance InfoNCE over
  L2-normalised token embeddings: the relation token ``<R>`` is pulled towards the
  preposition tokens sampled this step (positives) and pushed from the caption's other
  words (negatives: the entities, e.g. "cat" and "wall" in "cat <R> wall")::

      L = logsumexp_{j in P u N}(cos(r, e_j) / tau) - logsumexp_{j in P}(cos(r, e_j) / tau)

  Only ``r`` carries gradient; the paper's temperature is 0.07 and its weight 0.01.
- :func:`focal_weights` / :func:`sample_focal_timesteps`: relation-focal importance sampling,
  ``f(t) = (1 - alpha cos(pi t / T)) / T`` on ``t = 0..T-1`` (normalised), alpha 0.5 in the
  paper: large, high-noise ``t`` (where layout and relations form) are drawn more often.
- :func:`denoising_target`: what the base's denoiser regresses onto, in its own
  parametrization (eps, v, x0 or flow velocity), for the plain denoising loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PREPOSITIONS",
    "STOP_WORDS",
    "steer_loss",
    "focal_weights",
    "sample_focal_timesteps",
    "denoising_target",
]

#: ReVersion's basis of relation words (the positives), as listed in the paper's repository
PREPOSITIONS = (
    "aboard", "about", "above", "across", "after", "against", "along", "alongside", "amid",
    "amidst", "among", "amongst", "anti", "around", "astride", "at", "atop", "before",
    "behind", "below", "beneath", "beside", "between", "beyond", "by", "down", "following",
    "from", "in", "including", "inside", "into", "near", "of", "off", "on", "onto",
    "opposite", "out", "outside", "over", "past", "regarding", "round", "through",
    "throughout", "to", "toward", "towards", "under", "underneath", "up", "upon", "versus",
    "with", "within",
)  # fmt: skip

#: caption words that are neither entities nor the relation (never negatives); the
#: prepositions are excluded from the negatives as well
STOP_WORDS = (
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "your", "yours",
    "yourself", "yourselves", "he", "him", "his", "himself", "she", "her", "hers", "herself",
    "it", "its", "itself", "they", "them", "their", "theirs", "themselves", "what", "which",
    "who", "whom", "this", "that", "these", "those", "am", "is", "are", "was", "were", "be",
    "been", "being", "have", "has", "had", "having", "do", "does", "did", "doing", "a", "an",
    "the", "and", "but", "if", "or", "because", "as", "until", "while", "for", "during",
    "again", "further", "then", "once", "here", "there", "when", "where", "why", "how", "all",
    "any", "both", "each", "few", "more", "most", "other", "some", "such", "no", "nor", "not",
    "only", "own", "same", "so", "than", "too", "very", "s", "t", "can", "will", "just",
    "don", "should", "now",
)  # fmt: skip


def steer_loss(
    relation: Tensor, positives: Tensor, negatives: Tensor, temperature: float
) -> Tensor:
    """ReVersion's relation-steering InfoNCE (see the module docstring), a scalar.

    ``relation`` ``(D,)`` is the ``<R>`` embedding (the only input with gradient);
    ``positives`` ``(P, D)`` and ``negatives`` ``(N, D)`` rows of the token-embedding
    table (detached here).  With no negatives the loss is 0 (nothing to push from).
    Computed in at least float32.
    """
    if relation.ndim != 1 or positives.ndim != 2 or negatives.ndim != 2:
        raise ValueError("relation must be (D,), positives (P, D) and negatives (N, D)")
    if positives.shape[0] == 0:
        raise ValueError("steer_loss needs at least one positive embedding")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = torch.promote_types(relation.dtype, torch.float32)
    r = F.normalize(relation.to(dtype), dim=0)
    block = torch.cat([positives, negatives]).detach().to(device=r.device, dtype=dtype)
    logits = F.normalize(block, dim=1) @ r / temperature
    return torch.logsumexp(logits, 0) - torch.logsumexp(logits[: positives.shape[0]], 0)


def focal_weights(num_train_timesteps: int, alpha: float) -> Tensor:
    """Probabilities of ``t = 0..T-1`` under ``f(t) = (1 - alpha cos(pi t / T)) / T``, float64.

    ``alpha`` in ``[0, 1)``: 0 is uniform; the paper's 0.5 makes ``t = T-1`` about three
    times as likely as ``t = 0``.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"--focal-alpha must be in [0, 1), got {alpha}")
    T = int(num_train_timesteps)
    t = torch.arange(T, dtype=torch.float64)
    f = (1.0 - alpha * torch.cos(math.pi * t / T)) / T
    return f / f.sum()


def sample_focal_timesteps(
    batch: int, weights: Tensor, generator: torch.Generator, device=None
) -> Tensor:
    """``batch`` integer timesteps drawn with replacement from ``weights`` (long, on ``device``)."""
    draws = torch.multinomial(
        weights.to(torch.float64), batch, replacement=True, generator=generator
    )
    return draws.to(device=device or "cpu")


def denoising_target(param, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """The regression target of a denoiser with parametrization ``param`` at ``x_t`` built from
    ``x0`` and ``eps`` (float32 or wider): eps, ``v = alpha eps - sigma x0``, ``x0``, or the
    flow velocity ``eps - x0``."""
    kind = param.prediction_type
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0, eps = x0.to(dtype), eps.to(dtype)
    if kind == "epsilon":
        return eps
    if kind == "sample":
        return x0
    if kind == "flow":
        return eps - x0
    if kind == "v_prediction":
        alpha, sigma = param.alpha_sigma(param._index(t))
        shape = (-1,) + (1,) * (x0.ndim - 1)
        a = alpha.to(device=x0.device, dtype=dtype).reshape(shape)
        s = sigma.to(device=x0.device, dtype=dtype).reshape(shape)
        return a * eps - s * x0
    raise ValueError(f"unsupported prediction type {kind!r}")
