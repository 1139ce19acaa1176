"""Tiny, offline stand-ins for real checkpoints: used by the tests, the toy demo and benchmarks.

Everything here is built from configs and word lists, never downloaded.
"""

from __future__ import annotations

import json
import string
from pathlib import Path


def build_clip_tokenizer(
    directory: str | Path, words: list[str] | tuple[str, ...] = (), max_length: int = 77
):
    """Write and load a small ``CLIPTokenizer`` (vocab.json + merges.txt).

    Every printable character is a token (so any prompt tokenizes) and every
    word of ``words`` becomes a single token through BPE merges.  The result
    loads with ``CLIPTokenizer.from_pretrained(directory)`` like SD's.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[str] = []
    for word in dict.fromkeys(w.lower() for w in words):
        if len(word) < 2 or not word.isascii():
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        merged = symbols[0]
        for sym in symbols[1:]:
            pair = f"{merged} {sym}"
            if pair not in merges:
                merges.append(pair)
            merged = merged + sym
            add(merged)
    add("<|startoftext|>")
    add("<|endoftext|>")
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else "")
    )
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)
