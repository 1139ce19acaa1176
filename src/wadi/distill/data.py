"""Which prompts a process sees at a step, and their text conditions.

The position in the data is a pure function of the step, so resuming at a step
continues exactly where the interrupted run was, with any process count that
divides the same global batch.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["batch_indices", "PromptSource"]


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(step: int, rank: int, world: int, batch: int, n: int, seed: int) -> list[int]:
    """Prompt indices of process ``rank`` at ``step``: a seeded permutation per epoch."""
    start = step * batch * world + rank * batch
    out = []
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        out.append(_epoch_permutation(n, seed, epoch)[i])
    return out


class PromptSource:
    """Text conditions for prompt indices: encoded on the fly or read from `wadi embed` files."""

    def __init__(self, config, backbone, device):
        self.backbone, self.device = backbone, device
        if config.embeddings:
            from wadi.data.embeddings import EmbeddingStore

            self.store = EmbeddingStore(config.embeddings)
            self.prompts = None
            self.size = len(self.store)
        else:
            from wadi.data.prompts import load_prompts

            self.store = None
            self.prompts = load_prompts(config.prompts, column=config.prompt_column)
            self.size = len(self.prompts)

    def get(self, indices: list[int]):
        if self.store is not None:
            return self.store.get(indices).to(self.device)
        return self.backbone.encode_prompts([self.prompts[i] for i in indices]).to(self.device)

    def null(self):
        if self.store is not None:
            return self.store.null(1).to(self.device)
        return self.backbone.encode_prompts([""]).to(self.device)

    def text(self, i: int) -> str:
        return self.prompts[i] if self.prompts is not None else f"#{i}"
