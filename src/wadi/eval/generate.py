"""``wadi eval generate``: one image per caption from a stock diffusers pipeline folder.

Works for an exported one-step student (``steps=1``) and a multi-step teacher alike,
in latent space (a folder with ``vae/``: run by its stock diffusers pipeline) or in
pixel space (no ``vae/``, such as the digits teacher and its exported students: run by
:mod:`wadi.backbones`, whose one-step generator and DDIM sampler equal the pipeline's).
Image ``i`` is ``{i:05d}.png`` and its noise comes from a CPU generator seeded with
``seed + i``, so it does not depend on batching, on the number of processes or on the
GPU.  Finished images are skipped (resume), the work is split across processes with
accelerate, and ``generation.json`` records every knob that shapes the images.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np

from wadi.eval.paths import check_output_dir
from wadi.eval.protocol import Captions, sha256_json
from wadi.files import write_json
from wadi.paths import writing_output

SIDECAR = "generation.json"
# knobs that decide the pixels: resuming with any of them changed would mix two runs
IMAGE_KNOBS = (
    "model_sha256",
    "steps",
    "guidance",
    "resolution",
    "seed",
    "seeding",
    "dtype",
    "captions_list_sha256",
    "pipeline_kwargs",
)


def image_name(index: int, total: int) -> str:
    """File name of caption ``index``: zero-padded to at least 5 digits."""
    return f"{index:0{max(5, len(str(total - 1)))}d}.png"


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over a pipeline folder: configs and denoiser weights by content, others by size.

    The denoiser (``unet/``, ``transformer/``) is what differs between students and
    teachers; hashing the text encoder and VAE too would read gigabytes on every resume.
    """
    from wadi.eval.inception import file_sha256

    folder = Path(folder)
    # a wadi export's model card is documentation, not the model: writing or refreshing it
    # (scores added) must not make the same weights look like another model
    card = {"README.md", "wadi_scores.json"} if (folder / "wadi_export.json").is_file() else ()
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in card:
            continue
        by_content = path.suffix in (".json", ".txt", ".model") or rel.split("/")[0] in (
            "unet",
            "transformer",
        )
        entries.append([rel, file_sha256(path) if by_content else path.stat().st_size])
    return sha256_json(entries)


