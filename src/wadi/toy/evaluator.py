"""The toy evaluator: a small CNN digit classifier (FD features and prompt accuracy).

``features`` are the penultimate activations (the FD space), ``classify`` the logits.
Shipped as ``assets/evaluator/model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import EVALUATOR_DIR
from .data import IMAGE_SIZE, load_digits_split

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class DigitClassifier(nn.Module):
    """Three conv layers, two poolings, a ``feature_dim`` penultimate layer, ten logits."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 64):
        super().__init__()
        c1, c2, c3 = channels
        self.channels = (c1, c2, c3)
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Flatten(),
            nn.Linear(c3 * (IMAGE_SIZE // 4) ** 2, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def config(self) -> dict:
        return {"channels": list(self.channels), "feature_dim": self.feature_dim}

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"expected images of shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}"
            )
        param = next(self.parameters())
        return images.to(device=param.device, dtype=param.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) penultimate features of images (B, 1, 16, 16) in [-1, 1]."""
        return self.body(self._check(images))

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 10) logits."""
        return self.head(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(images)


def save_evaluator(
    model: DigitClassifier, directory: str | Path, extra: dict | None = None
) -> Path:
    """Write weights (safetensors) and config (JSON) to ``directory`` atomically."""
    from safetensors.torch import save_file

    from wadi.files import atomic_directory

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(
            json.dumps({**model.config(), **(extra or {})}, indent=2) + "\n"
        )
    return directory


def load_evaluator(directory: str | Path | None = None, device="cpu") -> DigitClassifier:
    """The evaluator in eval mode; by default the one shipped with wadi."""
    from safetensors.torch import load_file

    directory = Path(directory) if directory is not None else EVALUATOR_DIR
    if not (directory / WEIGHTS_NAME).is_file() or not (directory / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no evaluator in {directory} (need {WEIGHTS_NAME} and {CONFIG_NAME})"
        )
    config = json.loads((directory / CONFIG_NAME).read_text())
    model = DigitClassifier(tuple(config["channels"]), int(config["feature_dim"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
    return model.to(device).eval()


@dataclass
class EvaluatorTrainConfig:
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 1  # random translation in pixels, for robustness to generated digits
    seed: int = 0


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    if max_shift <= 0:
        return x
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=gen)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = pad[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
    return out


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` classified as ``labels``."""
    return (model.classify(images).argmax(1) == labels.to(images.device)).double().mean().item()


def train_evaluator(
    out: str | Path, config: EvaluatorTrainConfig | None = None, progress: bool = True
) -> dict:
    """Train the classifier on the training split, save it to ``out``; report held-out accuracy."""
    from tqdm.auto import tqdm

    config = config or EvaluatorTrainConfig()
    if config.epochs < 1 or config.batch_size < 1:
        raise ValueError("epochs and batch size must be at least 1")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    train_x, train_y, test_x, test_y = load_digits_split()
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = -(-len(train_x) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    start = time.perf_counter()
    for _epoch in tqdm(range(config.epochs), desc="evaluator", disable=not progress):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), config.batch_size):
            idx = order[i : i + config.batch_size]
            x = random_shift(train_x[idx], config.max_shift, gen)
            loss = torch.nn.functional.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    summary = {
        "train_config": asdict(config),
        "train_accuracy": accuracy(model, train_x, train_y),
        "heldout_accuracy": accuracy(model, test_x, test_y),
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    save_evaluator(model, out, extra=summary)
    return summary
