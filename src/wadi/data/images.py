"""Real images for terms that need them (DMD2's GAN term): a folder to tensors, then latents.

``load_image_folder`` reads every ``.png/.jpg/.jpeg/.webp`` file of one folder (not
its subfolders; hidden files skipped), in name order, centre-cropped to a square
and resized with LANCZOS, as floats in [-1, 1].  ``encode_images`` turns them into
the teacher's latents the way ``Backbone.decode`` inverts them.  PIL only decodes
image formats; nothing is unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "load_image_folder", "encode_images"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_MODES = {1: "L", 3: "RGB"}


def _image_files(folder: Path) -> list[Path]:
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder (expected a folder of images)")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise ValueError(
            f"image folder {folder} holds no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files"
        )
    return files


def _load_one(path: Path, resolution: int, mode: str) -> Tensor:
    """One file as a (C, resolution, resolution) uint8 tensor."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # phone photos: apply the EXIF rotation
            if image.mode in ("P", "LA", "RGBA") and mode == "RGB":
                image = image.convert("RGBA").convert("RGB")  # palette transparency, alpha
            image = image.convert(mode)
            w, h = image.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = image.resize(
                (resolution, resolution), Image.LANCZOS, box=(left, top, left + side, top + side)
            )
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def load_image_folder(path: str | os.PathLike, resolution: int, channels: int = 3) -> Tensor:
    """All images of ``path`` as one float32 tensor ``(N, channels, resolution, resolution)`` in [-1, 1].

    Each image is centre-cropped to its shorter side and resized with LANCZOS;
    ``channels`` 1 gives grayscale (PIL's "L"), 3 RGB.  The whole set is held in
    memory: meant for the few thousand images a GAN term needs.
    """
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    files = _image_files(Path(path))
    images = torch.stack([_load_one(f, resolution, _MODES[channels]) for f in files])
    return images.float().div_(127.5).sub_(1.0)


def encode_images(backbone, images: Tensor, batch_size: int = 16) -> Tensor:
    """Images in [-1, 1] ``(N, C, H, W)`` to the teacher's latents, float32 on ``images``' device.

    Latent-space teachers: ``(latent_dist.mean - shift_factor) * scaling_factor``,
    the inverse of ``Backbone.decode`` (the mean, not a sample: the same latents
    every epoch).  Pixel-space teachers (no VAE): the images themselves.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    vae = backbone.vae
    expected = backbone.latent_channels if vae is None else int(vae.config.in_channels)
    if images.shape[1] != expected:
        raise ValueError(
            f"the teacher takes {expected}-channel images, got {images.shape[1]} channels "
            f"(load the folder with channels={expected})"
        )
    for side in images.shape[-2:]:
        backbone.latent_size(int(side))  # one line if not a multiple of the VAE factor
    if vae is None:
        return images.float()
    param = next(vae.parameters())
    scale = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    batches = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            mean = vae.encode(chunk.to(device=param.device, dtype=param.dtype)).latent_dist.mean
            batches.append(((mean.float() - shift) * scale).to(images.device))
    return torch.cat(batches)
