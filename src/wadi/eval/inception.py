"""The Inception-v3 network of FID (the TF 2015-12-05 graph), written as a plain nn.Module.

The architecture is torchvision's Inception-v3 with the three changes pytorch-fid makes
to match the TensorFlow FID graph: average pools that exclude padding, and a max pool in
the last block's pooling branch.  Parameter names follow torchvision, so the state dict
of pytorch-fid's public ``pt_inception-2015-12-05-6726825d.pth`` fits after a one-time
conversion to safetensors (:func:`convert_inception_weights`).  Weights are never
downloaded: the user names a local file.

Output: the 2048-d pool features used for FID and precision/recall.  Two ways to bring
an image to 299 x 299 are offered (:class:`wadi.eval.extractors.InceptionExtractor`):
clean-fid's (PIL bicubic on float channels, ``(x - 128) / 128``), which the field's
COCO numbers use, and pytorch-fid's (torch bilinear, ``2 x - 1``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PUBLIC_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
PUBLIC_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PUBLIC_WEIGHTS_NAME
)
DEFAULT_WEIGHTS_PATH = Path("~/.cache/wadi/pt_inception-2015-12-05.safetensors")
FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU, as in torchvision."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    # FID's TF graph averages over valid pixels only
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Last blocks; ``pool="avg"`` for Mixed_7b, ``pool="max"`` for Mixed_7c (TF FID graph)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of FID, up to the 2048-d global average pool.

    ``forward`` takes RGB images in [0, 1] of any size, ``(B, 3, H, W)``; they are resized
    to 299 x 299 (bilinear, ``align_corners=False``, like pytorch-fid) unless
    ``resize_input`` is False, and mapped to [-1, 1] as the TF graph expects.
    """

    def __init__(self, resize_input: bool = True):
        super().__init__()
        self.resize_input = resize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images
        if self.resize_input:
            x = F.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
            )
        return self.features_from_normalized(2 * x - 1)

    def features_from_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Pool features of images already resized and mapped to the graph's [-1, 1] range."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in (
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))


def clean_resize(images, size: int | None = None, workers: int = 4):
    """clean-fid's resize: each channel as a float32 PIL image, BICUBIC to ``size``, clip 0-255.

    ``images`` are uint8 ``(B, H, W, 3)``; returns float32 ``(B, size, size, 3)`` in
    [0, 255], unquantised (Parmar et al. 2022, "On aliased resizing and surprising
    subtleties in GAN evaluation").  Images are resized in ``workers`` threads.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    size = size or INPUT_SIZE
    out = np.empty((len(images), size, size, 3), dtype=np.float32)

    def one(b):
        for c in range(3):
            channel = Image.fromarray(images[b, :, :, c].astype(np.float32))  # mode "F"
            channel = channel.resize((size, size), resample=Image.Resampling.BICUBIC)
            out[b, :, :, c] = np.asarray(channel).clip(0, 255)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(one, range(len(images))))
    return out


def missing_weights_message(path: str | Path) -> str:
    """One line saying which public file fits and how to make it usable."""
    return (
        f"Inception weights not found at {path}: download pytorch-fid's {PUBLIC_WEIGHTS_NAME} "
        f"({PUBLIC_WEIGHTS_URL}) yourself, then run "
        f"`wadi eval convert-inception {PUBLIC_WEIGHTS_NAME} {DEFAULT_WEIGHTS_PATH}` "
        f"and pass --inception-weights {DEFAULT_WEIGHTS_PATH}"
    )


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _expected_state(model: nn.Module) -> dict[str, torch.Size]:
    return {
        k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")
    }


def load_inception(
    path: str | Path, device: str | torch.device = "cpu", resize_input: bool = True
) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` in eval mode with weights from a local safetensors file.

    Extra keys of the torchvision layout (``fc.*``, ``AuxLogits.*``, ``num_batches_tracked``)
    are ignored; a missing or wrongly shaped tensor is an error naming it.
    """
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(missing_weights_message(path))
    if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
        raise ValueError(
            f"{path} is a pickle checkpoint; convert it once with "
            f"`wadi eval convert-inception {path} {path.with_suffix('.safetensors')}`"
        )
    model = FIDInceptionV3(resize_input=resize_input)
    state = load_file(str(path))
    expected = _expected_state(model)
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(
            f"{path} is not FID Inception-v3 weights: {len(missing)} tensors missing "
            f"(first: {missing[0]}); convert {PUBLIC_WEIGHTS_NAME} with `wadi eval convert-inception`"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise ValueError(
                f"{path}: tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(shape)}"
            )
    model.load_state_dict({k: state[k] for k in expected}, strict=False)
    return model.eval().requires_grad_(False).to(device)


def convert_inception_weights(source: str | Path, target: str | Path) -> Path:
    """Convert pytorch-fid's ``.pth`` state dict to safetensors, once, without unpickling code.

    Uses ``torch.load(weights_only=True)``, keeps only the tensors the network uses,
    checks their shapes, and writes to a temporary name renamed into place.
    """
    from safetensors.torch import save_file

    source, target = Path(source).expanduser(), Path(target).expanduser()
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} not found: download {PUBLIC_WEIGHTS_URL} and pass its local path"
        )
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means "not a plain state dict"
        raise ValueError(f"{source} is not a plain PyTorch state dict: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    expected = _expected_state(FIDInceptionV3())
    if not isinstance(state, dict) or any(k not in state for k in expected):
        missing = [k for k in expected if not isinstance(state, dict) or k not in state]
        raise ValueError(
            f"{source} is not the FID Inception-v3 state dict ({len(missing)} tensors missing, "
            f"first: {missing[0]}); expected pytorch-fid's {PUBLIC_WEIGHTS_NAME}"
        )
    tensors = {}
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{source}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
        tensors[key] = tensor.detach().to(torch.float32).contiguous()
    from wadi.files import atomic_file

    with atomic_file(target) as tmp:
        save_file(tensors, str(tmp), metadata={"source": source.name, "format": "pt"})
    return target
