"""Relation inversion (ReVersion): learn a relation token on the teacher, use it with the student.

``wadi invert-relation`` (:mod:`wadi.relation.invert`) learns one new row of the text
encoder's token-embedding table; :mod:`wadi.relation.losses` holds ReVersion's terms as pure
functions; :mod:`wadi.relation.embedding` reads and writes the embedding file (diffusers'
``load_textual_inversion`` format) and adds it to a tokenizer and text encoder.
"""

from wadi._lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
