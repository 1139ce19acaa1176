"""Text conditioning of a batch, as every backbone's denoiser needs it.

One dataclass holds what any text-to-image denoiser takes besides ``x_t`` and ``t``:

- ``embeds`` ``(B, L, D)``: the per-token text embeddings (CLIP, T5, or both joined);
- ``mask`` ``(B, L)`` or ``None``: 1 for real tokens (T5 models attend to them only;
  CLIP-based U-Nets attend to the padding too and have none);
- ``pooled`` ``(B, P)`` or ``None``: pooled text embeddings (SDXL, SD3, FLUX);
- ``extras``: named per-sample tensors ``(B, ...)`` a backbone needs (SDXL's
  ``time_ids``, FLUX's text ids are per batch and go in the backbone instead).

Every batch operation (indexing, ``cat``, ``where`` for null-prompt dropout and CFG,
``expand`` of the null prompt, ``to``) treats all fields alike, so a new backbone adds
fields without touching the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["TextCondition"]


def _rows(x: Tensor | None, idx):
    return None if x is None else x[idx]


@dataclass
class TextCondition:
    """Text conditioning for a batch (see the module docstring).

    Indexing always keeps the batch dimension (an int ``i`` selects ``[i:i+1]``).
    """

    embeds: Tensor
    mask: Tensor | None = None
    pooled: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeds.ndim != 3:
            raise ValueError(
                f"TextCondition.embeds must be (B, L, D), got {tuple(self.embeds.shape)}"
            )
        if self.mask is not None and tuple(self.mask.shape) != tuple(self.embeds.shape[:2]):
            raise ValueError(
                f"TextCondition.mask must be (B, L) = {tuple(self.embeds.shape[:2])}, "
                f"got {tuple(self.mask.shape)}"
            )
        batch = self.embeds.shape[0]
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != batch):
            raise ValueError(
                f"TextCondition.pooled must be (B, P) with B = {batch}, "
                f"got {tuple(self.pooled.shape)}"
            )
        for name, value in self.extras.items():
            if value.ndim < 1 or value.shape[0] != batch:
                raise ValueError(
                    f"TextCondition.extras[{name!r}] must have batch {batch} first, "
                    f"got {tuple(value.shape)}"
                )

    # -- structure -----------------------------------------------------------------------------
    def _same_fields(self, other: TextCondition, what: str) -> None:
        if (self.mask is None) != (other.mask is None):
            raise ValueError(f"cannot {what} TextConditions with and without attention masks")
        if (self.pooled is None) != (other.pooled is None):
            raise ValueError(f"cannot {what} TextConditions with and without pooled embeddings")
        if set(self.extras) != set(other.extras):
            raise ValueError(
                f"cannot {what} TextConditions with extras {sorted(self.extras)} and "
                f"{sorted(other.extras)}"
            )

    def map(self, fn) -> TextCondition:
        """Apply ``fn(name, tensor)`` to every field (``name`` is embeds/mask/pooled/extra key)."""
        return TextCondition(
            fn("embeds", self.embeds),
            None if self.mask is None else fn("mask", self.mask),
            None if self.pooled is None else fn("pooled", self.pooled),
            {k: fn(k, v) for k, v in self.extras.items()},
        )

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, idx) -> TextCondition:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        if isinstance(idx, (list, tuple)):
            idx = torch.as_tensor(idx, dtype=torch.long)
        if isinstance(idx, Tensor):
            idx = idx.to(self.embeds.device)
        return self.map(lambda _, x: x[idx])

    @property
    def device(self) -> torch.device:
        return self.embeds.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def to(self, device=None, dtype=None) -> TextCondition:
        """Move to ``device``; ``dtype`` applies to floating fields only (the mask stays integer)."""

        def move(_, x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

        return self.map(move)

    def expand(self, batch: int) -> TextCondition:
        """A batch-1 condition repeated ``batch`` times (e.g. the null prompt)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a TextCondition of batch {len(self)} to {batch}")
        return self.map(lambda _, x: x.expand(batch, *x.shape[1:]))

    @staticmethod
    def cat(parts: list[TextCondition]) -> TextCondition:
        """Concatenate along the batch dimension."""
        if not parts:
            raise ValueError("TextCondition.cat needs at least one part")
        for p in parts[1:]:
            parts[0]._same_fields(p, "concatenate")
        first = parts[0]
        return TextCondition(
            torch.cat([p.embeds for p in parts]),
            None if first.mask is None else torch.cat([p.mask for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),
            {k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
        )

    def where(self, keep: Tensor, other: TextCondition) -> TextCondition:
        """Per row: ``self`` where ``keep`` is true, else ``other`` (batch B or 1, e.g. the null prompt)."""
        self._same_fields(other, "mix")
        other = other.expand(len(self))
        keep = keep.to(device=self.embeds.device, dtype=torch.bool).reshape(-1)
        if keep.shape[0] != len(self):
            raise ValueError(f"keep has {keep.shape[0]} entries for a batch of {len(self)}")

        def pick(a: Tensor, b: Tensor) -> Tensor:
            k = keep.reshape((-1,) + (1,) * (a.ndim - 1))
            return torch.where(k, a, b.to(a))

        return TextCondition(
            pick(self.embeds, other.embeds),
            None if self.mask is None else pick(self.mask, other.mask),
            None if self.pooled is None else pick(self.pooled, other.pooled),
            {k: pick(v, other.extras[k]) for k, v in self.extras.items()},
        )
