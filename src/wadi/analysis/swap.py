"""Write a modified copy of a source in the source's own on-disk format, one tensor at a time.

Used by the swap test: the student with the teacher's norms or directions is
written as a model that loads like the student (a diffusers model folder, a
pipeline folder with the swapped denoiser, or a single ``.safetensors``).

:class:`StreamingSafetensorsWriter` writes the safetensors format directly:
the header (names, dtypes, shapes, offsets) is known from the source before
any data, so each tensor is written as soon as it is computed and a
multi-GB model never sits in memory.  Everything is written under a
temporary name and renamed at the end, so an interrupted run leaves no
partial model in place of a good one.  Nothing is hard-linked: the other files of a
pipeline are copied, so editing the swapped model can never change the source.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from wadi.files import copy_file, fsync_dir, publish, replace_directory, temp_dir_beside

from .sources import WEIGHTS_NAME, Layout

__all__ = ["StreamingSafetensorsWriter", "ModelWriter", "DTYPE_NAMES"]

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPE_NAMES[torch.float8_e4m3fn] = "F8_E4M3"
    DTYPE_NAMES[torch.float8_e5m2] = "F8_E5M2"
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


class StreamingSafetensorsWriter:
    """Write a ``.safetensors`` file tensor by tensor, in the order of ``specs``.

    ``specs`` is a list of ``(name, dtype string, shape)``; each :meth:`write`
    must give the next tensor with exactly that dtype and shape.  The file
    appears at ``path`` only after :meth:`close` succeeds.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self._specs = list(specs)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, dtype, shape in self._specs:
            if dtype not in _ITEMSIZE:
                raise ValueError(f"tensor {name}: dtype {dtype} cannot be written")
            size = math.prod(shape) * _ITEMSIZE[dtype]
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        fd, self._tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        self._file = os.fdopen(fd, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"tensor {name}: all {len(self._specs)} tensors already written")
        want_name, want_dtype, want_shape = self._specs[self._next]
        got_dtype = DTYPE_NAMES.get(tensor.dtype)
        if name != want_name or got_dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise ValueError(
                f"expected tensor {want_name} {want_dtype} {list(want_shape)}, got {name} "
                f"{got_dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> Path:
        """Finish the file and move it into place; fails if tensors are missing."""
        if self._next != len(self._specs):
            self.abort()
            raise ValueError(f"only {self._next} of {len(self._specs)} tensors were written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        publish(self._tmp)  # mkstemp makes it private; the result is an ordinary file
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the temporary file."""
        if not self._file.closed:
            self._file.close()
        Path(self._tmp).unlink(missing_ok=True)


class ModelWriter:
    """Write a copy of a source laid out as ``layout`` at ``target``, tensor by tensor.

    - ``file``: ``target`` is the new ``.safetensors`` file;
    - ``model``: ``target`` is a model folder (``config.json`` copied,
      weights in one ``diffusion_pytorch_model.safetensors``);
    - ``pipeline``: ``target`` is a pipeline folder: every other file of the
      pipeline is copied (never hard-linked: the copy must not share the
      source's inodes) and the denoiser subfolder is written as a model folder.

    Tensors go in the order of ``specs``; :meth:`close` moves the result into
    place (replacing an older one only then); :meth:`abort` drops it.
    """

    def __init__(
        self,
        layout: Layout,
        target: str | os.PathLike,
        specs: list[tuple[str, str, tuple[int, ...]]],
    ):
        self.layout = layout
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        metadata = dict(layout.metadata) or {"format": "pt"}
        if layout.kind == "file":
            self._tmp_dir = None
            self._writer = StreamingSafetensorsWriter(self.target, specs, metadata)
            return
        self._tmp_dir = temp_dir_beside(self.target)
        try:
            if layout.kind == "pipeline":
                model_dir = self._tmp_dir / layout.subfolder
                self._copy_pipeline_rest(
                    layout.path, layout.subfolder, self._tmp_dir, skip=self.target.parent
                )
            else:
                model_dir = self._tmp_dir
            model_dir.mkdir(parents=True, exist_ok=True)
            config = layout.model_dir / "config.json"
            if config.is_file():
                copy_file(config, model_dir / "config.json")
            self._writer = StreamingSafetensorsWriter(
                model_dir / f"{WEIGHTS_NAME}.safetensors", specs, metadata
            )
        except BaseException:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            raise

    @staticmethod
    def _copy_pipeline_rest(root: Path, subfolder: str, dest: Path, skip: Path) -> None:
        """Copy every file of the pipeline but its denoiser; ``skip`` (the output folder) is
        left out in case it lies inside the pipeline."""
        skip = skip.resolve()
        for src in list(root.rglob("*")):
            rel = src.relative_to(root)
            if rel.parts[0] == subfolder or src.is_dir() or src.resolve().is_relative_to(skip):
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_file(src, dest / rel)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.write(name, tensor)

    def close(self) -> Path:
        try:
            self._writer.close()
        except BaseException:
            self.abort()
            raise
        if self._tmp_dir is None:
            return self.target
        try:
            return replace_directory(self._tmp_dir, self.target)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._writer.abort()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
