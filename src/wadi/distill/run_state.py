"""What a checkpoint and ``final/`` hold, written and read back for every trained part.

A checkpoint holds the config, the student (``student.safetensors``, plus the LoRaD
folder for a LoRaD student), the fake adapter, the EMA, one optimizer per entry of the
run's optimizer dict (``optimizer_<name>``), each process's RNG state and ``state.json``;
the manifest is written last (:mod:`wadi.distill.checkpoint`).  No pickle anywhere.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .distributed import barrier
from .roles import FAKE

__all__ = ["write_weights", "save_checkpoint", "load_checkpoint", "write_final"]


def write_weights(folder: Path, config, roles, ema) -> None:
    """What both checkpoints and ``final/`` hold: config, student, fake adapter, EMA."""
    from wadi import lorad

    config.save(folder / "config.yaml")
    ckpt.save_tensors(roles.student_named_state(), folder / "student.safetensors")
    if roles.adapter == "lorad":
        lorad.save_adapter(roles.base, folder / "student_adapter", "student")
    if roles.has_fake:
        lorad.save_adapter(roles.base, folder / "fake_adapter", FAKE)
    if ema is not None:
        ckpt.save_tensors(ema.tensors, folder / "ema.safetensors")


def save_checkpoint(run) -> Path:
    """Write ``checkpoints/step-N`` for ``run`` (all processes call this; rank 0 writes)."""
    out, step = Path(run.config.output_dir), run.step
    tmp = ckpt.checkpoint_root(out) / f".tmp-{ckpt.step_dir_name(step)}"
    try:
        _write_checkpoint(run)
    except OSError:  # nothing partial: the temporary folder goes (a full disk, ...)
        if run.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = ckpt.checkpoint_root(out) / ckpt.step_dir_name(step)
    if run.rank == 0 and run.config.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"wadi distill: checkpoint of step {step} in {final}", file=sys.stderr)
    return final


def _write_checkpoint(run) -> None:
    out, rank = Path(run.config.output_dir), run.rank
    tmp = ckpt.checkpoint_root(out) / f".tmp-{ckpt.step_dir_name(run.step)}"
    if rank == 0:
        tmp = ckpt.begin(out, run.step)
    barrier()
    ckpt.save_tensors(ckpt.rng_state(run.rng), tmp / f"rng-rank{rank}.safetensors")
    barrier()
    if rank == 0:
        write_weights(tmp, run.config, run.roles, run.ema)
        for name, opt in run.optimizers.items():
            tensors, meta = opt.optimizer_files()
            ckpt.save_tensors(tensors, tmp / f"optimizer_{name}.safetensors")
            ckpt.write_json(meta, tmp / f"optimizer_{name}.json")
        for name, module in run.modules.items():
            ckpt.save_tensors(module.state_dict(), tmp / f"{name}.safetensors")
        state = {
            "step": run.step,
            "skipped_steps": run.skipped,
            "nonfinite_in_a_row": run.in_a_row,
            "world_size": run.world,
            "scaler": {name: opt.scaler.state_dict() for name, opt in run.optimizers.items()},
        }
        ckpt.write_json(state, tmp / "state.json")
        ckpt.commit(tmp, run.config.keep_checkpoints)
    barrier()


def load_checkpoint(path: Path, run) -> None:
    """Restore ``run`` (adapters, EMA, optimizers, extra modules, RNG, counters) from ``path``."""
    from wadi import lorad

    state = ckpt.read_state(path)
    if state["world_size"] != run.world:
        raise ValueError(
            f"checkpoint {path} was written by {state['world_size']} processes, this run has "
            f"{run.world}; resume with the same number of processes"
        )
    roles = run.roles
    current = roles.student_named_state()
    saved = ckpt.load_tensors(path / "student.safetensors")
    if set(saved) != set(current):
        raise ValueError(
            f"checkpoint {path} does not fit this student ({roles.adapter}); was the config changed?"
        )
    with torch.no_grad():
        for name, value in saved.items():
            current[name].copy_(value)
        if roles.has_fake:
            fake_state = ckpt.load_tensors(path / "fake_adapter" / lorad.io.WEIGHTS_NAME)
            layers = dict(lorad.lorad_layers(roles.base))
            for key, value in fake_state.items():
                module, _, which = key.rpartition(".")
                getattr(layers[module], which)[FAKE].copy_(value)
        if run.ema is not None:
            run.ema.load(ckpt.load_tensors(path / "ema.safetensors"))
    for name, module in run.modules.items():
        module.load_state_dict(ckpt.load_tensors(path / f"{name}.safetensors"))
    for name, opt in run.optimizers.items():
        tensors = ckpt.load_tensors(path / f"optimizer_{name}.safetensors")
        meta = json.loads((path / f"optimizer_{name}.json").read_text())
        ckpt.optimizer_from_files(opt.optimizer, tensors, meta)
        if state.get("scaler", {}).get(name):
            opt.scaler.load_state_dict(state["scaler"][name])
    ckpt.set_rng_state(run.rng, ckpt.load_tensors(path / f"rng-rank{run.rank}.safetensors"))
    run.step, run.skipped = state["step"], state["skipped_steps"]
    run.in_a_row = state["nonfinite_in_a_row"]


def _export_dtype(config) -> torch.dtype:
    """``export_dtype``, or the teacher's stored dtype (as ``wadi export --dtype``)."""
    from wadi.backbones.export import parse_dtype
    from wadi.backbones.export_formats import stored_dtype

    dtype = parse_dtype(config.export_dtype)
    return dtype if dtype is not None else stored_dtype(config.teacher)


