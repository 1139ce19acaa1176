"""DreamBooth with LoRaD: teach a base model a subject from a few images (``wadi finetune``).

The base's denoiser gets one adapter (LoRaD, or PEFT LoRA / DoRA on the same layers:
:class:`wadi.finetune.roles.FinetuneRoles`, the core's roles without a fake score) and is trained with the denoising
loss in the base's own parametrization (:meth:`Parametrization.target`: eps, v or the flow
velocity), ``t`` uniform on ``{t_min..t_max}``, on the subject's images captioned with the
instance prompt.  Prior preservation (DreamBooth's class-specific prior) adds the same loss
on class images the base generated itself with the class prompt (DDIM with CFG), weighted
by ``prior_weight``; they are generated once into ``OUTPUT/class-images`` and reused on
resume.

Per step, per process, with ``B`` = batch x accumulation instance latents ``x0``:

1. ``eps ~ N(0, I)``, ``t ~ U{t_min..t_max}``; with a prior, ``B`` class latents drawn
   uniformly with their own ``eps``, ``t``.  Every draw is made for the whole batch first.
2. Per micro-batch, one denoiser call on instance and class ``x_t`` side by side (student
   role); ``loss = mse(pred, target)_instance + prior_weight * mse(pred, target)_class``.
3. Clip, step (:class:`~wadi.distill.optim.OptimizerStep`).

The training loop, hooks, checkpoints, run-folder lock and resume are the core's
(:func:`wadi.distill.loop.train` with :data:`RECIPE`); this module only builds the run
and writes ``final/``.  In the loop's log records ``loss_generator`` is the total loss and
``loss_fake`` the prior term (nan without a prior): the names of the core's record.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from wadi.distill import run_dir
from wadi.distill.iteration import IterationResult
from wadi.distill.loop import Recipe

__all__ = [
    "DreamBoothIteration",
    "InstanceData",
    "build_run",
    "write_final",
    "class_images",
    "check_image_folder",
    "RECIPE",
    "finetune",
]

CLASS_IMAGES = "class-images"
CLASS_INFO = "class-images.json"


def _warn(message: str) -> None:
    import sys

    print(f"wadi finetune: {message}", file=sys.stderr, flush=True)


# -- inputs ------------------------------------------------------------------------------------


def check_image_folder(folder: str | Path) -> list[Path]:
    """The image files of ``folder``; one line for a missing or empty folder or a stray file."""
    from wadi.data.images import IMAGE_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ValueError(f"--images {folder} {what}; give a folder of the subject's images")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for p in files:
        if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(
                f"--images: {p} is not an image ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}); "
                "move it out of the folder or give a folder of images only"
            )
    if not files:
        raise ValueError(
            f"--images {folder} holds no images; put the subject's PNG/JPEG files in it"
        )
    return files


class InstanceData:
    """The subject's latents, indexed by the loop's per-step indices."""

    def __init__(self, latents: Tensor):
        self.latents = latents
        self.size = len(latents)

    def get(self, indices: list[int]) -> Tensor:
        return self.latents[torch.as_tensor(indices, device=self.latents.device)]


# -- class images (prior preservation) -----------------------------------------------------------


def _class_recipe(config, backbone) -> dict:
    return {
        "base": str(config.base),
        "class_prompt": config.class_prompt,
        "count": config.prior_images,
        "resolution": config.resolution,
        "steps": config.prior_steps,
        "guidance": config.prior_guidance,
        "seed": config.seed,
        "dtype": str(backbone.dtype),
    }


@torch.no_grad()
def class_images(backbone, roles, config, out: Path, batch_size: int = 8) -> Path:
    """``OUTPUT/class-images/00000.png ...``: the base's own samples of the class prompt.

    Image ``i`` is DDIM (``prior_steps``, CFG ``prior_guidance``) from noise seeded
    ``seed + i``, so the set does not depend on the batch size or on where an interrupted
    generation stopped.  Images already there for the same recipe (``class-images.json``)
    are kept; each file is written atomically, so a killed run resumes the set.
    """
    from wadi.backbones.generate import seeded_noise
    from wadi.backbones.sampling import sample_multistep
    from wadi.files import write_json
    from wadi.images import save_png, to_pil

    folder, info_path = out / CLASS_IMAGES, out / CLASS_INFO
    recipe = _class_recipe(config, backbone)
    previous = None
    if info_path.is_file():
        try:
            previous = json.loads(info_path.read_text())
        except (ValueError, UnicodeDecodeError):
            previous = None
    if previous != recipe and folder.is_dir():
        for old in folder.glob("*.png"):  # another recipe's images: a cache, replaced
            old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    write_json(info_path, recipe)
    names = [f"{i:05d}.png" for i in range(config.prior_images)]
    missing = [i for i, name in enumerate(names) if not (folder / name).is_file()]
    if not missing:
        return folder
    if config.progress:
        _warn(f"generating {len(missing)} class images ({config.class_prompt!r}) in {folder}")
    latent = backbone.latent_size(config.resolution)
    shape = (backbone.latent_channels, latent, latent)
    device = backbone.device
    cond_all = backbone.encode_prompts([config.class_prompt]).to(device)
    null = backbone.encode_prompts([""]).to(device)
    with roles.teacher():
        for start in range(0, len(missing), batch_size):
            idx = missing[start : start + batch_size]
            z = seeded_noise(idx, config.seed, shape).to(device=device, dtype=backbone.dtype)
            x0 = sample_multistep(
                backbone, cond_all.expand(len(idx)), null, z,
                steps=config.prior_steps, guidance=config.prior_guidance,
            )  # fmt: skip
            for i, image in zip(idx, to_pil(backbone.decode(x0.float()).float())):
                save_png(image, folder / names[i])
    return folder


# -- the iteration -------------------------------------------------------------------------------


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class DreamBoothIteration:
    """One DreamBooth step (module docstring) over a backbone with a student role.

    Called by the core's loop as ``iteration(x0, null_cond, shape, rng, step)`` with ``x0``
    the instance latents of this step (``null_cond`` is unused).
    """

    def __init__(
        self, backbone, roles, config, autocast, optimizers, instance_cond, class_cond=None,
        class_latents: Tensor | None = None,
    ):  # fmt: skip
        self.backbone, self.roles, self.config = backbone, roles, config
        self.autocast, self.student = autocast, optimizers["student"]
        self.param = backbone.parametrization
        self.instance_cond, self.class_cond = instance_cond, class_cond
        self.class_latents = class_latents
        if (class_cond is None) != (class_latents is None):
            raise ValueError("prior preservation needs both the class prompt and its images")

    def draws(self, x0: Tensor, rng: torch.Generator) -> dict:
        """Every random draw of one step, for the whole batch (noise, steps, class picks)."""
        n, device, c = len(x0), x0.device, self.config
        out = {
            "eps": torch.randn(x0.shape, generator=rng, device=device),
            "t": self.param.sample_timesteps(n, c.t_min, c.t_max, rng, device),
        }
        if self.class_latents is not None:
            out["pick"] = torch.randint(
                0, len(self.class_latents), (n,), generator=rng, device=device
            )
            out["eps_class"] = torch.randn(x0.shape, generator=rng, device=device)
            out["t_class"] = self.param.sample_timesteps(n, c.t_min, c.t_max, rng, device)
        return out

    def losses(self, x0: Tensor, draws: dict, s: slice) -> tuple[Tensor, Tensor | None]:
        """(instance loss, class loss or None) of micro-batch ``s``; run in the student role."""
        param, m = self.param, s.stop - s.start
        x0s, eps, t = x0[s].float(), draws["eps"][s], draws["t"][s]
        parts = [(x0s, eps, t, self.instance_cond.expand(m))]
        if self.class_latents is not None:
            xc = self.class_latents[draws["pick"][s]].float()
            parts.append(
                (xc, draws["eps_class"][s], draws["t_class"][s], self.class_cond.expand(m))
            )
        x_t = torch.cat([param.add_noise(a, e, tt) for a, e, tt, _ in parts])
        ts = torch.cat([tt for _, _, tt, _ in parts])
        cond = parts[0][3] if len(parts) == 1 else type(parts[0][3]).cat([p[3] for p in parts])
        target = torch.cat([param.target(a, e, tt) for a, e, tt, _ in parts])
        pred = self.backbone.predict(x_t.to(self.backbone.dtype), ts, cond)
        err = (pred.float() - target.float()).square().flatten(1).mean(1)
        loss_instance = err[:m].mean()
        return loss_instance, (err[m:].mean() if len(parts) > 1 else None)

    def __call__(self, x0, null_cond, shape, rng: torch.Generator, step: int) -> IterationResult:
        n = len(x0)
        draws = self.draws(x0, rng)
        total = prior = 0.0
        for s in _chunks(n, self.config.batch_size):
            share = (s.stop - s.start) / n
            with self.autocast(), self.roles.student():
                loss_i, loss_c = self.losses(x0, draws, s)
                loss = loss_i if loss_c is None else loss_i + self.config.prior_weight * loss_c
            self.student.backward(loss * share, self.roles.student)
            total += float(loss.detach()) * share
            if loss_c is not None:
                prior += float(loss_c.detach()) * share
        ok, norm = self.student.step(step)
        return IterationResult(
            total, prior if self.class_latents is not None else float("nan"),
            ok, True, norm, float("nan"),
        )  # fmt: skip


# -- the run --------------------------------------------------------------------------------------


def build_run(config, device, rank: int, world: int, resume, overwrite):
    """The DreamBooth run of ``config`` on this process (the core's :class:`Run`)."""
    from wadi.backbones import load_backbone
    from wadi.data.images import encode_images, load_image_folder
    from wadi.distill import report
    from wadi.distill.distributed import barrier
    from wadi.distill.optim import OptimizerStep
    from wadi.distill.run import DTYPES, Run
    from wadi.distill.run_state import load_checkpoint

    from .roles import FinetuneRoles

    is_main = rank == 0
    out = Path(config.output_dir)
    check_image_folder(config.images)
    resume_from = run_dir.prepare_output_dir(config, resume, overwrite, _warn if is_main else None)
    dtype = DTYPES[config.mixed_precision]
    backbone = load_backbone(config.base, dtype=dtype, device=device)
    if config.prior and getattr(backbone.scheduler, "betas", None) is None:
        raise ValueError(
            f"prior preservation samples class images with DDIM, which needs a DDPM-family "
            f"scheduler; {type(backbone.scheduler).__name__} (flow matching) has none: drop "
            "--class-prompt for this base"
        )
    if config.resolution is None:
        config = config.replace(resolution=report.native_resolution(backbone))
    if hasattr(backbone, "resolution"):
        backbone.resolution = config.resolution
    if getattr(backbone, "guidance_embeds", False):
        backbone.guidance = 1.0  # a guidance-distilled base is tuned at its neutral input
    channels = 3 if backbone.vae is not None else backbone.latent_channels
    images = load_image_folder(config.images, config.resolution, channels)  # one line if bad
    torch.manual_seed(config.seed)  # identical adapter initialisation on every process
    roles = FinetuneRoles(backbone, config.adapter, config.rank, config.include_conv)
    counts = roles.parameter_counts()
    if config.gradient_checkpointing:
        roles.enable_gradient_checkpointing()
    roles.train()
    with torch.no_grad():
        latents = encode_images(backbone, images.to(device, backbone.dtype)).float()
    instance_cond = backbone.encode_prompts([config.instance_prompt]).to(device)
    optimizers = {
        "student": OptimizerStep(
            "student", roles.student_parameters(), config.learning_rate, config, device
        )
    }
    autocast = functools.partial(
        torch.autocast, device.type, dtype=dtype, enabled=config.mixed_precision != "no"
    )
    # inputs are good: only now touch the output folder
    barrier()
    if is_main:
        if overwrite and not resume:
            run_dir.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    barrier()
    class_cond = class_latents = None
    if config.prior:
        if is_main:
            class_images(backbone, roles, config, out)
        barrier()
        with torch.no_grad():
            pixels = load_image_folder(out / CLASS_IMAGES, config.resolution, channels)
            class_latents = encode_images(backbone, pixels.to(device, backbone.dtype)).float()
        class_latents = class_latents[: config.prior_images]
        class_cond = backbone.encode_prompts([config.class_prompt]).to(device)
    iteration = DreamBoothIteration(
        backbone, roles, config, autocast, optimizers, instance_cond, class_cond, class_latents
    )
    latent = backbone.latent_size(config.resolution)
    run = Run(
        config=config,
        backbone=backbone,
        roles=roles,
        data=InstanceData(latents),
        generator=None,
        iteration=iteration,
        optimizers=optimizers,
        ema=None,
        rng=torch.Generator(device).manual_seed(config.seed * 7919 + rank),
        null_cond=None,
        shape=(config.global_batch, backbone.latent_channels, latent, latent),
        counts=counts,
        rank=rank,
        world=world,
        resume_from=resume_from,
    )
    if resume_from is not None:
        load_checkpoint(resume_from, run)
    return run, config


def save_finetuned_adapter(roles, directory: Path, config) -> Path:
    """``final/adapter``: wadi's LoRaD format (role ``finetune``), or for LoRA/DoRA the PEFT
    tensors (``adapter_model.safetensors``) and their layer list (``adapter_config.json``)."""
    from wadi import lorad
    from wadi.distill import checkpoint as ckpt
    from wadi.distill.roles import STUDENT
    from wadi.distill.students import preset_layer_names
    from wadi.files import write_json

    if roles.adapter == "lorad":
        return lorad.save_adapter(roles.base, directory, STUDENT, role="finetune")
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in roles.student_named_state().items()}
    ckpt.save_tensors(state, directory / lorad.io.WEIGHTS_NAME)
    write_json(
        directory / "adapter_config.json",
        {
            "wadi_adapter": roles.adapter,
            "role": "finetune",
            "rank": config.rank,
            "lora_alpha": config.rank,
            "target_modules": preset_layer_names(roles.base, roles.student_config),
            "note": "PEFT tensors; the merged model is ../pipeline",
        },
    )
    return directory


