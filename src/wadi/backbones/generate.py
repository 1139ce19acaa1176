"""Sample PNGs: one step from an exported pipeline or teacher + adapter, or many from the teacher.

Noise for prompt ``i`` comes from a CPU generator seeded ``seed + i``, so an
image depends only on its prompt, its index and the seed: not on the batch
size, the device or which route (stock pipeline or wadi) produced it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from wadi.files import atomic_directory
from wadi.paths import check_output_folder, check_output_separate, writing_output

__all__ = ["seeded_noise", "to_pil", "generate_images"]


#: offset of the per-image seeds a multi-step student's re-noising draws from
RENOISE_SEED = 1_000_003


def seeded_noise(indices: Sequence[int], seed: int, shape: tuple[int, ...]) -> Tensor:
    """``(len(indices), *shape)`` standard normal noise, row ``k`` from seed ``seed + indices[k]``."""
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator("cpu").manual_seed(int(seed) + int(i)) for i in indices]
    return randn_tensor((len(generators), *shape), generator=generators, dtype=torch.float32)


def to_pil(image: Tensor):
    """One ``(C, H, W)`` image in [0, 1] as a PIL image (L for 1 channel, RGB for 3)."""
    from PIL import Image

    array = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    array = (array * 255).round().astype(np.uint8)
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], mode="L")
    return Image.fromarray(array)


def _save_png(image: Tensor, path: Path) -> None:
    to_pil(image).save(path, format="PNG")


def generate_images(
    prompts: Sequence[str],
    out: str | os.PathLike,
    *,
    pipeline: str | os.PathLike | None = None,
    teacher: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    seed: int = 0,
    batch_size: int = 4,
    steps: int = 1,
    guidance: float | None = None,
    resolution: int | None = None,
    alpha_bar_T: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    redilate: str | None = None,
    disperse: str | None = None,
    controlnets: Sequence[str | os.PathLike] | None = None,
    control_images: Sequence | None = None,
    controlnet_scales: Sequence[float] | None = None,
    embeddings: Sequence[str | os.PathLike] | None = None,
) -> list[Path]:
    """Write ``out/00000.png ...`` and ``out/images.jsonl`` (file, prompt, seed) for ``prompts``.

    The folder is built under a temporary name and renamed into place when complete:
    an existing ``out`` (only with ``overwrite``) is replaced as a whole, never mixed
    with new images, and a failure midway leaves it as it was.  Routes: ``pipeline`` (an exported folder, run by the stock diffusers
    pipeline in one step); ``teacher`` + ``adapter`` (wadi's one-step
    generator); ``teacher`` alone with ``steps > 1`` (DDIM with CFG, default 3.0).
    ``redilate`` (``"auto"`` or a block list) samples above the native resolution with
    ScaleCrafter's re-dilated convolutions (:mod:`wadi.highres`); ``disperse`` (same
    forms) with its dispersed 5x5 kernels, alone or with ``redilate``.  ``controlnets``
    (``ControlNetModel`` folders, one of ``control_images`` and one or all
    ``controlnet_scales`` each) condition every U-Net call (:mod:`wadi.controlnet`);
    they run on wadi's route, an exported folder included.  ``embeddings`` (files of
    ``wadi invert-relation``, diffusers' textual-inversion format) add their tokens to the
    text encoder: ``load_textual_inversion`` on the stock route, the same rows on wadi's.
    """
    from tqdm.auto import tqdm

    if (pipeline is None) == (teacher is None):
        raise ValueError("give exactly one of --pipeline (exported folder) or --teacher")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"--steps and --batch-size must be positive, got {steps}, {batch_size}")
    if steps > 1 and (pipeline is not None or adapter is not None):
        raise ValueError(
            "--steps > 1 samples the multi-step teacher: use --teacher without --adapter "
            "(the one-step student runs with --steps 1)"
        )
    if steps == 1 and guidance not in (None, 1.0):
        raise ValueError(
            "--guidance applies to multi-step teacher sampling (--steps > 1); the one-step "
            "student takes none"
        )
    if pipeline is not None and alpha_bar_T is not None:
        raise ValueError("an exported pipeline already holds its alpha_bar_T; drop --alpha-bar-T")
    if guidance is None:
        guidance = 1.0 if steps == 1 else 3.0
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    out = check_output_folder(out, overwrite=overwrite)
    check_output_separate(out, pipeline, teacher, adapter)

    if pipeline is not None and not Path(pipeline).is_dir():
        raise FileNotFoundError(f"pipeline folder {pipeline} not found")
    if adapter is not None:
        from wadi.lorad.io import require_role

        if not Path(adapter).is_dir():
            raise FileNotFoundError(f"adapter folder {adapter} not found")
        require_role(adapter, "student")
    controls = None
    if controlnets:
        from wadi.controlnet import load_controls

        controls = load_controls(
            controlnets, control_images or [], controlnet_scales, device=device, dtype=dtype
        )
    elif control_images or controlnet_scales:
        raise ValueError("--control-image and --controlnet-scale go with --controlnet CN_DIR")
    tokens = _read_embeddings(embeddings or [])
    if pipeline is not None and (Path(pipeline) / "vae").is_dir() and not controls:
        sampler = _stock_runner(pipeline, device, dtype, resolution, embeddings or [])
    else:
        sampler = _wadi_runner(
            pipeline or teacher, adapter, steps, guidance, alpha_bar_T, device, dtype, resolution,
            tokens,
        )  # fmt: skip
    if controls:
        sampler = _controlled(sampler, controls)
    if redilate is not None or disperse is not None:
        sampler = _redilated(sampler, resolution, redilate, disperse)
    written: list[Path] = []
    records = []
    bar = tqdm(total=len(prompts), desc="generate", unit="img", disable=not progress)
    with writing_output(out), atomic_directory(out) as tmp, bar:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            indices = list(range(start, start + len(batch)))
            images = sampler(batch, indices, seed)
            for i, prompt, image in zip(indices, batch, images):
                name = f"{i:05d}.png"
                _save_png(image, tmp / name)
                written.append(out / name)
                records.append({"file": name, "prompt": prompt, "seed": seed + i})
            bar.update(len(batch))
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (tmp / "images.jsonl").write_text(lines, encoding="utf-8")
    return written


def stock_resolution(pipe, denoiser, resolution: int | None) -> tuple[int, int]:
    """``(pixels, latent pixels)`` of the image side the stock pipeline samples at.

    The default is the pipeline's own (``default_sample_size``: FLUX's 128, SDXL's and SD3's
    ``sample_size``) times the VAE factor.  A side the latent patches do not tile (FLUX's
    2x2 packing, a DiT's ``patch_size``) is refused in one line before any image.
    """
    factor = pipe.vae_scale_factor
    native = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
    if isinstance(native, (list, tuple)):
        native = native[0]
    side = int(resolution or int(native) * factor)
    flux = type(pipe).__name__.startswith("Flux")
    patch = 2 if flux else int(getattr(denoiser.config, "patch_size", None) or 1)
    if side % (factor * patch):
        raise ValueError(
            f"--resolution {side} is not a multiple of {factor * patch} px (VAE factor {factor} "
            f"x the {type(denoiser).__name__}'s {patch}x{patch} latent patches); use "
            f"{max(factor * patch, side - side % (factor * patch))}"
        )
    return side, side // factor


def _read_embeddings(paths) -> dict:
    """``{token: vector}`` of the ``--embedding`` files, checked before any model loads."""
    from wadi.relation.embedding import read_embedding

    tokens = {}
    for path in paths:
        token, vector = read_embedding(path)
        if token in tokens:
            raise ValueError(f"two --embedding files hold the token {token}; give each once")
        tokens[token] = vector
    return tokens


def _check_one_clip(kind: str, two_encoders: bool, folder) -> None:
    if two_encoders or kind not in ("sd-unet", "StableDiffusionPipeline"):
        raise ValueError(
            f"--embedding supports SD 1.x/2.x (one CLIP text encoder); {folder} is {kind}"
        )


def _stock_runner(folder, device, dtype, resolution, embeddings=()):
    """Run the exported folder with its stock diffusers pipeline and the call its
    ``wadi_export.json`` records (steps, sigmas or timesteps, FLUX's guidance input)."""
    from diffusers import DiffusionPipeline

    from .export import absent_components, exported_call
    from .registry import reporting_damaged_files

    with reporting_damaged_files(folder):
        pipe = DiffusionPipeline.from_pretrained(
            folder, torch_dtype=dtype, **absent_components(folder)
        ).to(device)
    pipe.set_progress_bar_config(disable=True)
    if embeddings:
        from wadi.relation.embedding import check_token_embeddings

        _check_one_clip(type(pipe).__name__, "tokenizer_2" in pipe.components, folder)
        check_token_embeddings(pipe.tokenizer, pipe.text_encoder, _read_embeddings(embeddings))
    for path in embeddings:
        pipe.load_textual_inversion(str(path))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    factor = pipe.vae_scale_factor
    side, size = stock_resolution(pipe, denoiser, resolution)
    flux = type(pipe).__name__.startswith("Flux")
    # FLUX packs 2x2 latent patches into its 64 input channels; its latents are drawn
    # unpacked (16 channels), as wadi's route draws them, and packed for the call
    channels = denoiser.config.in_channels // (4 if flux else 1)
    extra = {}
    if type(pipe).__name__.startswith("PixArt"):
        extra = {"use_resolution_binning": False, "clean_caption": False}
    call = {**extra, **exported_call(folder)}
    steps = int(call.get("num_inference_steps", 1))
    flow = "FlowMatch" in type(pipe.scheduler).__name__

    def sample(batch, indices, seed):
        z = seeded_noise(indices, seed, (channels, size, size)).to(device=device, dtype=dtype)
        if flux:
            z = pipe._pack_latents(z, *z.shape)
        renoise = None
        if steps > 1:  # image i's re-noising draws: its own seeded generator
            renoise = [torch.Generator().manual_seed(RENOISE_SEED + seed + i) for i in indices]
        with torch.no_grad(), torch.random.fork_rng():
            if flow and steps > 1:
                # the stock SD3/FLUX calls do not hand their generator to the scheduler's
                # step: FlowMatchLCM re-noises from the global RNG, seeded per batch here
                torch.manual_seed(RENOISE_SEED + seed + indices[0])
            images = pipe(
                list(batch),
                **call,
                generator=renoise,
                latents=z,
                height=side,
                width=side,
                output_type="pt",
            ).images
        return images.float().cpu()

    sample.unet, sample.vae_scale_factor = denoiser, factor
    return sample


def set_resolution(backbone, resolution: int | None) -> int:
    """The image side to sample at (default: the teacher's own), told to the backbones that
    condition on it (SDXL's time ids, FLUX's resolution-dependent shift), as a run does."""
    if hasattr(backbone, "resolution"):  # SDXL, FLUX: the default is their own
        if resolution:
            backbone.resolution = int(resolution)
        return int(backbone.resolution)
    if resolution:
        return int(resolution)
    size = backbone.denoiser.config.sample_size
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) * backbone.vae_scale_factor


def _wadi_runner(
    folder, adapter, steps, guidance, alpha_bar_T, device, dtype, resolution, tokens=None
):
    """Teacher (+ LoRaD adapter) through :mod:`wadi.backbones`: the student's generator
    (one step, or the steps a multi-step export names) or DDIM with CFG."""
    from wadi.generators import OneStep

    from .export import exported_generator
    from .registry import load_backbone
    from .sampling import sample_multistep

    recipe = _run_recipe(adapter)
    backbone = load_backbone(
        folder, dtype=dtype, device=device, t5=recipe.t5 if recipe is not None else True
    )
    if recipe is not None and getattr(backbone, "guidance_embeds", False):
        backbone.guidance = recipe.guidance_scale  # FLUX.1-dev: the input it was trained at
    if tokens:
        from wadi.relation.embedding import add_token_embeddings

        _check_one_clip(backbone.kind, False, folder)
        add_token_embeddings(backbone.tokenizer, backbone.text_encoder, tokens)
    if adapter is not None:
        from wadi.lorad import load_adapter

        load_adapter(backbone.denoiser, adapter, "student")
    generator = exported_generator(folder)
    if recipe is not None:  # the generator the run trained (its timesteps and abar_T)
        from wadi.generators import make_generator

        generator = make_generator(recipe.timesteps, recipe.alpha_bar_T)
    if alpha_bar_T is not None:
        generator = OneStep(999, alpha_bar_T)
    size = backbone.latent_size(set_resolution(backbone, resolution))
    null = backbone.encode_prompts([""]) if steps > 1 else None

    def sample(batch, indices, seed):
        z = seeded_noise(indices, seed, (backbone.latent_channels, size, size))
        z = z.to(device=device, dtype=dtype)
        with torch.no_grad():
            cond = backbone.encode_prompts(list(batch))
            if steps == 1:
                renoise = torch.Generator().manual_seed(RENOISE_SEED + seed + indices[0])
                x0 = generator.sample(backbone, z, cond, renoise)
            else:
                x0 = sample_multistep(backbone, cond, null, z, steps=steps, guidance=guidance)
            images = backbone.decode(x0)
        return (images.float().cpu() / 2 + 0.5).clamp(0, 1)

    sample.unet, sample.vae_scale_factor = backbone.denoiser, backbone.vae_scale_factor
    return sample


def _run_recipe(adapter):
    """The config of the run an adapter folder comes from (``RUN/final/student_adapter`` or a
    checkpoint's), so teacher + adapter samples as the run trained: its generator, SD3's
    ``--no-t5``, FLUX.1-dev's guidance input.  None for a loose adapter folder."""
    if adapter is None:
        return None
    path = Path(adapter).resolve().parent / "config.yaml"
    if not path.is_file():
        return None
    from wadi.distill.config import DistillConfig

    return DistillConfig.load(path)


def _controlled(sampler, controls):
    """``sampler`` with the ControlNets' residuals in every U-Net call."""
    from wadi.controlnet import controlled

    def sample(batch, indices, seed):
        with controlled(sampler.unet, controls):
            return sampler(batch, indices, seed)

    sample.unet, sample.vae_scale_factor = sampler.unet, sampler.vae_scale_factor
    return sample


def _redilated(sampler, resolution, spec, disperse=None):
    """``sampler`` run inside :func:`wadi.highres.redilation` (checked before any image)."""
    from wadi.highres import redilation

    with redilation(sampler.unet, resolution, sampler.vae_scale_factor, spec, disperse):
        pass  # refuses a bad --redilate/--disperse/--resolution now, before the folder

    def sample(batch, indices, seed):
        with redilation(sampler.unet, resolution, sampler.vae_scale_factor, spec, disperse):
            return sampler(batch, indices, seed)

    return sample
