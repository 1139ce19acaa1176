"""Image tensors to PNG files: one place for the [-1, 1] -> uint8 conversion and grids."""

from __future__ import annotations

import os

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, C)`` uint8 (1 channel stays 1)."""
    images = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    arrays = to_uint8(images).numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> torch.Tensor:
    """Tile ``(B, C, H, W)`` images into one ``(C, H', W')`` image (values kept)."""
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = (b + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), -1.0)
    for i in range(b):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i].detach().float().cpu()
    return grid


def save_png(image, path: str | os.PathLike) -> None:
    """Write a PIL image atomically (temp file, then rename)."""
    from wadi.files import atomic_file

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1
) -> torch.Tensor:
    """Save images in [-1, 1] as one PNG grid; returns the grid in [0, 1] (for TensorBoard)."""
    grid = make_grid(images, nrow=nrow)
    pil = to_pil(grid[None])[0]
    if scale > 1:
        from PIL import Image

        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    save_png(pil, path)
    return (grid.clamp(-1, 1) + 1) / 2
