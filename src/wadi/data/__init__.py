"""Prompt data: prompt files (txt / jsonl / csv / parquet) and precomputed text embeddings.

Names are imported lazily so ``wadi --help`` does not load torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_prompts": "prompts",
    "clean_prompts": "prompts",
    "EmbeddingStore": "embeddings",
    "write_embeddings": "embeddings",
    "embed_prompts": "embeddings",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wadi.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