def write_final(run) -> Path:
    """``OUTPUT/final``: ``adapter/``, ``config.yaml``, ``summary.json`` and (unless
    ``--no-export``) ``pipeline/``: the tuned denoiser merged, with the base's own scheduler."""
    from wadi.backbones.export import save_pipeline
    from wadi.files import atomic_directory, write_json

    config, roles = run.config, run.roles
    final = Path(config.output_dir) / "final"
    with atomic_directory(final) as tmp:
        config.save(tmp / "config.yaml")
        save_finetuned_adapter(roles, tmp / "adapter", config)
        summary = {
            "adapter": roles.adapter,
            "rank": config.rank,
            "trainable": run.counts["student"],
            "steps": run.step,
            "prediction_type": run.backbone.prediction_type,
        }
        if config.export_pipeline:
            merged = roles.merged_student()
            save_pipeline(run.backbone, merged, tmp / "pipeline", scheduler=run.backbone.scheduler)
            summary["pipeline"] = "pipeline"
            summary["sample_with"] = (
                "wadi generate --teacher final/pipeline --steps 25 --guidance 3"
            )
        write_json(tmp / "summary.json", summary)
    return final


def summary(config, backbone, counts, *, device, dtype, world, step, resume_from) -> str:
    """The start-of-run block of ``wadi finetune``."""
    base = counts["base"]
    share = f"{counts['student']:,} ({counts['student'] / base:.2%} of the base's {base:,})"
    start = f"from {Path(resume_from).name}" if resume_from is not None else "from scratch"
    prior = (
        f"{config.prior_images} class images of {config.class_prompt!r}, weight "
        f"{config.prior_weight}"
        if config.prior
        else "off (no --class-prompt)"
    )
    rows = [
        ("device", f"{device} ({world} process{'es' if world > 1 else ''}), dtype {dtype}"),
        ("base", f"{config.base} ({type(backbone).__name__}, {backbone.prediction_type})"),
        ("images", f"{config.images} with {config.instance_prompt!r}"),
        ("prior", prior),
        ("adapter", f"{config.adapter} rank {config.rank}: {share} trainable"),
        ("resolution", f"{config.resolution} px"),
        ("batch", f"{config.global_batch} per process ({world * config.global_batch} in all)"),
        ("steps", f"{step} -> {config.max_steps} ({start})"),
        ("output", str(Path(config.output_dir))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"wadi finetune: {k:<{width}}  {v}" for k, v in rows)


RECIPE = Recipe(
    build_run=build_run, write_final=write_final, summary=summary, command="wadi finetune"
)


@dataclass
class FinetuneResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    steps_run: int
    seconds_per_step: float
    history: list
    adapter_state: dict


def finetune(config, *, resume: str | None = None, overwrite: bool = False) -> FinetuneResult:
    """Run DreamBooth for ``config`` (a :class:`~wadi.finetune.config.FinetuneConfig`) with the
    core's loop, checkpoints and resume; returns where ``final/`` is and the adapter's tensors."""
    from wadi.distill.loop import train

    result = train(config, resume=resume, overwrite=overwrite, recipe=RECIPE)
    return FinetuneResult(
        result.output_dir, result.final_dir, result.steps, result.steps_run,
        result.seconds_per_step, result.history, result.student_state,
    )  # fmt: skip
