"""A digits ControlNet for the shipped teacher: condition = the digit's blurred mask.

``wadi toy train-controlnet`` trains a stock ``ControlNetModel`` (``from_unet`` on the
teacher, 1-channel condition at pixel resolution) with the teacher's own denoising loss,
teacher and text encoder frozen, then saves a plain ``ControlNetModel`` folder that
``wadi generate --controlnet`` and :mod:`wadi.controlnet` take.  How well a sample
follows its condition is :func:`follow_scores`: IoU of the sample's ink with the
condition's source digit, and the correlation of the sample with the condition.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import load_digits_split
from .prompts import TEMPLATES, prompt_for

__all__ = ["ControlNetTrainConfig", "blurred_mask", "train_controlnet", "follow_scores"]


@dataclass
class ControlNetTrainConfig:
    """What decides the trained ControlNet (saved beside it as ``training_config.json``)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    null_prompt_prob: float = 0.1
    blur_sigma: float = 1.5
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--steps, --batch-size and --lr must be positive")
        if self.blur_sigma <= 0:
            raise ValueError(f"--blur-sigma must be positive, got {self.blur_sigma}")


def blurred_mask(images: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1]: where the digit has ink (> 0 in [-1, 1]), Gaussian-blurred.

    Blurred so the condition gives the layout (where strokes go), not the strokes.
    """
    mask = (images > 0).float()
    radius = max(1, int(round(2 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(grid**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.conv2d(F.pad(mask, (radius, radius, 0, 0)), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius)), kernel.view(1, 1, -1, 1))
    return out / out.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def train_controlnet(
    out: str | Path, teacher: str | Path, config: ControlNetTrainConfig, progress: bool = True
) -> dict:
    """Train the ControlNet on the training digits and save it to ``out``; returns a summary."""
    from diffusers import ControlNetModel
    from tqdm.auto import tqdm

    from wadi.files import atomic_directory

    from .teacher import load_teacher_parts, tokenize

    config.validate()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    unet, text_encoder, tokenizer, scheduler = load_teacher_parts(teacher)
    for p in [*unet.parameters(), *text_encoder.parameters()]:
        p.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_channels=1, conditioning_embedding_out_channels=(16,)
    ).train()
    train_x, train_y, _, _ = load_digits_split()
    conditions = blurred_mask(train_x, config.blur_sigma)
    prompts = [prompt_for(d, t) for t in range(len(TEMPLATES)) for d in range(10)] + [""]
    with torch.no_grad():
        table = text_encoder(tokenize(tokenizer, prompts))[0]
    null_row = len(prompts) - 1
    abar = scheduler.alphas_cumprod.to(torch.float32)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=config.lr, weight_decay=0.0)
    start = time.perf_counter()
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc="controlnet", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(train_x), (config.batch_size,), generator=gen)
        x0, y, c = train_x[idx], train_y[idx], conditions[idx]
        template = torch.randint(0, len(TEMPLATES), (config.batch_size,), generator=gen)
        rows = template * 10 + y
        drop = torch.rand(config.batch_size, generator=gen) < config.null_prompt_prob
        rows = torch.where(drop, torch.full_like(rows, null_row), rows)
        t = torch.randint(0, len(abar), (config.batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        text = table[rows]
        down, mid = controlnet(x_t, t, text, controlnet_cond=c, return_dict=False)
        pred = unet(
            x_t,
            t,
            text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    controlnet.eval()
    summary = {
        "config": asdict(config),
        "teacher": str(teacher),
        "condition": "blurred_mask",
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(out)
    with atomic_directory(out) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_config.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def follow_scores(images: torch.Tensor, targets: torch.Tensor, conditions: torch.Tensor) -> dict:
    """How well samples follow their conditions (means over the batch).

    ``iou``: intersection over union of the sample's ink (> 0) with the source digit's ink;
    ``corr``: Pearson correlation of the sample with its (blurred-mask) condition.
    """
    ink = images > 0
    truth = targets > 0
    inter = (ink & truth).flatten(1).sum(1).float()
    union = (ink | truth).flatten(1).sum(1).float().clamp_min(1)
    a = images.flatten(1).double()
    b = conditions.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return {"iou": (inter / union).mean().item(), "corr": corr.mean().item()}