def is_finished(path: Path, resolution: int | None) -> bool:
    """True for a PNG that decodes fully (at the expected size): a finished image."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.load()
            return resolution is None or im.size == (resolution, resolution)
    except Exception:  # noqa: BLE001 - truncated or corrupt: generate again
        return False


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 HWC image through a temporary name, so no partial PNG is ever left."""
    from PIL import Image

    from wadi.files import atomic_file

    with atomic_file(path) as tmp:
        Image.fromarray(array).save(tmp)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] (``output_type="np"``) to uint8, rounding like PIL export."""
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def load_pipeline(model: str | Path, dtype, device):
    """A stock diffusers pipeline from a local folder; the safety checker is switched off."""
    from diffusers import DiffusionPipeline

    model = _check_model_folder(model)
    if is_pixel_space(model):
        raise ValueError(
            f"{model} has no vae/ (a pixel-space model): the stock diffusers pipelines need "
            "one; `wadi eval generate` runs it through wadi.backbones instead"
        )
    from wadi.backbones.export import absent_components

    pipe = DiffusionPipeline.from_pretrained(
        model, torch_dtype=dtype, local_files_only=True, **absent_components(model)
    )  # absent: an SD3 export without T5 (text_encoder_3 None)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # it blacks out images and would bias FID
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _check_model_folder(model: str | Path) -> Path:
    model = Path(model).expanduser()
    if not model.is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    if not (model / "model_index.json").is_file():
        raise ValueError(
            f"{model} is not a diffusers pipeline folder (model_index.json missing); "
            "export a student with `wadi export` or point at a teacher pipeline folder"
        )
    return model


def is_pixel_space(model: str | Path) -> bool:
    """True for a folder without ``vae/``: its denoiser works on pixels, not VAE latents."""
    return not (Path(model).expanduser() / "vae").is_dir()


class _StockSampler:
    """A latent-space folder through its stock diffusers pipeline (``output_type="np"``)."""

    def __init__(self, model: Path, dtype, device, resolution: int | None):
        from wadi.backbones.export import exported_call
        from wadi.backbones.generate import stock_resolution

        self.pipe = pipe = load_pipeline(model, dtype, device)
        denoiser = getattr(pipe, "unet", None) or pipe.transformer
        # the pipeline's own default size (FLUX's transformer has no sample_size)
        self.resolution = stock_resolution(pipe, denoiser, resolution)[0]
        self.pipeline_kwargs = {}
        if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
            self.pipeline_kwargs["use_resolution_binning"] = False  # keep the size asked for
        self.export_call = exported_call(model) if (model / "wadi_export.json").is_file() else None
        self.describe = {
            "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__,
            "scheduler_config": dict(pipe.scheduler.config),
        }

    def use_export_call(self, steps: int, guidance: float) -> None:
        """An exported student sampled as exported (its steps, no CFG) gets the stock call
        its ``wadi_export.json`` records: the sigmas/timesteps of its generator, and FLUX.1-dev's
        guidance input (a value > 1 there is an embedding the student was trained with)."""
        call = self.export_call
        if call is None or steps != call.get("num_inference_steps") or guidance > 1.0:
            return
        extra = {
            k: v for k, v in call.items() if k not in ("num_inference_steps", "guidance_scale")
        }
        if float(call.get("guidance_scale", 1.0)) > 1.0:
            extra["guidance_scale"] = float(call["guidance_scale"])
        self.pipeline_kwargs.update(extra)

    def __call__(self, prompts, indices, seed, steps, guidance) -> np.ndarray:
        import torch

        generators = [torch.Generator("cpu").manual_seed(seed + i) for i in indices]
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance}
        kwargs.update(self.pipeline_kwargs)
        flow_renoise = steps > 1 and "FlowMatch" in type(self.pipe.scheduler).__name__
        with torch.inference_mode(), torch.random.fork_rng():
            if flow_renoise:  # the stock SD3/FLUX calls re-noise from the global RNG
                torch.manual_seed(seed + indices[0])
            out = self.pipe(
                prompt=list(prompts),
                height=self.resolution,
                width=self.resolution,
                generator=generators,
                output_type="np",
                **kwargs,
            ).images
        return np.asarray(out)


class _PixelSampler:
    """A pixel-space folder (no VAE) through :mod:`wadi.backbones`.

    One step without guidance is :func:`wadi.backbones.onestep.one_step` with the folder's
    ``alpha_bar_T`` (what an exported student's stock scheduler computes); otherwise DDIM
    with classifier-free guidance (:func:`wadi.backbones.sampling.sample_multistep`).  The
    noise of image ``i`` comes from ``torch.Generator('cpu').manual_seed(seed + i)``
    exactly as the stock pipelines draw it.
    """

    def __init__(self, model: Path, dtype, device, resolution: int | None):
        from wadi.backbones.onestep import alpha_bar_from_scheduler
        from wadi.backbones.registry import load_backbone

        self.backbone = backbone = load_backbone(model, dtype=dtype, device=device)
        self.dtype, self.device = dtype, device
        self.resolution = resolution or int(backbone.denoiser.config.sample_size)
        self.size = backbone.latent_size(self.resolution)
        self.alpha_bar_T = alpha_bar_from_scheduler(backbone.scheduler)
        from wadi.backbones.export import exported_generator

        self.generator = exported_generator(model)  # one step, or the export's timesteps
        self.null = None
        self.pipeline_kwargs = {}
        self.describe = {
            "pipeline": f"wadi.backbones ({type(backbone).__name__}, pixel space)",
            "scheduler": type(backbone.scheduler).__name__,
            "scheduler_config": dict(backbone.scheduler.config),
        }

    def sampler_for(self, steps: int, guidance: float) -> str:
        if steps == 1 and guidance <= 1.0:
            return f"wadi.generators.{self.generator!r}, alpha_bar_T={self.alpha_bar_T!r}"
        return "wadi.backbones.sampling.sample_multistep (DDIM trailing, eta 0, CFG)"

    def __call__(self, prompts, indices, seed, steps, guidance) -> np.ndarray:
        import torch

        from wadi.backbones.generate import RENOISE_SEED, seeded_noise
        from wadi.backbones.sampling import sample_multistep

        shape = (self.backbone.latent_channels, self.size, self.size)
        z = seeded_noise(indices, seed, shape).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            cond = self.backbone.encode_prompts(list(prompts))
            if steps == 1 and guidance <= 1.0:
                renoise = torch.Generator().manual_seed(RENOISE_SEED + seed + indices[0])
                x0 = self.generator.sample(self.backbone, z, cond, renoise)
            else:
                if self.null is None:
                    self.null = self.backbone.encode_prompts([""])
                scale = max(float(guidance), 1.0)  # <= 1: no guidance, as in diffusers
                x0 = sample_multistep(self.backbone, cond, self.null, z, steps, scale)
            images = self.backbone.decode(x0)
        return (images.float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _check_sidecar(path: Path, knobs: dict) -> None:
    old = json.loads(path.read_text())
    changed = [k for k in IMAGE_KNOBS if old.get(k) != knobs.get(k)]
    if changed:
        k = changed[0]
        raise ValueError(
            f"{path.parent} holds images made with other settings ({k}: {old.get(k)!r} there, "
            f"{knobs.get(k)!r} now); use a new --output-dir"
        )


def generate_images(
    model: str | Path,
    captions: Captions,
    output_dir: str | Path,
    *,
    steps: int = 1,
    guidance: float = 0.0,
    resolution: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    dtype: str | None = None,
    protocol: str | None = None,
) -> dict:
    """Generate the missing images of ``captions`` into ``output_dir``; returns the sidecar.

    Runs in every process of an ``accelerate launch``; each takes its share of the
    unfinished caption indices.  Guidance <= 1 means no classifier-free guidance
    (diffusers' convention), as for a one-step student.  ``resolution`` None is the
    model's own size (the denoiser's sample size times the VAE factor: 512 for SD1.5,
    16 for the digits teacher).
    """
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from wadi import __version__
    from wadi.backbones.export import parse_dtype

    if steps < 1 or (resolution is not None and resolution < 8) or batch_size < 1:
        raise ValueError(
            f"steps ({steps}), resolution ({resolution}) and batch size ({batch_size}) "
            "must be positive (resolution at least 8)"
        )
    # several processes without CUDA (torchrun on CPUs): accelerate needs cpu=True to use gloo
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    state = PartialState(cpu=multi_cpu or os.environ.get("ACCELERATE_USE_CPU") in ("1", "true"))
    if dtype is None:  # half precision on accelerators, float32 on CPU
        dtype = "float32" if state.device.type == "cpu" else "float16"
    torch_dtype = parse_dtype(dtype)
    output_dir = check_output_dir(output_dir)  # a file or read-only: refused before any work
    model = _check_model_folder(model)
    sampler_cls = _PixelSampler if is_pixel_space(model) else _StockSampler
    sampler = sampler_cls(model, torch_dtype, state.device, resolution)
    if isinstance(sampler, _StockSampler):
        sampler.use_export_call(steps, guidance)
    resolution = sampler.resolution
    pipeline_kwargs = sampler.pipeline_kwargs
    knobs = {
        "model": str(model.resolve()),
        "model_sha256": model_fingerprint(model),
        **sampler.describe,
        "steps": steps,
        "guidance": guidance,
        "resolution": resolution,
        "seed": seed,
        "seeding": "torch.Generator('cpu').manual_seed(seed + caption_index), one per image",
        "dtype": str(torch_dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "pipeline_kwargs": pipeline_kwargs,
        "safety_checker": "disabled",
        "space": "pixel" if isinstance(sampler, _PixelSampler) else "latent",
        "sampler": (
            sampler.sampler_for(steps, guidance)
            if isinstance(sampler, _PixelSampler)
            else "the stock diffusers pipeline's __call__"
        ),
        "protocol": protocol,
        "captions": captions.describe(),
        "captions_list_sha256": captions.list_sha256,  # the texts, wherever the file lives
        "file_names": f"{{caption_index:0{len(image_name(0, len(captions))) - 4}d}}.png",
        "num_processes": state.num_processes,
        "versions": _versions(),
        "wadi": __version__,
    }
    sidecar = output_dir / SIDECAR
    if sidecar.is_file():  # every process checks, so a refusal cannot leave others waiting
        _check_sidecar(sidecar, knobs)
    state.wait_for_everyone()
    if state.is_main_process:
        with writing_output(sidecar):
            output_dir.mkdir(parents=True, exist_ok=True)
            write_json(sidecar, knobs, sort_keys=True)
    state.wait_for_everyone()

    total = len(captions)
    todo = [
        i for i in range(total) if not is_finished(output_dir / image_name(i, total), resolution)
    ]
    with state.split_between_processes(todo) as mine:
        batches = [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]
        bar = tqdm(
            total=len(mine),
            desc=f"generate [{state.process_index}]",
            unit="img",
            position=state.process_index,
        )
        for batch in batches:
            out = sampler([captions.texts[i] for i in batch], batch, seed, steps, guidance)
            for i, image in zip(batch, to_uint8(out)):
                if image.shape[-1] == 1:  # one channel (the digits): a greyscale PNG
                    image = image[..., 0]
                path = output_dir / image_name(i, total)
                with writing_output(path):  # a full disk: finished images stay, a rerun resumes
                    save_png(image, path)
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    knobs["skipped_finished"] = total - len(todo)
    return knobs


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
