"""Relation inversion (ReVersion): learn a relation token on the teacher, use it with the student.

``wadi invert-relation`` (:mod:`wadi.relation.invert`) learns one new row of the text
encoder's token-embedding table; :mod:`wadi.relation.losses` holds ReVersion's terms as pure
functions; :mod:`wadi.relation.embedding` reads and writes the embedding file (diffusers'
``load_textual_inversion`` format) and adds it to a tokenizer and text encoder.
"""

from .embedding import add_token_embeddings, read_embedding, save_embedding
from .losses import denoising_target, focal_weights, sample_focal_timesteps, steer_loss

__all__ = [
    "add_token_embeddings",
    "read_embedding",
    "save_embedding",
    "denoising_target",
    "focal_weights",
    "sample_focal_timesteps",
    "steer_loss",
]
