"""Export a merged one-step student as a stock diffusers pipeline folder.

The folder holds the merged denoiser, the teacher's VAE, text encoder and
tokenizer, and a DDIM scheduler set up so that ONE step from t = 999 is
exactly the one-step generator of method.md section 3:
``timestep_spacing="trailing"`` (the single timestep is 999),
``set_alpha_to_one=True`` (the step lands on abar = 1, i.e. x0), no clipping
or thresholding.  ``pipe(prompt, num_inference_steps=1, guidance_scale=1.0)``
then equals :func:`wadi.backbones.onestep.one_step`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from wadi.files import atomic_directory
from wadi.paths import writing_output

from .base import Backbone
from .onestep import alpha_bar_from_scheduler, check_alpha_bar

__all__ = [
    "exported_generator",
    "exported_call",
    "absent_components",
    "student_scheduler",
    "pipeline_call",
    "one_step_scheduler",
    "save_pipeline",
    "export_student",
    "check_export_output",
    "DTYPES",
    "parse_dtype",
]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"`` / ``"bf16"`` / ``"fp32"`` (or a torch dtype) as a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def one_step_scheduler(teacher_scheduler, alpha_bar_T: float | None = None):
    """A ``DDIMScheduler`` whose single step from t = 999 is the one-step generator.

    With ``alpha_bar_T`` different from the teacher's abar at t = 999, the last
    trained beta is changed so that the scheduler's ``alphas_cumprod[999]``
    equals ``alpha_bar_T`` (to float32 precision); the other betas are the teacher's.
    """
    from diffusers import DDIMScheduler

    config = dict(teacher_scheduler.config)
    settings = dict(
        timestep_spacing="trailing",
        set_alpha_to_one=True,
        clip_sample=False,
        thresholding=False,
        steps_offset=1,  # unused by trailing spacing; 1 keeps StableDiffusionPipeline quiet
        rescale_betas_zero_snr=False,
        prediction_type=config.get("prediction_type", "epsilon"),
    )
    betas = torch.as_tensor(teacher_scheduler.betas, dtype=torch.float32).clone()
    num = betas.shape[0]
    if num != 1000:
        raise ValueError(f"the teacher's scheduler has {num} training timesteps; wadi expects 1000")
    if alpha_bar_T is not None:
        target = check_alpha_bar(alpha_bar_T)
        if target != alpha_bar_from_scheduler(teacher_scheduler, num - 1):
            previous = float(torch.cumprod(1.0 - betas, 0)[num - 2].to(torch.float64))
            last = 1.0 - target / previous
            if last < 0:
                warnings.warn(
                    f"alpha_bar_T={target} is above the teacher's abar at t=998 ({previous:.3g}); "
                    "the exported scheduler's last beta is negative, which is exact for 1-step "
                    "sampling only",
                    stacklevel=2,
                )
            betas[num - 1] = last
            settings["trained_betas"] = betas.tolist()
    scheduler = DDIMScheduler.from_config(config, **settings)
    if alpha_bar_T is not None:
        got = alpha_bar_from_scheduler(scheduler, num - 1)
        if abs(got - alpha_bar_T) > 1e-6 * alpha_bar_T:
            raise RuntimeError(f"could not set abar_999 to {alpha_bar_T} (got {got})")
    return scheduler


def student_scheduler(teacher_scheduler, generator):
    """The stock scheduler whose sampling is ``generator`` (:mod:`wadi.generators`).

    - one step at t = 999: :func:`one_step_scheduler` (DDIM, trailing);
    - one step at t < 999: the same on the teacher's first ``t + 1`` betas, so the single
      trailing timestep is ``t`` with the teacher's own ``abar_t`` (same model input);
    - several steps: ``LCMScheduler`` on the teacher's schedule, called with
      ``timesteps=generator.timesteps`` (what DMD2 ships); its boundary scalings are
      within 1e-7 of the identity at t >= 20.

    Flow-matching teachers (SD3, FLUX) get :func:`flow_student_scheduler`.
    """
    from diffusers import DDIMScheduler, LCMScheduler

    steps = list(generator.timesteps)
    num = int(teacher_scheduler.config.num_train_timesteps)
    if steps[0] >= num:
        raise ValueError(f"generator timestep {steps[0]} is outside the teacher's 0..{num - 1}")
    if "FlowMatch" in type(teacher_scheduler).__name__:
        return flow_student_scheduler(teacher_scheduler, generator)
    if len(steps) == 1 and steps[0] == num - 1:
        return one_step_scheduler(teacher_scheduler, generator.alpha_bar_T)
    if generator.alpha_bar_T is not None:
        raise ValueError(
            "alpha_bar_T can only be exported for a one-step generator at t = 999; drop "
            "--alpha-bar-T or use the default generator timesteps"
        )
    config = dict(teacher_scheduler.config)
    prediction = config.get("prediction_type", "epsilon")
    if len(steps) == 1:
        t = steps[0]
        betas = torch.as_tensor(teacher_scheduler.betas, dtype=torch.float32)[: t + 1]
        return DDIMScheduler.from_config(
            config,
            num_train_timesteps=t + 1,
            trained_betas=betas.tolist(),
            timestep_spacing="trailing",
            set_alpha_to_one=True,
            clip_sample=False,
            thresholding=False,
            steps_offset=1,
            rescale_betas_zero_snr=False,
            prediction_type=prediction,
        )
    return LCMScheduler.from_config(
        config,
        prediction_type=prediction,
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=True,
        rescale_betas_zero_snr=False,
        trained_betas=torch.as_tensor(teacher_scheduler.betas, dtype=torch.float32).tolist(),
    )


def flow_student_scheduler(teacher_scheduler, generator):
    """The stock scheduler of ``generator`` for a flow-matching teacher (teacher's config).

    One step: ``FlowMatchEulerDiscreteScheduler``; from sigma ``s`` its Euler step to 0 is
    ``x - s v``, the generator's x0, exactly.  Several steps: ``FlowMatchLCMScheduler``
    (x0 = x - s v, re-noised to the next sigma with fresh noise, as :class:`MultiStep`).
    Both are called with the generator's unshifted sigmas ``(t + 1) / T``
    (:func:`pipeline_call`); the scheduler applies the teacher's shift to them.
    """
    import diffusers

    if generator.alpha_bar_T is not None:
        raise ValueError(
            "alpha_bar_T applies to DDPM schedules; drop it for flow-matching teachers"
        )
    name = (
        "FlowMatchEulerDiscreteScheduler" if generator.num_steps == 1 else "FlowMatchLCMScheduler"
    )
    scheduler_cls = getattr(diffusers, name, None)
    if scheduler_cls is None:
        raise ValueError(
            f"diffusers {diffusers.__version__} has no {name}; export a one-step generator "
            "or upgrade diffusers"
        )
    return scheduler_cls.from_config(dict(teacher_scheduler.config))


def pipeline_call(backbone, generator) -> dict:
    """The keyword arguments of the stock pipeline call that reproduces ``generator``."""
    from .parametrization import FlowMatchingParametrization

    call = {"num_inference_steps": generator.num_steps, "guidance_scale": 1.0}
    param = backbone.parametrization
    flow = isinstance(param, FlowMatchingParametrization)
    last = param.num_train_timesteps - 1
    if flow and list(generator.timesteps) != [last]:
        # unshifted levels: the stock scheduler shifts them to the generator's sigmas
        num = param.num_train_timesteps
        call["sigmas"] = [(t + 1) / num for t in generator.timesteps]
    elif generator.num_steps > 1:
        call["timesteps"] = list(generator.timesteps)
    if backbone.kind == "pixart":
        # the stock default maps a request to the nearest trained aspect bucket
        call["use_resolution_binning"] = False
    if backbone.kind == "flux" and getattr(backbone, "guidance", None) is not None:
        # FLUX.1-dev's guidance embedding: the value the student was trained with
        call["guidance_scale"] = float(backbone.guidance)
    return call


def exported_generator(folder: str | os.PathLike):
    """The generator an exported folder was written for (``wadi_export.json``).

    Folders without the file (a teacher, an older export) give the one-step generator at
    t = 999.  An exported scheduler already holds the trained ``abar_T``, so none is set.
    """
    from wadi.generators import OneStep, make_generator

    path = Path(folder) / "wadi_export.json"
    if not path.is_file():
        return OneStep(999)
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-export the student") from None
    return make_generator(info.get("timesteps") or [999])


def exported_call(folder: str | os.PathLike) -> dict:
    """The stock pipeline call ``wadi_export.json`` records (:func:`pipeline_call`).

    Exports that predate the record (and teacher folders) get the call of their
    :func:`exported_generator`: its steps and timesteps, no guidance.
    """
    path = Path(folder) / "wadi_export.json"
    if path.is_file():
        try:
            call = json.loads(path.read_text()).get("pipeline_call")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}); re-export the student") from None
        if isinstance(call, dict):
            return dict(call)
    generator = exported_generator(folder)
    call = {"num_inference_steps": generator.num_steps, "guidance_scale": 1.0}
    if generator.num_steps > 1:
        call["timesteps"] = list(generator.timesteps)
    return call


def absent_components(folder: str | os.PathLike) -> dict:
    """``{name: None}`` for the components ``model_index.json`` lists as ``[null, null]``.

    ``DiffusionPipeline.from_pretrained`` refuses a folder whose required component is
    absent unless it is passed as ``None``: an SD3 export without T5 (``text_encoder_3``).
    """
    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{index} is not valid JSON ({err}); the folder looks damaged") from None
    return {
        name: None
        for name, value in data.items()
        if not name.startswith("_") and isinstance(value, list) and value == [None, None]
    }


def _cast_safetensors(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite every floating tensor in ``*.safetensors`` under ``directory`` to ``dtype``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(directory.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {}
            for key in f.keys():
                t = f.get_tensor(key)
                tensors[key] = t.to(dtype) if t.is_floating_point() else t
        save_file(tensors, str(path), metadata=metadata)
    for config in directory.glob("*/config.json"):
        data = json.loads(config.read_text())
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = str(dtype).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_pipeline(
    backbone: Backbone,
    denoiser: nn.Module,
    directory: str | os.PathLike,
    alpha_bar_T: float | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    generator=None,
    scheduler=None,
) -> Path:
    """Write a stock diffusers pipeline folder with ``denoiser`` (merged, plain modules).

    ``generator`` (default: one step at t = 999 with ``alpha_bar_T``) picks the scheduler
    (:func:`student_scheduler`); ``wadi_export.json`` records the stock call that
    reproduces it.

    The folder is built under a temporary name next to ``directory`` and
    renamed into place at the end; an existing ``directory`` is replaced only
    then.  ``dtype`` casts the saved weights (the modules in memory are unchanged).
    Pixel-space teachers (no VAE) get the same layout without ``vae/``; they
    load with :func:`wadi.backbones.load_backbone`.
    ``scheduler`` (a multi-step model, e.g. a ``wadi finetune`` result) is written as it
    is instead; ``wadi_export.json`` then records no one-step call.
    """
    from wadi.lorad import lorad_layers

    if any(True for _ in lorad_layers(denoiser)):
        raise ValueError(
            "the denoiser still holds LoRaD wrappers; call wadi.lorad.merge_and_unload(denoiser, "
            "name) before saving a pipeline"
        )
    dtype = parse_dtype(dtype)
    own = scheduler is not None
    if own and (generator is not None or alpha_bar_T is not None):
        raise ValueError("a pipeline with its own scheduler takes no generator or alpha_bar_T")
    if generator is None:
        from wadi.generators import OneStep

        generator = OneStep(999, alpha_bar_T)
    elif alpha_bar_T is not None and generator.alpha_bar_T is None:
        raise ValueError("pass alpha_bar_T through the generator, not beside it")
    if not own:
        scheduler = student_scheduler(backbone.scheduler, generator)
    pipeline_cls, components = backbone._pipeline_components(denoiser, scheduler)
    directory = Path(directory)
    with writing_output(directory), atomic_directory(directory) as tmp:
        if backbone.vae is None:
            _save_pixel_pipeline(tmp, backbone, components)
        else:
            pipeline_cls(**components).save_pretrained(tmp, safe_serialization=True)
        if dtype is not None:
            _cast_safetensors(tmp, dtype)
        if own:  # a multi-step model: sampled as a base (wadi generate --teacher DIR --steps 25)
            info = {
                "teacher": str(backbone.path) if backbone.path else None,
                "kind": backbone.kind,
                "scheduler": type(scheduler).__name__,
                "multi_step_model": True,
            }
            (tmp / "wadi_export.json").write_text(json.dumps(info, indent=2) + "\n")
            return directory
        call = pipeline_call(backbone, generator)
        info = {
            "teacher": str(backbone.path) if backbone.path else None,
            "kind": backbone.kind,
            "scheduler": type(scheduler).__name__,
            **generator.to_dict(),
            "alpha_bar_T": alpha_bar_from_scheduler(scheduler, generator.timesteps[0])
            if hasattr(scheduler, "alphas_cumprod")
            else None,  # flow matching: no abar
            **call,
            "pipeline_call": call,
        }
        (tmp / "wadi_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return directory


def _save_pixel_pipeline(tmp: Path, backbone: Backbone, components: dict) -> None:
    import diffusers

    names = {"unet": "unet", "transformer": "transformer"}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    for key in ("text_encoder", "tokenizer", "scheduler", *names):
        module = components.get(key)
        if module is None:
            continue
        module.save_pretrained(tmp / key)
        index[key] = [type(module).__module__.split(".")[0], type(module).__name__]
    index["vae"] = [None, None]
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def check_export_output(
    out: str | os.PathLike, overwrite: bool, *inputs: str | os.PathLike | None
) -> Path:
    """Refuse an export ``out`` that is a file, non-empty without ``overwrite``, unwritable,
    or that is, contains or lies inside one of ``inputs`` (teacher, adapter, checkpoint, run).

    Called before anything loads, so a bad ``--out`` costs one line and no time.
    """
    from wadi.paths import check_output_folder, check_output_separate

    out = check_output_folder(out, overwrite=overwrite)
    check_output_separate(out, *inputs)
    return out


def export_student(
    teacher: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    alpha_bar_T: float | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> Path:
    """Load ``teacher``, merge the LoRaD student adapter in ``adapter_dir``, save the pipeline to ``out``.

    Refuses to replace a non-empty ``out`` unless ``overwrite``, and any ``out`` that
    overlaps the teacher or the adapter (see :func:`check_export_output`); ``out`` is
    only touched once the new folder is complete.  The adapter must be a student (a
    run's ``fake_adapter`` is refused by its recorded role).
    """
    from wadi.lorad import load_adapter, merge_and_unload
    from wadi.lorad.io import adapter_role, require_role

    from .registry import load_backbone

    out = check_export_output(out, overwrite, teacher, adapter_dir)
    dtype = parse_dtype(dtype)
    if alpha_bar_T is not None:
        check_alpha_bar(alpha_bar_T)
    if not Path(adapter_dir).is_dir():
        raise FileNotFoundError(f"adapter folder {adapter_dir} not found")
    require_role(adapter_dir, ("student", "finetune"))
    # a wadi finetune adapter tunes a multi-step model: it keeps the base's own scheduler
    tuned = adapter_role(adapter_dir) == "finetune"
    if tuned and alpha_bar_T is not None:
        raise ValueError("--alpha-bar-T is for one-step students; a finetune adapter takes none")
    backbone = load_backbone(teacher, dtype=torch.float32, device=device)
    load_adapter(backbone.denoiser, adapter_dir, "student")
    denoiser = merge_and_unload(backbone.denoiser, "student")
    if tuned:
        return save_pipeline(backbone, denoiser, out, dtype=dtype, scheduler=backbone.scheduler)
    return save_pipeline(backbone, denoiser, out, alpha_bar_T, dtype=dtype)
