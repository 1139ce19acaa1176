"""Find the right :class:`Backbone` for a diffusers pipeline folder and load it.

The built-in architectures are listed here explicitly (:data:`BUILTIN`); a user's own
backbone joins with :func:`register_backbone`.  A new architecture is one file with a
:class:`Backbone` subclass (``denoiser_folder``, ``accepts``, the ``_`` hooks) plus one
line here; the training loop does not change.  The implementations import only
``base`` and ``loading``, never this module, so there is no import cycle.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from .base import Backbone
from .loading import load_scheduler, load_text_encoder, load_vae, read_json

__all__ = [
    "register_backbone",
    "registered_backbones",
    "load_backbone",
    "builtin_backbones",
    "read_json",
    "load_scheduler",
    "load_vae",
    "load_text_encoder",
    "reporting_damaged_files",
]

#: backbones added by users with :func:`register_backbone` (tried before the built-ins)
_REGISTRY: list[type[Backbone]] = []


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: make ``cls`` a candidate for :func:`load_backbone` (later ones win)."""
    if cls not in _REGISTRY:
        _REGISTRY.insert(0, cls)
    return cls


def builtin_backbones() -> list[type[Backbone]]:
    """wadi's own architectures, most specific first (imported on first use)."""
    from .flux import FluxBackbone
    from .pixart import PixArtBackbone
    from .sd import SDUNetBackbone
    from .sd3 import SD3Backbone
    from .sdxl import SDXLBackbone

    return [SDUNetBackbone, SDXLBackbone, PixArtBackbone, SD3Backbone, FluxBackbone]


def registered_backbones() -> list[type[Backbone]]:
    return list(_REGISTRY) + [c for c in builtin_backbones() if c not in _REGISTRY]


@contextlib.contextmanager
def reporting_damaged_files(root: str | os.PathLike) -> Iterator[None]:
    """Turn a failure while diffusers/transformers load ``root`` into one line naming the file.

    The libraries report a truncated or garbled ``.safetensors`` file with an error that
    does not say which file (or a traceback deep inside their loaders); when loading
    fails, every ``*.safetensors`` header under ``root`` is checked and the first damaged
    one is named.  Any other failure goes on unchanged.
    """
    from wadi.paths import DamagedFileError, damaged_message, find_damaged_safetensors

    try:
        yield
    except DamagedFileError:
        raise
    except Exception as err:
        damaged = find_damaged_safetensors(root)
        if damaged is None:
            raise
        raise DamagedFileError(damaged_message(damaged)) from err


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _resolve(path: str | os.PathLike) -> Path:
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"teacher {local} is a file; give the diffusers pipeline folder")
        return local
    text = str(path)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    if _HUB_ID.match(text) and not offline:
        try:
            from huggingface_hub import snapshot_download

            return Path(
                snapshot_download(
                    text,
                    allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
                    ignore_patterns=["*.fp16.safetensors", "*ema*"],
                )
            )
        except Exception as err:  # noqa: BLE001 - any hub failure is one user-facing line
            raise FileNotFoundError(
                f"teacher {text!r} is not a local folder and could not be fetched from the hub "
                f"({type(err).__name__}); give a local diffusers pipeline folder"
            ) from None
    raise FileNotFoundError(
        f"teacher folder {local} not found; give a local diffusers pipeline folder "
        "(with unet/ or transformer/, scheduler/, text_encoder/, tokenizer/)"
    )


def _pick_class(root: Path) -> type[Backbone]:
    candidates = registered_backbones()
    folders = sorted({c.denoiser_folder for c in candidates})
    found = [f for f in folders if (root / f / "config.json").is_file()]
    if not found:
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        if any((root / f).is_dir() for f in folders):
            missing = [f"{f}/config.json" for f in folders if (root / f).is_dir()]
            raise FileNotFoundError(f"teacher {root} is incomplete: {', '.join(missing)} missing")
        raise FileNotFoundError(
            f"teacher {root} has no {' or '.join(f + '/' for f in folders)} subfolder "
            f"(found: {', '.join(present) or 'nothing'}); is it a diffusers text-to-image pipeline?"
        )
    for folder in found:
        config = read_json(root / folder / "config.json")
        for cls in candidates:
            if cls.denoiser_folder == folder and cls.accepts(config):
                return cls
    names = [read_json(root / f / "config.json").get("_class_name", "unknown") for f in found]
    raise ValueError(
        f"unsupported architecture in {root}: {', '.join(names)}; wadi supports "
        + ", ".join(c.describe() for c in candidates)
    )


def load_backbone(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_text_encoder: bool = True,
    t5: bool = True,
) -> Backbone:
    """Load the teacher in ``path`` (a diffusers pipeline folder) as a :class:`Backbone`.

    Every module is frozen (``requires_grad=False``) and in eval mode.  With
    ``load_text_encoder=False`` the text encoder and tokenizer stay on disk
    (training from precomputed embeddings).  ``t5=False`` leaves an SD3 teacher's
    optional T5 (``text_encoder_3``) out, in memory and in its exports; backbones that
    need their T5 (FLUX, PixArt) or have none refuse it in one line.
    """
    root = _resolve(path)
    cls = _pick_class(root)
    options = {}
    if not t5:
        if not getattr(cls, "optional_t5", False):
            raise ValueError(
                f"--no-t5 leaves out SD3's optional T5 text encoder, but {root} is a {cls.kind} "
                f"teacher ({cls.t5_note or 'it has no optional T5'}); drop --no-t5"
            )
        options["t5"] = False
    needed = ["scheduler/scheduler_config.json"]
    if load_text_encoder:
        needed += ["text_encoder/config.json", "tokenizer"]
    missing = [n for n in needed if not (root / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"teacher {root} is incomplete: {', '.join(missing)} missing"
            + (
                "; load with load_text_encoder=False to train from precomputed embeddings"
                if all(m.startswith(("text_encoder", "tokenizer")) for m in missing)
                else ""
            )
        )
    with reporting_damaged_files(root):
        backbone = cls.from_folder(
            root, dtype=dtype, device=device, load_text_encoder=load_text_encoder, **options
        )
    for module in (backbone.denoiser, backbone.text_encoder, backbone.vae):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return backbone
