"""Off-the-shelf ControlNets plugged into a student's (or the teacher's) U-Net calls.

The paper's ControlNet demo reuses a ControlNet trained for the teacher, unchanged, with
the one-step student.  wadi's generators only call ``backbone.predict`` -> the U-Net, so
the ControlNet enters there: :func:`controlled` registers a forward pre-hook on the U-Net
that runs every ControlNet at the same ``(x_t, t, text embeddings)`` the U-Net gets and
passes the summed residuals as ``down_block_additional_residuals`` /
``mid_block_additional_residual`` (what ``StableDiffusionControlNetPipeline`` and
``MultiControlNetModel`` do).  Nothing in wadi's backbones, generators or samplers
changes, so one step, a few steps, DDIM with CFG and re-dilation all work alike; the
hook is removed on exit, also on an exception.

Control images are prepared as the stock pipeline prepares them (``VaeImageProcessor``
without normalisation: [0, 1], resized to the image size), so one step with guidance 1
gives what ``StableDiffusionControlNetPipeline`` gives on the exported student.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Control", "controlled", "load_controls", "prepare_control_image"]


@dataclass
class Control:
    """One ControlNet, its condition (PIL image, path or ``(1|B, C, H, W)`` tensor in [0, 1])
    and its conditioning scale."""

    model: nn.Module
    image: Any
    scale: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def pixel_factor(self) -> int:
        """Condition pixels per U-Net latent pixel (its conditioning embedding's strides)."""
        return 2 ** (len(self.model.config.conditioning_embedding_out_channels) - 1)

    def condition(self, height: int, width: int, batch: int, device, dtype) -> Tensor:
        """The condition at the latents' ``height x width``, one row per sample."""
        key = (height, width)
        if key not in self._cache:
            factor = self.pixel_factor
            self._cache[key] = prepare_control_image(
                self.image,
                height * factor,
                width * factor,
                int(self.model.config.conditioning_channels),
                factor,
            )
        image = self._cache[key]
        if image.shape[0] != batch:
            if batch % image.shape[0]:
                raise ValueError(
                    f"{image.shape[0]} control images for a batch of {batch}: give one image, "
                    "or one per sample"
                )
            image = image.repeat(batch // image.shape[0], 1, 1, 1)  # CFG: [null, cond] halves
        return image.to(device=device, dtype=dtype)


def prepare_control_image(image, height: int, width: int, channels: int, factor: int) -> Tensor:
    """``(N, channels, height, width)`` float32 in [0, 1], as the stock ControlNet pipeline.

    PIL images and paths go through ``VaeImageProcessor(do_normalize=False)`` (RGB, or
    greyscale for a 1-channel ControlNet); a tensor is taken as is (resized if needed).
    """
    from diffusers.image_processor import VaeImageProcessor

    if isinstance(image, (str, os.PathLike)):
        from PIL import Image

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"control image {path} not found")
        try:
            image = Image.open(path)
            image.load()
        except OSError as err:
            raise ValueError(f"control image {path} is not a readable image ({err})") from None
    if torch.is_tensor(image):
        out = image.float()
        if out.ndim == 3:
            out = out[None]
        if tuple(out.shape[-2:]) != (height, width):
            out = nn.functional.interpolate(out, size=(height, width), mode="bilinear")
    else:
        processor = VaeImageProcessor(
            vae_scale_factor=factor,
            do_convert_rgb=channels == 3,
            do_convert_grayscale=channels == 1,
            do_normalize=False,
        )
        out = processor.preprocess(image, height=height, width=width).float()
    if out.shape[1] != channels:
        raise ValueError(
            f"the control image has {out.shape[1]} channels but the ControlNet takes {channels}"
        )
    return out


def _check_fits(unet: nn.Module, control: Control) -> None:
    """A ControlNet made for another U-Net fails deep inside diffusers: refuse it here."""
    cu, cc = unet.config, control.model.config
    for key in ("in_channels", "cross_attention_dim", "block_out_channels"):
        a, b = cu.get(key), cc.get(key)
        if a is not None and b is not None and list(_as_list(a)) != list(_as_list(b)):
            raise ValueError(
                f"the ControlNet was made for a U-Net with {key}={b}, this one has {a}; use a "
                "ControlNet trained for this teacher"
            )


def _as_list(value):
    return value if isinstance(value, (list, tuple)) else [value]


def _unet_inputs(args, kwargs):
    """(sample, timestep, encoder_hidden_states) of a ``UNet2DConditionModel`` call."""
    names = ("sample", "timestep", "encoder_hidden_states")
    values = list(args[:3]) + [None] * (3 - min(3, len(args)))
    for i, name in enumerate(names):
        if i >= len(args):
            values[i] = kwargs.get(name)
    return values


@contextmanager
def controlled(unet: nn.Module, controls: Sequence[Control]) -> Iterator[nn.Module]:
    """Inside the ``with``, every call of ``unet`` gets the residuals of ``controls``.

    Each ControlNet runs at the U-Net's own inputs with its ``scale``; residuals of
    several ControlNets add.  A call that already carries residuals is left alone.
    """
    controls = list(controls)
    for control in controls:
        _check_fits(unet, control)

    def hook(module, args, kwargs):
        if not controls or kwargs.get("down_block_additional_residuals") is not None:
            return None
        sample, timestep, text = _unet_inputs(args, kwargs)
        down, mid = None, None
        for control in controls:
            h, w = sample.shape[-2:]
            image = control.condition(h, w, sample.shape[0], sample.device, sample.dtype)
            d, m = control.model(
                sample,
                timestep,
                encoder_hidden_states=text,
                controlnet_cond=image,
                conditioning_scale=float(control.scale),
                added_cond_kwargs=kwargs.get("added_cond_kwargs"),
                return_dict=False,
            )
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        kwargs = dict(kwargs)
        kwargs["down_block_additional_residuals"] = tuple(down)
        kwargs["mid_block_additional_residual"] = mid
        return args, kwargs

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield unet
    finally:
        handle.remove()


def load_controls(
    folders: Sequence[str | os.PathLike],
    images: Sequence[Any],
    scales: Sequence[float] | None = None,
    *,
    device="cpu",
    dtype=torch.float32,
) -> list[Control]:
    """``ControlNetModel`` folders with their images and scales (one scale for all, or one each)."""
    from diffusers import ControlNetModel

    folders, images = list(folders), list(images)
    scales = [1.0] if not scales else [float(s) for s in scales]
    if len(folders) != len(images):
        raise ValueError(
            f"{len(folders)} --controlnet but {len(images)} --control-image; give one image "
            "per ControlNet, in the same order"
        )
    if len(scales) == 1:
        scales = scales * len(folders)
    if len(scales) != len(folders):
        raise ValueError(
            f"{len(scales)} --controlnet-scale for {len(folders)} --controlnet; give one scale "
            "for all or one per ControlNet"
        )
    controls = []
    for folder, image, scale in zip(folders, images, scales):
        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(
                f"ControlNet folder {folder} has no config.json; give a saved ControlNetModel "
                "folder (ControlNetModel.save_pretrained)"
            )
        model = ControlNetModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
        if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
            raise FileNotFoundError(f"control image {image} not found")
        controls.append(Control(model, image, scale))
    return controls
