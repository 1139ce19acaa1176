"""Pluggable feature extractors: a name -> factory registry.

Every extractor maps a batch of RGB ``uint8`` images ``(B, H, W, 3)`` to a float32
feature array ``(B, D)`` and describes itself (name, weights file, sha256, input
transform) so the protocol hash and the sidecar record exactly what was used.
Nothing is ever downloaded: weights come from local files or folders the user names.

Built in: ``inception`` (FID's Inception-v3 pool features), ``clip`` (transformers
``CLIPModel`` from a local folder, or open_clip when importable and asked for), and
``digits`` (the toy demo's evaluator, :mod:`wadi.toy.evaluator`, loaded lazily).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .extractor_base import FeatureExtractor, _check_images  # noqa: F401 (re-exported)

_REGISTRY: dict[str, Callable[..., FeatureExtractor]] = {}


def register_extractor(name: str):
    """Decorator: make ``factory(**options) -> FeatureExtractor`` available as ``name``."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_extractors() -> list[str]:
    return sorted(_REGISTRY)


def load_extractor(name: str, **options) -> FeatureExtractor:
    """Build the extractor registered as ``name`` with its options (weights, device...)."""
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown feature extractor {name!r}; choose one of {', '.join(available_extractors())}"
        )
    return _REGISTRY[name](**options)


def state_dict_sha256(module) -> str:
    """Fingerprint of a module's weights: sha256 over sorted names, shapes and bytes."""
    import torch

    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_weights_sha256(folder: str | Path) -> str:
    """sha256 over the weight files (safetensors) of a model folder, sorted by name."""
    from wadi.eval.inception import file_sha256

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no .safetensors weights in {folder}; save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_sha256(f)}".encode())
    return digest.hexdigest()


INCEPTION_RESIZES = {
    "clean": "clean-fid: uint8 -> per-channel float PIL BICUBIC 299x299, clip 0-255, "
    "(x - 128) / 128, float32",
    "pytorch-fid": "pytorch-fid: RGB [0,1] -> torch bilinear 299x299 (align_corners=False), "
    "2x - 1, float32",
}


class InceptionExtractor(FeatureExtractor):
    """FID Inception-v3 pool features (2048-d) from a local safetensors file.

    ``resize`` chooses how images reach 299 x 299: ``"clean"`` (default; clean-fid, the
    tool behind the COCO numbers of method.md §6) or ``"pytorch-fid"``.
    """

    name = "inception"

    def __init__(
        self, weights: str | Path | None = None, device: str = "cpu", resize: str = "clean", **_
    ):
        import torch

        from wadi.eval.inception import DEFAULT_WEIGHTS_PATH, file_sha256, load_inception

        if resize not in INCEPTION_RESIZES:
            raise ValueError(
                f"unknown Inception resize {resize!r}; choose {' or '.join(INCEPTION_RESIZES)}"
            )
        self.resize = resize
        self.weights = Path(weights or DEFAULT_WEIGHTS_PATH).expanduser()
        self.model = load_inception(self.weights, device=device)
        self.device = torch.device(device)
        self.sha256 = file_sha256(self.weights)

    def _run(self, x):
        import torch

        # TF32 convolutions would shift FID; keep full float32 like the reference implementations
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.inference_mode():
                if self.resize == "clean":
                    return self.model.features_from_normalized(x)
                return self.model(x)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def features(self, images) -> np.ndarray:
        import torch

        from wadi.eval.inception import INPUT_SIZE, clean_resize

        images = _check_images(images)
        if self.resize == "clean":
            resized = clean_resize(images, INPUT_SIZE)
            x = (torch.from_numpy(resized).permute(0, 3, 1, 2) - 128.0) / 128.0
        else:
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        return self._run(x.to(self.device)).float().cpu().numpy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "architecture": "FID Inception-v3 (TF 2015-12-05 graph), 2048-d pool",
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "resize": self.resize,
            "input": INCEPTION_RESIZES[self.resize],
        }


class CLIPExtractor(FeatureExtractor):
    """CLIP image and text embeddings; adds :meth:`text_features` for the CLIP score."""

    name = "clip"
    default_resize = 256

    def text_features(self, captions: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class TransformersCLIP(CLIPExtractor):
    """``transformers.CLIPModel`` + ``CLIPProcessor`` from a local folder (no download)."""

    def __init__(self, folder: str | Path | None = None, device: str = "cpu", **_):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        if folder is None:
            raise ValueError(
                "CLIP score needs a local CLIP model: pass --clip-model DIR (a folder saved "
                "with CLIPModel/CLIPProcessor.save_pretrained)"
            )
        self.folder = Path(folder).expanduser()
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no CLIP model at {self.folder} (config.json missing); pass a folder saved "
                "with CLIPModel.save_pretrained and CLIPProcessor.save_pretrained"
            )
        self.sha256 = folder_weights_sha256(self.folder)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(self.folder, local_files_only=True)
        self.model = self.model.eval().requires_grad_(False).to(self.device)
        self.processor = CLIPProcessor.from_pretrained(self.folder, local_files_only=True)

    @staticmethod
    def _embeds(output):
        # transformers >= 5 returns an output object whose pooler_output is projected
        return output if hasattr(output, "shape") else output.pooler_output

    def features(self, images) -> np.ndarray:
        import torch
        from PIL import Image

        images = _check_images(images)
        pil = [Image.fromarray(im) for im in images]
        pixels = self.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        return self._embeds(out).float().cpu().numpy()

    def text_features(self, captions: Sequence[str]) -> np.ndarray:
        import torch

        tok = self.processor.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
        return self._embeds(out).float().cpu().numpy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "backend": "transformers",
            "model": str(self.folder),
            "weights_sha256": self.sha256,
            "input": "CLIPProcessor of the model folder",
        }


