"""Evaluation helpers of the toy setting: FD and prompt accuracy with the shipped evaluator,
teacher sampling through the library's backbone API, and image grids."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .data import IMAGE_SIZE, load_digits_split
from .evaluator import load_evaluator
from .prompts import prompt_for


@lru_cache(maxsize=1)
def _default_evaluator():
    return load_evaluator()


def balanced_digits(n: int) -> list[int]:
    """``n`` digits cycling 0, 1, ..., 9, 0, ...: every class asked for equally often."""
    if n < 1:
        raise ValueError(f"number of samples must be at least 1, got {n}")
    return [i % 10 for i in range(n)]


@torch.no_grad()
def evaluator_features(images: torch.Tensor, evaluator=None, batch_size: int = 512) -> np.ndarray:
    """(N, D) float64 penultimate features of images (N, 1, 16, 16) in [-1, 1]."""
    evaluator = evaluator or _default_evaluator()
    parts = [
        evaluator.features(images[i : i + batch_size].float()).double().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(parts).numpy()


@lru_cache(maxsize=1)
def _heldout_features_default() -> np.ndarray:
    _, _, test_x, _ = load_digits_split()
    return evaluator_features(test_x)


def heldout_features(evaluator=None) -> np.ndarray:
    """Features of the 360 held-out real digits (the FD reference)."""
    if evaluator is None:
        return _heldout_features_default()
    _, _, test_x, _ = load_digits_split()
    return evaluator_features(test_x, evaluator)


@torch.no_grad()
def evaluate_images(images: torch.Tensor, digits, evaluator=None, reference=None) -> dict:
    """{"fd", "accuracy"} of generated ``images`` (N, 1, 16, 16) in [-1, 1] asked to show ``digits``.

    fd: Frechet distance between the evaluator's features of ``images`` and of ``reference``
    (default: the held-out real digits). accuracy: fraction classified as the digit asked for.
    """
    from wadi.eval.metrics import frechet_distance

    images = torch.as_tensor(images)
    digits = torch.as_tensor(list(digits) if not torch.is_tensor(digits) else digits).long()
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected images (N, 1, 16, 16), got {tuple(images.shape)}")
    if len(digits) != len(images):
        raise ValueError(f"{len(images)} images but {len(digits)} digits")
    if len(images) < 2:
        raise ValueError("FD needs at least 2 images")
    evaluator = evaluator or _default_evaluator()
    images = images.float().clamp(-1.0, 1.0)
    feats = evaluator_features(images, evaluator)
    if reference is None:
        ref = heldout_features(evaluator if evaluator is not _default_evaluator() else None)
    else:
        ref = evaluator_features(torch.as_tensor(reference), evaluator)
    logits = torch.cat(
        [evaluator.classify(images[i : i + 512]) for i in range(0, len(images), 512)]
    )
    accuracy = (logits.argmax(1).cpu() == digits).double().mean().item()
    return {"fd": frechet_distance(feats, ref), "accuracy": accuracy}


def real_digits_floor(samples: int, seed: int = 0) -> dict:
    """{"fd", "accuracy", "samples"} of ``samples`` training digits drawn at random (seeded)
    against the held-out ones: the FD a perfect generator would score at that sample size."""
    train_x, train_y, _, _ = load_digits_split()
    pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    pick = pick[: min(samples, len(train_x))]
    return {**evaluate_images(train_x[pick], train_y[pick]), "samples": len(pick)}


def noise(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, 16, 16) standard normal starting noise from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, 1, IMAGE_SIZE, IMAGE_SIZE), generator=gen)


@torch.no_grad()
def sample_teacher(
    backbone,
    digits,
    steps: int = 25,
    guidance: float = 1.5,
    seed: int = 0,
    template: int = 0,
    batch_size: int = 500,
) -> torch.Tensor:
    """Teacher samples (N, 1, 16, 16) in [-1, 1] via ``wadi.backbones.sampling.sample_multistep``.

    ``backbone`` comes from ``wadi.backbones.load_backbone`` (pixel space: latents are pixels).
    """
    from wadi.backbones.sampling import sample_multistep

    digits = [int(d) for d in digits]
    z = noise(len(digits), seed).to(backbone.device)
    null = backbone.encode_prompts([""])
    out = []
    for i in range(0, len(digits), batch_size):
        chunk = digits[i : i + batch_size]
        cond = backbone.encode_prompts([prompt_for(d, template) for d in chunk])
        x0 = sample_multistep(
            backbone, cond, null.expand(len(chunk)), z[i : i + len(chunk)], steps, guidance
        )
        out.append(backbone.decode(x0).float().cpu())
    return torch.cat(out).clamp(-1.0, 1.0)


def grid_image(rows: dict[str, torch.Tensor], scale: int = 4, label_width: int = 120):
    """A PIL image: one labelled row per generator, one column per digit 0-9.

    ``rows[name]`` holds images (N >= 10, 1, 16, 16) in [-1, 1]; column j shows the first image
    of row ``name`` at index j (so pass samples asked for digits 0, 1, ..., 9 in that order).
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("a grid needs at least one row")
    cell = IMAGE_SIZE * scale
    pad = 2
    width = label_width + 10 * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows.items()):
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[0] < 10 or tuple(images.shape[1:]) != (1, 16, 16):
            raise ValueError(f"row {name!r}: expected at least 10 images (N, 1, 16, 16)")
        pixels = ((images[:10, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        y = pad + r * (cell + pad)
        draw.text((4, y + cell // 2 - 5), str(name)[:20], fill=0)
        for j in range(10):
            tile = Image.fromarray(pixels[j].numpy(), mode="L").resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_width + pad + j * (cell + pad), y))
    return canvas


def save_grid(rows: dict[str, torch.Tensor], path: str | Path, scale: int = 4) -> Path:
    """Write :func:`grid_image` as a PNG at ``path`` atomically."""
    from wadi.images import save_png

    save_png(grid_image(rows, scale=scale), path)
    return Path(path)