def _model_card(pipeline: Path, final: Path, config, summary: dict, dtype) -> str | None:
    """Stock variant names for fp16/bf16, then the folder's README.md; returns the variant."""
    from wadi.backbones.export_formats import apply_variant_names
    from wadi.backbones.model_card import hub_id_of, recipe_from_config, write_model_card

    variant = apply_variant_names(pipeline, dtype)
    recipe = recipe_from_config(config, weights=summary["pipeline_weights"])
    try:
        write_model_card(
            pipeline,
            load_from=str(final / "pipeline"),
            base_model=hub_id_of(config.teacher),
            recipe=recipe,
        )
    except OSError:
        raise  # the output's problem (a full disk): final/ is not written, as for any file
    except Exception as err:  # noqa: BLE001 - a card must never cost a trained run its final/
        import warnings

        warnings.warn(
            f"final/pipeline has no model card ({type(err).__name__}: {err}); "
            f"`wadi export --checkpoint {final} --out DIR` writes an export with one",
            stacklevel=2,
        )
    return variant


def write_final(run) -> Path:
    """``OUTPUT/final``: student (and EMA) adapters, fake adapter, config, merged pipeline."""
    from wadi.backbones.export import save_pipeline
    from wadi.files import atomic_directory, write_json

    config, roles, ema = run.config, run.roles, run.ema
    final = Path(config.output_dir) / "final"
    with atomic_directory(final) as tmp:
        write_weights(tmp, config, roles, ema)
        summary = {
            "adapter": roles.adapter,
            **run.generator.to_dict(),
            "alpha_bar_T": run.generator.alpha_bar(run.backbone),  # the schedule's, not None
        }
        if config.export_pipeline:
            use_ema = ema is not None and config.export_ema
            source = roles
            if getattr(config, "fsdp", False):  # the base is sharded: merge into a whole copy
                from .fsdp import plain_roles

                source = plain_roles(run)
            merged = source.merged_student(ema.tensors if use_ema else None)
            summary["pipeline_weights"] = "ema" if use_ema else "student"
            dtype = _export_dtype(config)
            pipeline = tmp / "pipeline"
            save_pipeline(
                run.backbone,
                merged,
                pipeline,
                generator=run.generator,
                dtype=None if dtype == torch.float32 else dtype,  # merged in float32
            )
            summary["pipeline"] = "pipeline"
            summary["pipeline_dtype"] = str(dtype).removeprefix("torch.")
            summary["pipeline_variant"] = _model_card(pipeline, final, config, summary, dtype)
        write_json(tmp / "summary.json", summary)
    return final