class OpenCLIP(CLIPExtractor):
    """open_clip model (e.g. ``ViT-g-14``) with weights from a local .safetensors file."""

    def __init__(self, model_name: str, weights: str | Path | None, device: str = "cpu", **_):
        try:
            import open_clip
        except ModuleNotFoundError as err:
            raise ValueError(
                "open_clip is not installed: `pip install open_clip_torch`, or use a "
                "transformers CLIP folder with --clip-model DIR"
            ) from err
        import torch

        from wadi.eval.inception import file_sha256

        if weights is None:
            raise ValueError(
                f"open_clip model {model_name} needs --open-clip-weights FILE (local .safetensors)"
            )
        self.weights = Path(weights).expanduser()
        if not self.weights.is_file() or self.weights.suffix != ".safetensors":
            raise FileNotFoundError(
                f"open_clip weights must be a local .safetensors file, got {self.weights} "
                "(e.g. open_clip_model.safetensors of laion/CLIP-ViT-g-14-laion2B-s12B-b42K)"
            )
        self.model_name = model_name
        self.sha256 = file_sha256(self.weights)
        self.device = torch.device(device)
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=str(self.weights), device=self.device
        )
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)

    def features(self, images) -> np.ndarray:
        import torch
        from PIL import Image

        images = _check_images(images)
        batch = torch.stack([self.preprocess(Image.fromarray(im)) for im in images])
        with torch.inference_mode():
            return self.model.encode_image(batch.to(self.device)).float().cpu().numpy()

    def text_features(self, captions: Sequence[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(list(captions)).to(self.device)
        with torch.inference_mode():
            return self.model.encode_text(tokens).float().cpu().numpy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "backend": "open_clip",
            "model": self.model_name,
            "weights": str(self.weights),
            "weights_sha256": self.sha256,
            "input": "open_clip preprocess of the model",
        }


class DigitsExtractor(FeatureExtractor):
    """Features of the toy demo's digits evaluator, for (B, 1, 16, 16) images in [-1, 1]."""

    name = "digits"
    default_resize = None

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", **_):
        import torch

        try:
            from wadi.toy.evaluator import load_evaluator
        except ModuleNotFoundError as err:
            if err.name and not "wadi.toy.evaluator".startswith(err.name):
                raise  # the evaluator exists but something it imports is missing
            raise ValueError(
                "the digits extractor needs wadi.toy.evaluator, which this install lacks"
            ) from err
        self.device = torch.device(device)
        self.weights = weights
        self.model = load_evaluator(weights) if weights else load_evaluator()
        if hasattr(self.model, "to"):
            self.model = self.model.to(self.device)
        if hasattr(self.model, "eval"):
            self.model.eval()
        self.sha256 = state_dict_sha256(self.model) if hasattr(self.model, "state_dict") else None

    def features(self, images) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        images = _check_images(images)
        x = torch.from_numpy(images).float().mean(dim=-1, keepdim=True).permute(0, 3, 1, 2)
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True)
        x = (x / 127.5 - 1.0).to(self.device)
        with torch.inference_mode():
            out = self.model.features(x)
        return out.reshape(out.shape[0], -1).float().cpu().numpy()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "model": f"wadi.toy.evaluator.load_evaluator({self.weights or ''})",
            "weights_sha256": self.sha256,
            "input": "grey = mean of RGB, 16x16 (bilinear, antialias), [-1,1]",
        }


@register_extractor("inception")
def _inception(weights=None, device="cpu", inception_resize="clean", **options):
    return InceptionExtractor(weights=weights, device=device, resize=inception_resize)


@register_extractor("clip")
def _clip(folder=None, open_clip_model=None, open_clip_weights=None, device="cpu", **options):
    if open_clip_model:
        return OpenCLIP(open_clip_model, open_clip_weights, device=device)
    return TransformersCLIP(folder, device=device)


@register_extractor("vgg16")
def _vgg16(weights=None, device="cpu", **options):
    from wadi.eval.vgg import VGG16Extractor  # precision/recall's VGG-16 fc2 features

    return VGG16Extractor(weights=weights, device=device)


@register_extractor("digits")
def _digits(weights=None, device="cpu", **options):
    return DigitsExtractor(weights=weights, device=device)
