"""Precomputed text embeddings: write them once (``wadi embed``), read them memory-mapped.

Layout of an embedding folder::

    index.json                 counts, shapes, dtype, teacher, shard list
    shard-00000.safetensors    "embeds" (n, L, D) and, for T5 teachers, "mask" (n, L)
    null.safetensors           the null prompt "" (1, L, D) [+ mask], for CFG and dropout
    prompts.jsonl              the prompts, one JSON string a line, in index order

The embeddings are exactly what ``Backbone.encode_prompts`` returns (same
tokenization and masking as training without precomputation and inference),
so training can run without the text encoder in memory.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from wadi.backbones.base import TextCondition
from wadi.files import atomic_directory
from wadi.paths import writing_output

__all__ = ["EmbeddingStore", "write_embeddings", "embed_prompts", "INDEX_NAME", "FORMAT"]

INDEX_NAME = "index.json"
NULL_NAME = "null.safetensors"
PROMPTS_NAME = "prompts.jsonl"
FORMAT = "wadi-text-embeddings"
VERSION = 1


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _tensors(cond: TextCondition) -> dict[str, Tensor]:
    out = {"embeds": cond.embeds.detach().to("cpu").contiguous()}
    if cond.mask is not None:
        out["mask"] = cond.mask.detach().to("cpu").contiguous()
    return out


def _check_out(out: Path, overwrite: bool, *inputs) -> None:
    """Refuse an output that is a file, non-empty (without overwrite), unwritable or an input."""
    from wadi.paths import check_output_folder, check_output_separate

    check_output_folder(out, overwrite=overwrite)
    check_output_separate(out, *inputs)


def write_embeddings(
    backbone,
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    shard_size: int = 4096,
    batch_size: int = 64,
    overwrite: bool = False,
    progress: bool = True,
    source: str | None = None,
) -> Path:
    """Encode ``prompts`` with ``backbone.encode_prompts`` into an embedding folder ``out``.

    Written to a temporary folder and renamed at the end: an interrupted run
    leaves nothing (and an existing ``out`` untouched).
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if shard_size < 1 or batch_size < 1:
        raise ValueError(
            f"shard size and batch size must be positive, got {shard_size}, {batch_size}"
        )
    if not prompts:
        raise ValueError("no prompts to embed")
    out = Path(out)
    _check_out(out, overwrite, backbone.path)
    prompts = list(prompts)
    null = backbone.encode_prompts([""])
    shards: list[dict] = []
    with writing_output(out), atomic_directory(out) as tmp:
        save_file(_tensors(null), str(tmp / NULL_NAME))
        with open(tmp / PROMPTS_NAME, "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        # closed on errors too, so an error line starts on a line of its own
        with tqdm(total=len(prompts), desc="embed", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(prompts), shard_size):
                chunk = prompts[start : start + shard_size]
                parts = []
                for b in range(0, len(chunk), batch_size):
                    parts.append(backbone.encode_prompts(chunk[b : b + batch_size]).to("cpu"))
                    bar.update(len(chunk[b : b + batch_size]))
                name = _shard_name(len(shards))
                save_file(_tensors(TextCondition.cat(parts)), str(tmp / name))
                shards.append({"file": name, "start": start, "count": len(chunk)})
        index = {
            "format": FORMAT,
            "version": VERSION,
            "count": len(prompts),
            "shard_size": shard_size,
            "shards": shards,
            "embeds_shape": list(null.embeds.shape[1:]),
            "embeds_dtype": str(null.embeds.dtype).removeprefix("torch."),
            "has_mask": null.mask is not None,
            "teacher": str(Path(backbone.path).resolve()) if backbone.path else None,
            "kind": backbone.kind,
            "prompts_file": source,
            "null": NULL_NAME,
            "prompts": PROMPTS_NAME,
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


def embed_prompts(
    teacher: str | os.PathLike,
    prompts_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    column: str | None = None,
    shard_size: int = 4096,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """``wadi embed``: read ``prompts_file``, load the teacher's text encoder, write ``out``."""
    from wadi.backbones.registry import load_backbone

    from .prompts import load_prompts

    out = Path(out)
    _check_out(out, overwrite, teacher, prompts_file)
    # de-duplicated, as distill reads them: the store's row i is distill's prompt i
    prompts = load_prompts(prompts_file, column=column, column_flag="--column")
    backbone = load_backbone(teacher, dtype=dtype, device=device)
    return write_embeddings(
        backbone,
        prompts,
        out,
        shard_size=shard_size,
        batch_size=batch_size,
        overwrite=overwrite,
        progress=progress,
        source=str(Path(prompts_file).resolve()),
    )


class EmbeddingStore:
    """Read an embedding folder; tensors are memory-mapped through ``safetensors.safe_open``.

    ``store.get(indices)`` returns the rows in the order asked for;
    ``store.null(batch)`` the null prompt repeated.  Picklable (file handles
    are reopened lazily), so it can live in a DataLoader worker.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index_path = self.directory / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{index_path} not found: is {self.directory} a folder written by `wadi embed`?"
            )
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{index_path} is not valid JSON ({err})") from None
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path} is not a wadi embedding index")
        if self.index.get("version", 0) > VERSION:
            raise ValueError(
                f"{index_path} has format version {self.index['version']}; upgrade wadi to read it"
            )
        self._starts = [s["start"] for s in self.index["shards"]]
        missing = [
            s["file"] for s in self.index["shards"] if not (self.directory / s["file"]).is_file()
        ]
        if missing or not (self.directory / self.index["null"]).is_file():
            raise FileNotFoundError(
                f"embedding folder {self.directory} is incomplete: "
                f"{', '.join(missing or [self.index['null']])} missing"
            )
        self._handles: dict[str, object] = {}
        self._prompts: list[str] | None = None
        for name in [self.index["null"], *(s["file"] for s in self.index["shards"])]:
            self._open(name)  # a truncated or garbled shard fails here, by name

    def __len__(self) -> int:
        return int(self.index["count"])

    @property
    def has_mask(self) -> bool:
        return bool(self.index["has_mask"])

    @property
    def teacher(self) -> str | None:
        return self.index.get("teacher")

    @property
    def prompts(self) -> list[str]:
        """The prompts, in index order."""
        if self._prompts is None:
            path = self.directory / self.index["prompts"]
            with open(path, encoding="utf-8") as f:
                self._prompts = [json.loads(line) for line in f]
        return self._prompts

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open(self, name: str):
        from safetensors import safe_open

        handle = self._handles.get(name)
        if handle is None:
            path = self.directory / name
            try:
                handle = safe_open(str(path), framework="pt")
            except OSError:
                raise
            except Exception as err:  # noqa: BLE001 - SafetensorError: a damaged file, one line
                from wadi.paths import DamagedFileError, damaged_message

                raise DamagedFileError(damaged_message(path, err)) from None
            self._handles[name] = handle
        return handle

    def _rows(self, name: str, start: int, stop: int) -> dict[str, Tensor]:
        handle = self._open(name)
        out = {"embeds": handle.get_slice("embeds")[start:stop]}
        if self.has_mask:
            out["mask"] = handle.get_slice("mask")[start:stop]
        return out

    def get(self, indices, device=None, dtype=None) -> TextCondition:
        """Rows ``indices`` (int, sequence or 1-D tensor of ints) as one ``TextCondition``."""
        if isinstance(indices, Tensor):
            indices = indices.reshape(-1).tolist()
        elif isinstance(indices, int):
            indices = [indices]
        n = len(self)
        parts = []
        for i in indices:
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"embedding index {i} out of range for {n} prompts")
            i %= n
            shard = bisect.bisect_right(self._starts, i) - 1
            info = self.index["shards"][shard]
            row = i - info["start"]
            parts.append(self._rows(info["file"], row, row + 1))
        if not parts:
            raise ValueError("EmbeddingStore.get needs at least one index")
        embeds = torch.cat([p["embeds"] for p in parts])
        mask = torch.cat([p["mask"] for p in parts]) if self.has_mask else None
        return TextCondition(embeds, mask).to(device=device, dtype=dtype)

    def null(self, batch: int = 1, device=None, dtype=None) -> TextCondition:
        """The null prompt ``""`` repeated ``batch`` times."""
        rows = self._rows(self.index["null"], 0, 1)
        mask = rows["mask"].repeat(batch, 1) if "mask" in rows else None
        return TextCondition(rows["embeds"].repeat(batch, 1, 1), mask).to(
            device=device, dtype=dtype
        )

    def __repr__(self) -> str:
        return (
            f"EmbeddingStore({str(self.directory)!r}, count={len(self)}, "
            f"shape={self.index['embeds_shape']}, mask={self.has_mask})"
        )
