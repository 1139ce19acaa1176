"""Reading the parts of a diffusers pipeline folder: JSON configs, scheduler, VAE, text encoder.

Shared by every backbone (and by nothing else's import of a backbone), so the
implementations need not import the registry that lists them.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_json", "load_scheduler", "load_vae", "load_text_encoder"]


def read_json(path: Path) -> dict:
    """A JSON file as a dict, with a one-line error if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the folder looks damaged") from None


def load_scheduler(root: Path):
    """The teacher's scheduler, of the class named in its config."""
    import diffusers

    config = read_json(root / "scheduler" / "scheduler_config.json")
    name = config.get("_class_name", "DDPMScheduler")
    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None or not hasattr(scheduler_cls, "from_pretrained"):
        raise ValueError(f"unknown scheduler class {name!r} in {root / 'scheduler'}")
    scheduler = scheduler_cls.from_pretrained(root, subfolder="scheduler")
    from .parametrization import from_scheduler

    try:
        from_scheduler(scheduler)  # DDPM-family or flow matching, else one line now
    except ValueError as err:
        raise ValueError(f"{err} (in {root / 'scheduler'})") from None
    return scheduler


def load_vae(root: Path, dtype, device):
    """The teacher's VAE, or ``None`` when the folder has no ``vae/`` (pixel space)."""
    if not (root / "vae").is_dir():
        return None
    if not (root / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"teacher {root} is incomplete: vae/config.json missing")
    import diffusers

    name = read_json(root / "vae" / "config.json").get("_class_name", "AutoencoderKL")
    vae_cls = getattr(diffusers, name, None)
    if vae_cls is None:
        raise ValueError(f"unsupported VAE class {name!r} in {root / 'vae'}")
    return vae_cls.from_pretrained(root, subfolder="vae", torch_dtype=dtype).to(device)


def load_text_encoder(root: Path, default_class: str, dtype, device, folder: str = "text_encoder"):
    """A text encoder (class from its config's ``architectures``) and its tokenizer.

    ``folder`` is ``text_encoder``, ``text_encoder_2``, ...; the tokenizer is the matching
    ``tokenizer``, ``tokenizer_2``, ... (the diffusers pipeline layout).
    """
    import transformers

    config = read_json(root / folder / "config.json")
    name = (config.get("architectures") or [default_class])[0]
    encoder_cls = getattr(transformers, name, None)
    if encoder_cls is None:
        raise ValueError(f"unsupported text encoder {name!r} in {root / folder}")
    encoder = encoder_cls.from_pretrained(root / folder, dtype=dtype).to(device)
    tokenizer_folder = root / folder.replace("text_encoder", "tokenizer")
    return encoder, transformers.AutoTokenizer.from_pretrained(tokenizer_folder)
