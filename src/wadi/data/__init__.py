"""Prompt data: prompt files (txt / jsonl / csv / parquet) and precomputed text embeddings.

Names are imported lazily so ``wadi --help`` does not load torch.
"""

from __future__ import annotations

from wadi._lazy import lazy_exports

_EXPORTS = {
    "load_prompts": "prompts",
    "clean_prompts": "prompts",
    "EmbeddingStore": "embeddings",
    "write_embeddings": "embeddings",
    "embed_prompts": "embeddings",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
