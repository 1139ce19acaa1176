"""The student as a LoRA on its teacher: a truncated SVD of ``W' - W`` per changed layer.

A LoRaD student changes each adapted weight by ``D = W' - W`` (``W'`` merged, ``W`` the
teacher's).  A rank-``r`` LoRA keeps the top ``r`` singular directions of ``D`` (flattened
per output channel, as :mod:`wadi.analysis.weights` reads it):
``D_r = up @ down`` with ``up = U_r sqrt(S_r)`` and ``down = sqrt(S_r) V_r^T``, the best
rank-``r`` approximation in Frobenius norm (Eckart-Young).  Convolutions keep their kernel
in ``down`` (``(r, in, kh, kw)``) and get a 1x1 ``up``, as PEFT and kohya's LoRA convs do.
``rank=None`` ("full") keeps every singular value: the LoRA-applied teacher is the student.

Two key layouts: ``"peft"`` (``unet.<module>.lora_A.weight`` / ``lora_B.weight``, written
by the stock ``save_lora_weights``; no alphas, so every module has scale 1) and
``"kohya"`` (``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight``
/ ``alpha``, what ComfyUI and A1111 read; one alpha for all modules, each ``up`` scaled so
``alpha / rank * up @ down`` is the layer's change).  Both load with
``pipe.load_lora_weights``.
"""

from __future__ import annotations

import collections
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wadi.files import atomic_file
from wadi.paths import check_output_separate, writing_output

__all__ = [
    "KEY_STYLES",
    "LayerError",
    "parse_rank",
    "low_rank_factors",
    "lora_layers",
    "lora_state_dict",
    "summarize_errors",
    "read_unet_state",
    "save_lora",
]

KEY_STYLES = ("peft", "kohya")


@dataclass
class LayerError:
    """How far one layer's rank-r LoRA is from the student's change ``D = W' - W``."""

    name: str
    rank: int
    full_rank: int
    delta_norm: float  # ||D||_F
    error_norm: float  # ||D - D_r||_F
    weight_norm: float  # ||W'||_F
    out_features: int
    fan_in: int


def parse_rank(text: str | int | None) -> int | None:
    """``"full"`` / ``None`` -> ``None`` (exact); a positive integer otherwise."""
    if text is None or text == "full":
        return None
    try:
        rank = int(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"--lora-rank must be a positive integer or 'full', got {text!r}"
        ) from None
    if rank < 1:
        raise ValueError(f"--lora-rank must be a positive integer or 'full', got {text!r}")
    return rank


