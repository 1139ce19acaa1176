"""``wadi export --format diffusers|single-file|lora`` and ``--dtype``: one entry point.

Every format starts from the stock diffusers folder (:func:`wadi.backbones.export.export_student`
or :func:`wadi.distill.export.export_checkpoint`), so each export of a student is the same
merged weights: ``single-file`` converts that folder to the LDM layout
(:mod:`.export_single_file`), ``lora`` takes its U-Net's difference to the teacher
(:mod:`.export_lora`).  The folder is built under a temporary name beside ``--out`` and
removed (single-file, lora) or renamed into place (diffusers) at the end.

The default dtype is the teacher's stored one (read from its safetensors headers), so an
fp16 SD1.5 teacher gives a 2 GB student, not 4.5 GB of fp32.  fp16/bf16 folders use the
stock variant names (``*.fp16.safetensors``, read by ``from_pretrained(..., variant="fp16")``)
with a relative link under the plain name for variant-less loaders (``wadi generate``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from wadi.files import fsync_dir, replace_directory, temp_dir_beside

__all__ = ["FORMATS", "stored_dtype", "apply_variant_names", "variant_name", "export"]

FORMATS = ("diffusers", "single-file", "lora")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_VARIANTS = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def stored_dtype(teacher: str | os.PathLike) -> torch.dtype:
    """The dtype the teacher's denoiser weights are stored in (float32 when it cannot tell)."""
    from safetensors import safe_open

    root = Path(teacher)
    for sub in ("unet", "transformer"):
        for file in sorted((root / sub).glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        name = f.get_slice(key).get_dtype()
                        if name in _SAFETENSORS_DTYPES:
                            return _SAFETENSORS_DTYPES[name]
            except Exception:  # noqa: BLE001 - a damaged file is reported by the loader later
                continue
    return torch.float32


def variant_name(name: str, variant: str) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors``
    (shards: ``...-00001-of-00002.safetensors`` -> ``....fp16-00001-of-00002.safetensors``)."""
    stem, _, ext = name.partition(".")
    if "-of-" in stem:
        base, _, shard = stem.partition("-")
        return f"{base}.{variant}-{shard}.{ext}"
    return f"{stem}.{variant}.{ext}"


def apply_variant_names(folder: str | os.PathLike, dtype: torch.dtype) -> str | None:
    """Give an fp16/bf16 folder the stock variant names; returns the variant (or None).

    Each weight file is stored once, under its variant name, and the plain name becomes a
    relative symlink to it; the folder loads with and without ``variant=``.  Shard index
    files get a variant copy naming the variant shards.
    """
    variant = _VARIANTS.get(dtype)
    if variant is None:
        return None
    folder = Path(folder)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(sub.glob("*.safetensors")):
            if file.is_symlink() or f".{variant}" in file.name:
                continue
            target = sub / variant_name(file.name, variant)
            os.replace(file, target)
            os.symlink(target.name, file)
        for index in sorted(sub.glob("*.safetensors.index.json")):
            data = json.loads(index.read_text())
            data["weight_map"] = {
                k: variant_name(v, variant) for k, v in data.get("weight_map", {}).items()
            }
            name = index.name.removesuffix(".safetensors.index.json")
            (sub / f"{name}.{variant}.safetensors.index.json").write_text(
                json.dumps(data, indent=2)
            )
        fsync_dir(sub)
    info = folder / "wadi_export.json"
    if info.is_file():
        data = json.loads(info.read_text())
        data["variant"] = variant
        info.write_text(json.dumps(data, indent=2) + "\n")
    return variant


def _teacher_of(teacher, checkpoint) -> str | None:
    if teacher is not None:
        return str(teacher)
    config = Path(checkpoint) / "config.yaml"
    if not config.is_file():
        return None  # export_checkpoint names the problem
    from wadi.distill.config import DistillConfig

    return str(DistillConfig.load(config).teacher)


def _recipe_of(checkpoint, adapter, use_ema: bool) -> dict | None:
    """The recipe shown in the card: the run's config.yaml, or the adapter's settings."""
    from .model_card import recipe_from_adapter, recipe_from_config

    if checkpoint is not None:
        from wadi.distill.config import DistillConfig

        config = DistillConfig.load(Path(checkpoint) / "config.yaml")
        return recipe_from_config(config, weights="ema" if use_ema else "student")
    return recipe_from_adapter(adapter) if adapter else None


def _check_file_out(out: Path, overwrite: bool, fmt: str, *inputs) -> None:
    from wadi.paths import check_output_separate

    if out.suffix != ".safetensors":
        raise ValueError(
            f"--format {fmt} writes one file: --out must end in .safetensors, got {out}"
        )
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; --format {fmt} writes a .safetensors file")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    check_output_separate(out, *inputs)


def export(
    out: str | os.PathLike,
    *,
    fmt: str = "diffusers",
    teacher: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    use_ema: bool = False,
    alpha_bar_T: float | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    lora_rank: str | int | None = None,
    lora_keys: str = "peft",
    base_model: str | None = None,
    scores: list[str | os.PathLike] | None = None,
    repo_id: str | None = None,
) -> tuple[Path, dict]:
    """Write the student in ``fmt``; returns ``(path, info)`` (info: the note or LoRA summary).

    Give either ``checkpoint`` (a run's ``final/`` or ``checkpoints/step-*``) or
    ``teacher`` + ``adapter``.  Bad paths and flags fail before anything loads.

    Every export gets a model card (:mod:`.model_card`): ``README.md`` in the folder, or
    ``NAME.md`` beside a single file / LoRA (``info["card"]``).  ``base_model`` (a Hub id;
    default: the teacher's when it is a Hub cache snapshot), ``scores`` (``scores.json``
    files of ``wadi eval score``) and ``repo_id`` (the Hub repo the card's snippet loads
    from) go into it.
    """
    from .export import check_export_output, export_student, parse_dtype
    from .export_lora import KEY_STYLES, parse_rank
    from .model_card import check_repo_id, read_scores

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (checkpoint is None) == (teacher is None):
        raise ValueError("give --checkpoint, or --teacher with --adapter")
    if teacher is not None and not adapter:
        raise ValueError("--teacher needs --adapter (a student LoRaD adapter folder)")
    if fmt == "lora":
        lora_rank = parse_rank("full" if lora_rank is None else lora_rank)
        if lora_keys not in KEY_STYLES:
            raise ValueError(
                f"--lora-keys must be one of {', '.join(KEY_STYLES)}, got {lora_keys!r}"
            )
    if base_model is not None:
        check_repo_id(base_model, "--base-model")
    if repo_id is not None:
        check_repo_id(repo_id)
    for path in scores or []:
        read_scores(path)  # a wrong scores file fails now, not after the export
    out = Path(out)
    inputs = [teacher, adapter, checkpoint]
    teacher_dir = _teacher_of(teacher, checkpoint)
    if fmt == "diffusers":
        check_export_output(out, overwrite, *inputs, teacher_dir)
    else:
        _check_file_out(out, overwrite, fmt, *inputs, teacher_dir)
    index = Path(teacher_dir or "") / "model_index.json"
    if fmt == "single-file" and teacher_dir and index.is_file():
        from .export_single_file import check_single_file_source

        check_single_file_source(json.loads(index.read_text()), teacher_dir)
    dtype = parse_dtype(dtype)
    if dtype is None:
        dtype = (
            stored_dtype(teacher_dir)
            if teacher_dir and Path(teacher_dir).is_dir()
            else torch.float32
        )
    # the merged student is fp32 in memory: fp32 needs no cast; conversions read fp32
    folder_dtype = dtype if fmt == "diffusers" and dtype != torch.float32 else None
    from wadi.files import write_text
    from wadi.paths import writing_output

    from .model_card import (
        CARD_NAME,
        file_card,
        file_card_path,
        hub_id_of,
        write_model_card,
    )

    stage = temp_dir_beside(out)
    try:
        folder = stage / "pipeline"
        if checkpoint is not None:
            from wadi.distill.export import export_checkpoint

            export_checkpoint(checkpoint, folder, use_ema=use_ema, dtype=folder_dtype)
        else:
            export_student(teacher, adapter, folder, alpha_bar_T, dtype=folder_dtype)
        card = dict(
            base_model=base_model or hub_id_of(teacher_dir),
            recipe=_recipe_of(checkpoint, adapter, use_ema),
            scores=scores,
        )
        if fmt == "diffusers":
            variant = apply_variant_names(folder, dtype)
            write_model_card(folder, load_from=str(out), repo_id=repo_id, **card)
            replace_directory(folder, out)
            info = {"dtype": str(dtype).removeprefix("torch."), "variant": variant}
            return out, {**info, "card": str(out / CARD_NAME)}
        write_model_card(folder, base_model=card["base_model"], recipe=card["recipe"])
        if fmt == "single-file":
            from .export_single_file import note_path, save_single_file

            path = save_single_file(folder, out, dtype=dtype, overwrite=overwrite)
            info = json.loads(note_path(path).read_text())
        else:
            from .export_lora import save_lora

            path, info = save_lora(
                teacher_dir,
                folder,
                out,
                lora_rank,
                keys=lora_keys,
                dtype=dtype,
                overwrite=overwrite,
            )
        text = file_card(
            path,
            fmt,
            folder,
            info={**info, "dtype": str(dtype).removeprefix("torch.")},
            repo_id=repo_id,
            scores=scores,
        )
        card_path = file_card_path(path)
        with writing_output(card_path):
            write_text(card_path, text)
        return path, {**info, "card": str(card_path)}
    finally:
        shutil.rmtree(stage, ignore_errors=True)
