"""Atomic, pickle-free training checkpoints that resume bit for bit.

Layout of ``OUTPUT/checkpoints/step-000500/``::

    config.yaml                  the run's DistillConfig
    state.json                   step, counters, grad-scaler scale, world size
    student.safetensors          the student's trainable tensors (LoRaD factors,
                                 PEFT LoRA/DoRA factors, or the full denoiser)
    student_adapter/             LoRaD student only: a standard adapter folder
    fake_adapter/                the fake score's LoRaD adapter folder
    ema.safetensors              EMA of the student (when enabled)
    optimizer_student.safetensors / .json   AdamW state (tensors / hyper-parameters)
    optimizer_fake.safetensors / .json
    rng-rank0.safetensors ...    every process's random generator state
    manifest.json                size and sha256 of every file above, written last

A checkpoint is written into ``.tmp-step-000500`` and renamed when complete,
so a crash mid-write leaves the previous checkpoint as the latest.  Loading checks
the manifest first: a truncated, missing or garbled file (a copy cut short, a bad disk)
is named in one line instead of failing deep inside safetensors, and ``--resume latest``
falls back to the newest checkpoint that is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STEP_NAME = re.compile(r"^step-(\d+)$")  # what a user may type: step-4, step-000004
MANIFEST = "manifest.json"
STATE_KEYS = ("step", "skipped_steps", "nonfinite_in_a_row", "world_size")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never count)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every ``step-*`` folder, complete or not, oldest first (temporary folders never count)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def resolve_resume(
    output_dir: str | Path, resume: str, warn: Callable[[str], None] | None = None
) -> Path | None:
    """``latest`` -> newest complete checkpoint (None if the run has none yet); else the
    checkpoint ``resume`` names (a path, or ``step-N`` in the run), which must be complete.

    Damaged checkpoints passed over by ``latest`` are reported through ``warn``, one line each.
    """
    if resume == "latest":
        damaged = []
        for path in reversed(step_folders(output_dir)):
            problem = verify(path)
            if problem is None:
                if damaged and warn is not None:
                    warn(f"resuming from {path.name}, the newest complete checkpoint")
                return path
            damaged.append(path.name)
            if warn is not None:
                warn(f"checkpoint {path} is damaged ({problem}); skipping it")
        if damaged:
            raise ValueError(
                f"no complete checkpoint in {checkpoint_root(output_dir)} ({', '.join(damaged)} "
                "damaged); pass --overwrite to start the run again"
            )
        return None
    path = Path(resume)
    if not path.exists() and (m := STEP_NAME.match(resume)):
        path = checkpoint_root(output_dir) / step_dir_name(int(m.group(1)))
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint {path} not found; pass --resume latest or a step-* folder of the run"
        )
    if not (path / "state.json").is_file() and not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"{path} is not a wadi checkpoint (no state.json); pass --resume latest or a step-* folder"
        )
    problem = verify(path)
    if problem is not None:
        raise ValueError(
            f"checkpoint {path} is damaged ({problem}); pass --resume latest to continue from "
            "the newest complete one"
        )
    return path


# -- manifest -----------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """``manifest.json``: relative path -> size and sha256 of every file; written last."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    write_json({"files": files}, folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """What is wrong with the checkpoint in ``folder`` (one phrase), or None if it is complete."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except FileNotFoundError:
        return f"{MANIFEST} missing, so it was never completed"
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        return f"{MANIFEST} is not readable"
    if "state.json" not in files:
        return "state.json is not in the manifest"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != entry.get("size"):
            return f"{name} has {size} bytes, expected {entry.get('size')}"
        if _sha256(path) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    try:
        state = read_state(folder)
        missing = [k for k in STATE_KEYS if not isinstance(state.get(k), int)]
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "state.json is not valid JSON"
    if missing:
        return f"state.json lacks {', '.join(missing)}"
    return None


# -- optimizer state without pickle ---------------------------------------------------------


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and JSON-able hyper-parameters."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


# -- RNG --------------------------------------------------------------------------------------


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(generator: torch.Generator, state: dict[str, torch.Tensor]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


# -- writing ----------------------------------------------------------------------------------


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def begin(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (main process only)."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, keep: int) -> Path:
    """Write the manifest, rename a complete temporary checkpoint into place, then drop the
    oldest beyond ``keep``."""
    final = tmp.parent / tmp.name.removeprefix(".tmp-")
    write_manifest(tmp)
    for f in tmp.rglob("*"):  # make the files durable before the rename publishes them
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
