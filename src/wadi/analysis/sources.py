"""Where the weights come from: memory-mapped safetensors, read one tensor at a time.

A source is one side of the comparison:

- a diffusers model folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
  or shards listed by ``diffusion_pytorch_model.safetensors.index.json``);
- a pipeline folder: its ``unet/`` or ``transformer/`` subfolder is used;
- a single ``.safetensors`` file (or a folder holding exactly one);
- any of those plus a wadi LoRaD adapter folder: each adapted layer's weight
  is ``rotate_pairs(W_base, A @ B)``, computed when the tensor is read.

Pickle-based weights (``.bin``, ``.ckpt``, ``.pt``) are never read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = [
    "Layout",
    "SafetensorsSource",
    "AdapterSource",
    "open_source",
    "DENOISER_SUBFOLDERS",
]

WEIGHTS_NAME = "diffusion_pytorch_model"
DENOISER_SUBFOLDERS = ("unet", "transformer")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass
class Layout:
    """How a source is laid out on disk, so a modified copy can be written the same way.

    ``kind`` is ``"file"`` (one ``.safetensors``), ``"model"`` (a diffusers
    model folder) or ``"pipeline"`` (a pipeline folder whose ``subfolder``
    holds the model).
    """

    kind: str
    path: Path  # the file, the model folder, or the pipeline root
    subfolder: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path | None:
        if self.kind == "model":
            return self.path
        if self.kind == "pipeline":
            return self.path / self.subfolder
        return None


class SafetensorsSource:
    """Tensors of one or more safetensors files, opened memory-mapped and read on demand."""

    def __init__(self, files_by_key: dict[str, Path], layout: Layout, description: str):
        self.layout = layout
        self.description = description
        self._file_of = files_by_key
        self._handles: dict[Path, object] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}
        for path in dict.fromkeys(files_by_key.values()):
            handle = self._handle(path)
            for key in handle.keys():
                if self._file_of.get(key) != path:
                    continue
                sl = handle.get_slice(key)
                self._shapes[key] = tuple(sl.get_shape())
                self._dtypes[key] = sl.get_dtype()
        missing = [k for k in files_by_key if k not in self._shapes]
        if missing:
            raise ValueError(
                f"{description}: the index lists {len(missing)} tensors its shards lack "
                f"(first: {missing[0]} in {files_by_key[missing[0]].name}); the folder is incomplete"
            )

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types
                raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        return self._handles[path]

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> str:
        """The safetensors dtype string (``F32``, ``BF16``, ...)."""
        return self._dtypes[key]

    def get(self, key: str) -> torch.Tensor:
        return self._handle(self._file_of[key]).get_tensor(key)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AdapterSource:
    """A base source with a wadi LoRaD adapter applied to the layers it names.

    The adapter holds ``<module>.lorad_A`` ``(out, r)`` and ``<module>.lorad_B``
    ``(r, pairs)``; the student weight of ``<module>.weight`` is
    ``wadi.lorad.rotate_pairs(W_base, A @ B)`` in the base weight's dtype.
    """

    def __init__(self, base: SafetensorsSource, adapter_dir: str | os.PathLike):
        from safetensors.torch import load_file

        from wadi.lorad.config import CONFIG_NAME, LoRaDConfig

        adapter_dir = Path(adapter_dir)
        weights = adapter_dir / "adapter_model.safetensors"
        if not (adapter_dir / CONFIG_NAME).is_file() or not weights.is_file():
            raise FileNotFoundError(
                f"{adapter_dir} is not a wadi LoRaD adapter folder: it needs {CONFIG_NAME} and "
                "adapter_model.safetensors (as written by wadi.lorad.save_adapter)"
            )
        LoRaDConfig.load(adapter_dir)  # validates the config (adapter_type, keys)
        factors = load_file(str(weights))  # small: only the angle factors
        self.base = base
        self.layout = base.layout
        self.description = f"{base.description} + LoRaD adapter {adapter_dir}"
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        problems = []
        modules = sorted({k.rpartition(".")[0] for k in factors})
        for module in modules:
            a, b = factors.get(f"{module}.lorad_A"), factors.get(f"{module}.lorad_B")
            key = f"{module}.weight"
            if a is None or b is None:
                problems.append(f"{module}: lorad_A or lorad_B missing")
                continue
            if key not in base.keys():
                problems.append(f"{module}: no weight {key} in the base")
                continue
            shape = base.shape(key)
            pairs = math.prod(shape[1:]) // 2
            if (
                a.ndim != 2
                or b.ndim != 2
                or a.shape[0] != shape[0]
                or tuple(b.shape[1:]) != (pairs,)
            ):
                problems.append(
                    f"{module}: A {list(a.shape)} and B {list(b.shape)} do not fit the base weight "
                    f"{list(shape)} (need A [{shape[0]}, r] and B [r, {pairs}])"
                )
                continue
            self._factors[key] = (a, b)
        unknown = sorted(k for k in factors if not k.endswith((".lorad_A", ".lorad_B")))
        problems += [f"{k}: not a LoRaD factor" for k in unknown]
        if problems:
            shown = "; ".join(problems[:5]) + (
                f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
            )
            raise ValueError(
                f"adapter {adapter_dir} does not fit {base.description} "
                f"({len(problems)} problems): {shown}. Use the base model it was trained on."
            )

    @property
    def adapted_keys(self) -> list[str]:
        return list(self._factors)

    def keys(self) -> list[str]:
        return self.base.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key)

    def dtype(self, key: str) -> str:
        return self.base.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        weight = self.base.get(key)
        if key not in self._factors:
            return weight
        from wadi.lorad import angles, rotate_pairs

        a, b = self._factors[key]
        return rotate_pairs(weight, angles(a, b))

    def close(self) -> None:
        self.base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _model_folder_files(folder: Path, variant: str | None) -> dict[str, Path] | None:
    """``key -> shard`` of a diffusers model folder, or None if it holds no diffusers weights."""
    suffix = f".{variant}" if variant else ""
    index = folder / f"{WEIGHTS_NAME}.safetensors.index{suffix}.json"
    single = folder / f"{WEIGHTS_NAME}{suffix}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index ({err})") from None
        files = {}
        for key, name in weight_map.items():
            shard = folder / name
            if not shard.is_file():
                raise FileNotFoundError(f"{index} lists shard {name}, which is missing in {folder}")
            files[key] = shard
        return files
    if single.is_file():
        return {key: single for key in _keys_of(single)}
    return None


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None


def _file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _pickle_error(path: Path) -> ValueError:
    return ValueError(
        f"{path}: pickle-based weights are not read (unsafe); convert them to .safetensors first"
    )


def _open_path(path: Path, variant: str | None) -> SafetensorsSource:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give a model folder or a .safetensors file")
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise _pickle_error(path)
        if path.suffix != ".safetensors":
            raise ValueError(
                f"{path}: not a .safetensors file; give a model folder or .safetensors"
            )
        files = {key: path for key in _keys_of(path)}
        return SafetensorsSource(
            files, Layout("file", path, metadata=_file_metadata(path)), str(path)
        )

    files = _model_folder_files(path, variant)
    if files is not None:
        meta = _file_metadata(next(iter(files.values()))) if files else {}
        return SafetensorsSource(files, Layout("model", path, metadata=meta), str(path))

    subfolders = [s for s in DENOISER_SUBFOLDERS if (path / s).is_dir()]
    if len(subfolders) > 1:
        raise ValueError(
            f"{path} holds both {' and '.join(subfolders)}; pass the subfolder to analyze"
        )
    if subfolders:
        sub = path / subfolders[0]
        files = _model_folder_files(sub, variant)
        if files is None:
            raise FileNotFoundError(_no_weights_message(sub, variant))
        meta = _file_metadata(next(iter(files.values()))) if files else {}
        layout = Layout("pipeline", path, subfolder=subfolders[0], metadata=meta)
        return SafetensorsSource(files, layout, f"{path} ({subfolders[0]})")

    if (path / "adapter_config.json").is_file():
        raise ValueError(
            f"{path} is a LoRaD adapter, not a model: pass it with --student-adapter "
            "(or --teacher-adapter) and give its base model as the model"
        )
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1 and not (path / "config.json").is_file():
        return _open_path(singles[0], variant)
    raise FileNotFoundError(_no_weights_message(path, variant))


def _no_weights_message(folder: Path, variant: str | None) -> str:
    suffix = f".{variant}" if variant else ""
    found = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickles = [n for n in found if n.endswith(_PICKLE_SUFFIXES)]
    hint = (
        f"; {pickles[0]} is pickle-based and not read: convert it to .safetensors"
        if pickles
        else ""
    )
    variants = sorted(
        {n.split(".")[1].split("-")[0] for n in found if n.startswith(f"{WEIGHTS_NAME}.")}
        - {"safetensors"}
    )
    if variants and not variant:
        hint += f"; weights with variant {variants[0]!r} found: pass --variant {variants[0]}"
    return (
        f"no {WEIGHTS_NAME}{suffix}.safetensors (or its .index{suffix}.json) in {folder}, and no "
        f"unet/ or transformer/ subfolder{hint}"
    )


def open_source(
    path: str | os.PathLike, adapter: str | os.PathLike | None = None, *, variant: str | None = None
) -> SafetensorsSource | AdapterSource:
    """Open one side of the comparison (see the module docstring); close it when done."""
    base = _open_path(Path(path), variant)
    if adapter is None:
        return base
    try:
        return AdapterSource(base, adapter)
    except BaseException:
        base.close()
        raise