def low_rank_factors(
    delta: torch.Tensor, rank: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, error_norm)``: the rank-``rank`` truncated SVD of ``delta`` (float32 out).

    ``delta`` is a Linear ``(out, in)`` or Conv2d ``(out, in, kh, kw)`` weight difference;
    the SVD runs in float64.  ``error_norm`` is ``||delta - up @ down||_F`` from the
    dropped singular values.
    """
    if delta.ndim not in (2, 4):
        raise ValueError(f"a LoRA needs a 2-D or 4-D weight, got shape {tuple(delta.shape)}")
    rows = delta.reshape(delta.shape[0], -1).to(torch.float64)
    u, s, vh = torch.linalg.svd(rows, full_matrices=False)
    keep = s.numel() if rank is None else min(rank, s.numel())
    root = s[:keep].sqrt()
    up = u[:, :keep] * root
    down = root[:, None] * vh[:keep]
    error = float(s[keep:].square().sum().sqrt())
    if delta.ndim == 4:
        down = down.reshape(keep, *delta.shape[1:])
        up = up.reshape(delta.shape[0], keep, 1, 1)
    return down.to(torch.float32), up.to(torch.float32), error


def lora_layers(teacher: dict, student: dict) -> list[str]:
    """The weight keys the student changed; refuses a change a LoRA cannot carry.

    Only 2-D and 4-D ``*.weight`` tensors may differ (Linear and Conv2d layers); a changed
    bias, norm or embedding, or a key missing on one side, is a one-line ``ValueError``.
    """
    if set(teacher) != set(student):
        diff = sorted(set(teacher) ^ set(student))
        raise ValueError(
            f"the student and the teacher U-Net have different tensors ({diff[:3]}); "
            "export the LoRA against the student's own teacher"
        )
    changed = []
    for key in sorted(student):
        a, b = teacher[key], student[key]
        if a.shape != b.shape:
            raise ValueError(
                f"{key} has shape {tuple(b.shape)} in the student, {tuple(a.shape)} in the teacher"
            )
        if torch.equal(a, b):
            continue
        if not key.endswith(".weight") or b.ndim not in (2, 4):
            raise ValueError(
                f"the student changed {key}, which a LoRA cannot carry (only Linear/Conv2d "
                "weights); use --format diffusers or single-file"
            )
        changed.append(key)
    if not changed:
        raise ValueError("the student equals the teacher (no weight changed); nothing to export")
    return changed


def lora_state_dict(
    teacher: dict,
    student: dict,
    rank: int | None,
    keys: str = "peft",
    dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], list[LayerError]]:
    """The LoRA of ``student - teacher`` (U-Net state dicts) and each layer's error.

    ``keys="peft"`` gives ``<module>.lora_A.weight`` / ``lora_B.weight`` (the argument of
    ``save_lora_weights(unet_lora_layers=...)``); ``"kohya"`` the full kohya names.
    """
    if keys not in KEY_STYLES:
        raise ValueError(f"--lora-keys must be one of {', '.join(KEY_STYLES)}, got {keys!r}")
    out: dict[str, torch.Tensor] = {}
    errors, factors = [], []
    for key in lora_layers(teacher, student):
        module = key.removesuffix(".weight")
        w_t = teacher[key].to(torch.float64)
        w_s = student[key].to(torch.float64)
        down, up, error = low_rank_factors(w_s - w_t, rank)
        r = down.shape[0]
        factors.append((module, down, up))
        errors.append(
            LayerError(
                name=module,
                rank=r,
                full_rank=min(w_s.shape[0], math.prod(w_s.shape[1:])),
                delta_norm=float((w_s - w_t).norm()),
                error_norm=error,
                weight_norm=float(w_s.norm()),
                out_features=w_s.shape[0],
                fan_in=math.prod(w_s.shape[1:]),
            )
        )
    # kohya: one alpha for every module (the most common rank); each module's up factor
    # carries rank / alpha, so scale * up @ down is exact in every loader.  (Per-module
    # alphas would be exact too, but diffusers' kohya loader drops the mid-block's.)
    alpha = collections.Counter(down.shape[0] for _, down, _ in factors).most_common(1)[0][0]
    for module, down, up in factors:
        if keys == "peft":
            out[f"{module}.lora_A.weight"] = _cast(down, dtype)
            out[f"{module}.lora_B.weight"] = _cast(up, dtype)
        else:
            name = "lora_unet_" + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = _cast(down, dtype)
            out[f"{name}.lora_up.weight"] = _cast(up * (down.shape[0] / alpha), dtype)
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype or torch.float32)
    return out, errors


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (t if dtype is None else t.to(dtype)).contiguous()


def summarize_errors(errors: list[LayerError]) -> dict:
    """Whole-model relative errors: ``||D - D_r|| / ||D||`` and ``||D - D_r|| / ||W'||``.

    Norms are summed in squares over all layers (the model's weights as one vector); the
    worst single layer's ``||D - D_r|| / ||D||`` is given too.
    """
    err = math.sqrt(sum(e.error_norm**2 for e in errors))
    delta = math.sqrt(sum(e.delta_norm**2 for e in errors))
    weight = math.sqrt(sum(e.weight_norm**2 for e in errors))
    return {
        "layers": len(errors),
        "relative_to_change": err / delta if delta else 0.0,
        "relative_to_weight": err / weight if weight else 0.0,
        "worst_layer_relative_to_change": max(
            (e.error_norm / e.delta_norm for e in errors if e.delta_norm), default=0.0
        ),
        "parameters": sum(e.rank * (e.out_features + e.fan_in) for e in errors),
    }


def read_unet_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The denoiser state dict of a diffusers pipeline folder (``unet/``), from its safetensors."""
    from safetensors.torch import load_file

    from .export_single_file import _component_files

    sub = Path(folder) / "unet"
    files = _component_files(sub) if sub.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"{sub} has no safetensors weights; a LoRA export needs a U-Net pipeline"
        )
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def save_lora(
    teacher_dir: str | os.PathLike,
    student_dir: str | os.PathLike,
    out: str | os.PathLike,
    rank: int | str | None,
    *,
    keys: str = "peft",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> tuple[Path, dict]:
    """Write the LoRA turning ``teacher_dir``'s U-Net into ``student_dir``'s as ``out``.

    Both are diffusers pipeline folders (the student: a ``wadi export``).  Returns the path
    and the error summary (:func:`summarize_errors`), which also goes into the file's
    metadata (``wadi_lora``).
    """
    from .export import parse_dtype

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must name a .safetensors file for --format lora")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the .safetensors file to write")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    check_output_separate(out, teacher_dir, student_dir)
    rank = parse_rank(rank)
    dtype = parse_dtype(dtype)
    if keys not in KEY_STYLES:
        raise ValueError(f"--lora-keys must be one of {', '.join(KEY_STYLES)}, got {keys!r}")
    state, errors = lora_state_dict(
        read_unet_state(teacher_dir), read_unet_state(student_dir), rank, keys, dtype
    )
    summary = summarize_errors(errors)
    summary.update(rank="full" if rank is None else rank, keys=keys)
    with writing_output(out), atomic_file(out) as tmp:
        if keys == "peft":
            _write_stock(student_dir, tmp, state, summary)
        else:
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"format": "pt", "wadi_lora": json.dumps(summary)})
    return out, summary


def _write_stock(pipeline_dir, path: Path, state: dict, summary: dict) -> None:
    """``save_lora_weights`` of the pipeline's own class writes the PEFT keys (``unet.*``)."""
    import diffusers
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    cls = getattr(diffusers, index.get("_class_name", "StableDiffusionPipeline"), None)
    if cls is None or not hasattr(cls, "save_lora_weights"):
        cls = diffusers.StableDiffusionPipeline
    cls.save_lora_weights(
        path.parent, unet_lora_layers=state, weight_name=path.name, safe_serialization=True
    )
    # add the error summary to the stock file's metadata
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata["wadi_lora"] = json.dumps(summary)
    save_file(tensors, str(path), metadata=metadata)
