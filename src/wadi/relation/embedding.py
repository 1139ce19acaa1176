"""Textual-inversion embedding files: reading, checking, and adding their tokens to a text encoder.

The file is what diffusers' ``load_textual_inversion`` reads: a safetensors file holding one
tensor named after its token, ``{"<R>": (1, D)}`` (also ``(D,)``), as diffusers' own
textual-inversion script writes it.  :func:`add_token_embeddings` does to a tokenizer and
CLIP text encoder what that loader does to a stock pipeline (``add_tokens``, then
``resize_token_embeddings``, then the new row), so wadi's route and the stock route encode
a prompt with ``<R>`` alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "EMBEDDING_NAME",
    "save_embedding",
    "read_embedding",
    "known_token",
    "check_token_embeddings",
    "add_token_embeddings",
]

EMBEDDING_NAME = "embedding.safetensors"


def save_embedding(path: str | os.PathLike, token: str, vector: Tensor) -> Path:
    """Write ``{token: vector (1, D) float32}`` to ``path`` (atomically)."""
    from safetensors.torch import save_file

    from wadi.files import atomic_file

    tensor = vector.detach().to("cpu", torch.float32).reshape(1, -1).contiguous()
    with atomic_file(path) as tmp:
        save_file({token: tensor}, str(tmp), metadata={"format": "pt"})
    return Path(path)


def read_embedding(path: str | os.PathLike) -> tuple[str, Tensor]:
    """``(token, vector (D,))`` of a one-token embedding file, one line for anything else."""
    from safetensors.torch import load_file

    from wadi.paths import check_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} not found")
    if path.suffix != ".safetensors":
        raise ValueError(
            f"--embedding {path} is not a .safetensors file; wadi reads no pickles "
            "(convert it with safetensors, or re-run wadi invert-relation)"
        )
    check_safetensors(path)
    state = load_file(str(path))
    if len(state) != 1:
        raise ValueError(
            f"{path} holds {len(state)} tensors ({', '.join(sorted(state)[:4])}); an embedding "
            "file holds one, named after its token"
        )
    token, vector = next(iter(state.items()))
    if vector.ndim == 2 and vector.shape[0] == 1:
        vector = vector[0]
    if vector.ndim != 1:
        raise ValueError(
            f"{path}: token {token} has an embedding of shape {tuple(vector.shape)}; only "
            "one-vector embeddings (D,) or (1, D) are supported"
        )
    return token, vector


def known_token(tokenizer, token: str) -> bool:
    """Whether ``token`` is already one token of ``tokenizer`` (added, or a word such as "cat"
    that BPE makes one token): adding it would change what existing prompts mean."""
    if token in tokenizer.get_vocab():
        return True
    return len(tokenizer(token, add_special_tokens=False).input_ids) == 1


def check_token_embeddings(tokenizer, text_encoder, embeddings: dict[str, Tensor]) -> None:
    """One line if a token is already known (:func:`known_token`) or a vector's width is not
    the text encoder's."""
    width = text_encoder.get_input_embeddings().weight.shape[1]
    for token, vector in embeddings.items():
        if known_token(tokenizer, token):
            raise ValueError(
                f"token {token} is already in the tokenizer's vocabulary; choose another "
                "token (or load each embedding once)"
            )
        if tuple(vector.shape) != (width,):
            raise ValueError(
                f"the embedding of {token} has width {vector.shape[-1]}, the text encoder "
                f"{width}; it was learned for another base model"
            )


def add_token_embeddings(tokenizer, text_encoder, embeddings: dict[str, Tensor]) -> list[int]:
    """Add each ``token -> vector (D,)`` as a new token; returns their ids.

    Refused in one line (:func:`check_token_embeddings`): a token the tokenizer already
    has, or a vector of another width.  Every other row of the table stays bitwise as it was.
    """
    check_token_embeddings(tokenizer, text_encoder, embeddings)
    ids = []
    for token in embeddings:
        tokenizer.add_tokens(token)
        ids.append(tokenizer.convert_tokens_to_ids(token))
    try:  # the new rows are set below: no random initialisation (and its log line) needed
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    except TypeError:  # transformers before 4.46
        text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings()
    with torch.no_grad():
        for token_id, vector in zip(ids, embeddings.values()):
            table.weight[token_id] = vector.to(table.weight)
    return ids
