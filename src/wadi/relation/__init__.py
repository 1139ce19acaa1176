"""Relation inversion (ReVersion): learn a relation token on the teacher, use it with the student.

``wadi invert-relation`` (:mod:`wadi.relation.invert`) learns one new row of the text
encoder's token-embedding table; :mod:`wadi.relation.losses` holds ReVersion's terms as pure
functions; :mod:`wadi.relation.embedding` reads and writes the embedding file (diffusers'
``load_textual_inversion`` format) and adds it to a tokenizer and text encoder.
"""

import importlib

# name -> submodule; imported on first use, so ``wadi --help`` stays torch-free
_EXPORTS = {
    "add_token_embeddings": "embedding",
    "read_embedding": "embedding",
    "save_embedding": "embedding",
    "denoising_target": "losses",
    "focal_weights": "losses",
    "sample_focal_timesteps": "losses",
    "steer_loss": "losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
