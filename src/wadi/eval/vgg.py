"""VGG-16 fc2 features (4096-d), the features of improved precision/recall.

Kynkaanniemi et al. (2019) compute precision/recall on the second fully connected layer
(fc2) of an ImageNet VGG-16, images at 224 x 224.  Their network (and StyleGAN2-ADA's
``vgg16.pt``) is a pickled TensorFlow / TorchScript file, which wadi does not open; this
module is the torchvision VGG-16 layout built by hand, with weights from a local
safetensors file: torchvision's ``vgg16-397923af.pth`` (ImageNet1K_V1) converted once
by the user (docs/eval.md).  Features are the fc2 output before its ReLU, as the
torchvision-based reimplementation takes them (``vgg16.classifier[:4]``), inputs RGB in
[0, 1] normalised by the ImageNet mean/std.  Numbers compare with
PyTorch implementations that use torchvision's VGG-16, not digit for digit with the
NVIDIA detector's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from wadi.eval.extractor_base import FeatureExtractor, _check_images

TORCHVISION_WEIGHTS_NAME = "vgg16-397923af.pth"
TORCHVISION_WEIGHTS_URL = "https://download.pytorch.org/models/" + TORCHVISION_WEIGHTS_NAME
INPUT_SIZE = 224
FEATURE_DIM = 4096
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# channels of the 13 convolutions, "M" a 2 x 2 max-pool (configuration "D")
_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16FC2(nn.Module):
    """torchvision's ``vgg16`` up to fc2 (``classifier[:4]``); same parameter names."""

    def __init__(self, fc_width: int = FEATURE_DIM, widths=_LAYERS):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in widths:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        # indices 0, 3 as in torchvision (2 is dropout, identity in eval mode)
        self.classifier = nn.Sequential(
            nn.Linear(channels * 49, fc_width),
            nn.ReLU(),
            nn.Identity(),
            nn.Linear(fc_width, fc_width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def missing_weights_message(path: Path) -> str:
    return (
        f"VGG-16 weights not found at {path}: download torchvision's {TORCHVISION_WEIGHTS_NAME} "
        f"({TORCHVISION_WEIGHTS_URL}) and convert it to safetensors once (docs/eval.md)"
    )


def load_vgg16(path: str | Path, device: str | torch.device = "cpu", model=None) -> VGG16FC2:
    """:class:`VGG16FC2` in eval mode with weights from a local safetensors file.

    The 1000-way classifier (``classifier.6.*``) of the torchvision file is ignored; a
    missing or wrongly shaped tensor is one ``ValueError`` naming it.
    """
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(
            f"VGG-16 weights must be a .safetensors file, got {path.name}: convert "
            f"{TORCHVISION_WEIGHTS_NAME} once (one line in docs/eval.md); wadi does not unpickle"
        )
    if not path.is_file():
        raise ValueError(missing_weights_message(path))
    model = model if model is not None else VGG16FC2()
    state = load_file(str(path))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"{path} is not a torchvision VGG-16 state dict ({len(missing)} tensors missing, "
            f"first: {missing[0]}); convert {TORCHVISION_WEIGHTS_NAME}"
        )
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ValueError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(tensor.shape)}"
            )
    model.load_state_dict({k: state[k].float() for k in expected})
    return model.eval().requires_grad_(False).to(device)


def vgg_input(images: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, size, size)``: PIL bicubic to ``size``
    when needed, [0, 1], ImageNet mean/std."""
    from PIL import Image

    if images.shape[1:3] != (size, size):
        images = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                for im in images
            ]
        )
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class VGG16Extractor(FeatureExtractor):
    """VGG-16 fc2 features for precision/recall (Kynkaanniemi et al. 2019)."""

    name = "vgg16"
    default_resize = INPUT_SIZE  # the protocol's LANCZOS resize goes straight to 224

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", **_):
        from wadi.eval.inception import file_sha256

        if weights is None:
            raise ValueError(
                "the vgg16 extractor needs --pr-extractor-weights FILE (torchvision's "
                f"{TORCHVISION_WEIGHTS_NAME} converted to .safetensors, see docs/eval.md)"
            )
        self.weights = Path(weights).expanduser()
        self.device = torch.device(device)
        self.model = load_vgg16(self.weights, device=self.device)
        self.sha256 = file_sha256(self.weights)

    def features(self, images) -> np.ndarray:
        images = _check_images(images)
        with torch.inference_mode():
            return self.model(vgg_input(images).to(self.device)).float().cpu().numpy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "architecture": "VGG-16 (torchvision layout), fc2 before its ReLU, 4096-d",
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "input": "PIL bicubic to 224 if not already, [0,1], ImageNet mean/std, float32",
        }
