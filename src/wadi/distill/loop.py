"""The WaDi training loop: VSD with a LoRaD student and a LoRaD fake score on one frozen base.

One iteration (method.md section 4), per process, batch of prompts ``c``:

1. ``x0 = G(z, c)`` with the student (gradient kept).
2. ``t ~ U{20..980}``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
3. No gradient: ``eps_real`` = teacher with CFG, ``eps_fake`` = fake score with CFG.
4. Generator loss ``0.5 * mean((x0 - sg(x0 - g))^2)``, ``g = (1 - abar_t)(eps_real - eps_fake)``;
   clip, step.
5. Fake-score loss on ``x0.detach()`` with fresh noise, ``t ~ U{0..999}``, 10 % null
   prompts; step.  With ``fake_updates = k > 1`` this repeats k - 1 more times, each on a
   fresh student sample (no gradient) of the same prompts.

Multi-process: every process holds the same frozen base; adapter gradients are
averaged with one all-reduce per update (no DDP wrapper, so two adapters on one
module and two backward passes per iteration need no special casing).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint as ckpt
from . import report, run_dir
from .config import DistillConfig
from .losses import add_noise, fake_score_loss, generator_loss, sample_timesteps
from .roles import FAKE, Roles

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    skipped_steps: int
    history: list[dict] = field(default_factory=list)
    seconds_per_step: float = float("nan")  # of the steps run in this call only (nan: none)
    student_state: dict = field(default_factory=dict)  # this process's trained tensors
    fake_state: dict = field(default_factory=dict)
    steps_run: int = 0  # steps run in this call (steps minus the resumed ones)


# -- data order ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(step: int, rank: int, world: int, batch: int, n: int, seed: int) -> list[int]:
    """Prompt indices of process ``rank`` at ``step``: a seeded permutation per epoch.

    The position in the data is a pure function of the step, so resuming at a
    step continues exactly where the interrupted run was.
    """
    start = step * batch * world + rank * batch
    out = []
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        out.append(_epoch_permutation(n, seed, epoch)[i])
    return out


class PromptSource:
    """Text conditions for prompt indices: encoded on the fly or read from `wadi embed` files."""

    def __init__(self, config: DistillConfig, backbone, device):
        self.backbone, self.device = backbone, device
        if config.embeddings:
            from wadi.data.embeddings import EmbeddingStore

            self.store = EmbeddingStore(config.embeddings)
            self.prompts = None
            self.size = len(self.store)
        else:
            from wadi.data.prompts import load_prompts

            self.store = None
            self.prompts = load_prompts(config.prompts, column=config.prompt_column)
            self.size = len(self.prompts)

    def get(self, indices: list[int]):
        if self.store is not None:
            return self.store.get(indices).to(self.device)
        return self.backbone.encode_prompts([self.prompts[i] for i in indices]).to(self.device)

    def null(self):
        if self.store is not None:
            return self.store.null(1).to(self.device)
        return self.backbone.encode_prompts([""]).to(self.device)

    def text(self, i: int) -> str:
        return self.prompts[i] if self.prompts is not None else f"#{i}"


# -- distributed helpers -----------------------------------------------------------------------


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def average_gradients(params: list[nn.Parameter]) -> None:
    """Average ``.grad`` over processes with one flat all-reduce (missing grads count as 0)."""
    world = _world()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


def all_true(flag: bool, device) -> bool:
    """Whether ``flag`` holds on every process."""
    if _world() == 1:
        return flag
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return int(t.item()) == 0


# -- optimisation ---------------------------------------------------------------------------------


def make_optimizer(params, lr: float, config: DistillConfig) -> torch.optim.Optimizer:
    kwargs = dict(
        lr=lr, betas=tuple(config.adam_betas), eps=config.adam_eps, weight_decay=config.weight_decay
    )
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "optimizer adamw8bit needs bitsandbytes; `pip install bitsandbytes` or use --optimizer adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def lr_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up, then constant (the paper: constant)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


class Update:
    """One optimizer with its parameters, grad scaler and skip bookkeeping."""

    def __init__(self, name, params, lr, config, device):
        self.name, self.params, self.base_lr = name, params, lr
        self.optimizer = make_optimizer(params, lr, config)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
        self.max_grad_norm = config.max_grad_norm
        self.device = device

    def run(self, loss: torch.Tensor, role, step: int, warmup: int) -> tuple[bool, float]:
        """Backward (inside ``role``), average, clip, step.  Returns (applied, grad norm)."""
        if not all_true(bool(torch.isfinite(loss)), self.device):
            self.optimizer.zero_grad(set_to_none=True)
            return False, float("nan")
        with role():
            self.scaler.scale(loss).backward()
        average_gradients(self.params)  # before unscale: every process then sees the same inf/nan
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        finite = bool(torch.isfinite(norm))
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * lr_factor(step, warmup)
        if finite or self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # the fp16 scaler itself skips inf/nan steps
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return finite, float(norm)

    def optimizer_files(self):
        return ckpt.optimizer_to_files(self.optimizer)


# -- one iteration ------------------------------------------------------------------------------------


def vsd_iteration(
    backbone,
    roles,
    student,
    fake,
    cond,
    null_cond,
    shape,
    abar,
    alpha_bar_T,
    config,
    generator,
    autocast,
    step,
):
    """One WaDi iteration (steps 1-5 of the module docstring); returns losses, success flags, norms."""
    from wadi.backbones import one_step

    device = abar.device
    # 1-4: generator update
    z = torch.randn(shape, generator=generator, device=device)
    with autocast(), roles.student():
        x0 = one_step(backbone, z, cond, alpha_bar_T, config.generator_timestep)
    t = sample_timesteps(len(z), config.generator_t_min, config.generator_t_max, generator, device)
    eps = torch.randn(shape, generator=generator, device=device)
    x_t = add_noise(x0.detach().float(), eps, abar[t])
    with torch.no_grad(), autocast():
        with roles.teacher():
            eps_real = backbone.predict_eps_cfg(x_t, t, cond, null_cond, config.guidance_scale)
        with roles.fake():
            eps_fake = backbone.predict_eps_cfg(x_t, t, cond, null_cond, config.guidance_scale)
    loss_g = generator_loss(x0, eps_real, eps_fake, abar[t])
    ok_g, norm_g = student.run(loss_g, roles.student, step, config.warmup_steps)

    # 5: fake-score update on the same x0, fresh noise and timesteps, 10 % null prompts
    x0 = x0.detach().float()
    ok_f = True
    for k in range(config.fake_updates):
        if k > 0:  # further updates (two time-scale rule): a fresh sample of the moved student
            z = torch.randn(shape, generator=generator, device=device)
            with torch.no_grad(), autocast(), roles.student():
                x0 = one_step(backbone, z, cond, alpha_bar_T, config.generator_timestep).float()
        eps2 = torch.randn(shape, generator=generator, device=device)
        t2 = sample_timesteps(len(z), config.fake_t_min, config.fake_t_max, generator, device)
        keep = torch.rand(len(z), generator=generator, device=device) >= config.null_prompt_prob
        x_t2 = add_noise(x0, eps2, abar[t2])
        with autocast(), roles.fake():
            eps_pred = backbone.predict_eps(x_t2, t2, cond.where(keep, null_cond))
        loss_f = fake_score_loss(eps_pred, eps2, abar[t2])
        ok, norm_f = fake.run(loss_f, roles.fake, step, config.warmup_steps)
        ok_f = ok_f and ok
    return loss_g.detach(), loss_f.detach(), ok_g, norm_g, ok_f, norm_f


# -- the loop -----------------------------------------------------------------------------------------


def train(
    config: DistillConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    callback: Callable[[int, dict], None] | None = None,
    callback_every: int = 0,
) -> TrainResult:
    """Distill ``config.teacher`` into a one-step student.  See the module docstring.

    ``callback(step, context)`` runs on the main process every
    ``callback_every`` steps (and at step 0) with ``context`` holding
    ``backbone``, ``roles``, ``alpha_bar_T``, ``config`` and ``ema`` (the student's EMA
    tensors or None); it must not use the training RNG.
    """
    from accelerate import PartialState

    config.validate()
    config.check_inputs()
    config = config.with_absolute_paths()  # config.yaml then works from any folder
    from wadi.devices import resolve_device, warn_if_half_on_cpu

    wanted = resolve_device(config.device) if config.device else None  # one line if absent
    state = PartialState(cpu=wanted == "cpu")
    device, rank, world = state.device, state.process_index, state.num_processes
    if wanted is not None and wanted != "cpu" and state.num_processes == 1:
        device = torch.device(wanted)
    if rank == 0:
        warn_if_half_on_cpu(device, config.mixed_precision, "wadi distill")
    if dist.is_available() and dist.is_initialized():
        # the launcher's process group is the truth (accelerate on CPU may report one process)
        rank, world = dist.get_rank(), dist.get_world_size()
    # one run per folder: the main process holds the lock for the whole run
    lock, error = (run_dir.RunLock(config.output_dir), None) if rank == 0 else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except ValueError as err:
            error = err
    if not all_true(error is None, device):
        raise error or ValueError(f"the main process could not lock {config.output_dir}")
    try:
        result = _train(config, device, rank, world, resume, overwrite, callback, callback_every)
    except BaseException as err:
        if lock is not None:
            lock.release_after_failure()
        if isinstance(err, OSError):  # a full disk or read-only folder: one line naming it
            line = run_dir.place_error(err, Path(config.output_dir))
            if line is not err:
                raise line from err
        raise
    if lock is not None:
        lock.release()
    return result


def _train(config, device, rank, world, resume, overwrite, callback, callback_every):
    """The body of :func:`train`, run while the main process holds the run folder's lock."""
    from wadi.backbones import alpha_bar_from_scheduler, load_backbone

    is_main = rank == 0
    out = Path(config.output_dir)

    resume_from = run_dir.prepare_output_dir(
        config, resume, overwrite, run_dir.warn if is_main else None
    )

    dtype = DTYPES[config.mixed_precision]
    backbone = load_backbone(
        config.teacher, dtype=dtype, device=device, load_text_encoder=not config.embeddings
    )
    if config.resolution is None:  # the teacher's own size, recorded in config.yaml
        config = config.replace(resolution=report.native_resolution(backbone))
    torch.manual_seed(config.seed)  # identical adapter initialisation on every process
    roles = Roles(
        backbone,
        config.adapter,
        config.student_rank,
        config.fake_rank,
        config.include_conv,
        config.full_scope,
    )
    counts = roles.parameter_counts()
    if is_main and (warning := report.share_warning(config, counts)):
        run_dir.warn(warning)
    if config.gradient_checkpointing:
        roles.enable_gradient_checkpointing()
    roles.train()
    data = PromptSource(config, backbone, device)
    if data.size == 0:
        raise ValueError("the prompt source holds no prompts")
    null_cond = data.null()
    abar = backbone.alphas_cumprod().to(device)
    alpha_bar_T = config.alpha_bar_T or alpha_bar_from_scheduler(
        backbone.scheduler, config.generator_timestep
    )
    latent = backbone.latent_size(config.resolution)
    shape = (config.batch_size, backbone.latent_channels, latent, latent)

    student = Update("student", roles.student_parameters(), config.lr_student, config, device)
    fake = Update("fake", roles.fake_parameters(), config.lr_fake, config, device)
    # inputs are good: only now touch the output folder
    _barrier()
    if is_main:
        if overwrite and not resume:
            run_dir.clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
    _barrier()
    ema = (
        {k: v.detach().float().clone() for k, v in roles.student_named_state().items()}
        if config.ema_decay
        else None
    )
    generator = torch.Generator(device).manual_seed(config.seed * 7919 + rank)
    step, skipped, in_a_row = 0, 0, 0

    if resume_from is not None:
        step, skipped, in_a_row = _load_checkpoint(
            resume_from, roles, student, fake, ema, generator, rank, world
        )

    autocast = functools.partial(
        torch.autocast, device.type, dtype=dtype, enabled=config.mixed_precision != "no"
    )
    writer = _summary_writer(out) if is_main else None
    history: list[dict] = []
    bar = None
    if is_main and config.progress:
        text = report.summary(
            config, backbone, counts, device=device, dtype=dtype, world=world, step=step,
            resume_from=resume_from,
        )  # fmt: skip
        print(text, file=sys.stderr, flush=True)
    if is_main and config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.max_steps,
            initial=step,
            desc="wadi distill",
            unit="step",
            dynamic_ncols=True,
        )
    context = {
        "backbone": backbone,
        "roles": roles,
        "alpha_bar_T": alpha_bar_T,
        "config": config,
        "ema": ema,
    }
    if callback and is_main and callback_every and step == 0:
        callback(0, context)
    t_start, steps_run = time.perf_counter(), 0

    while step < config.max_steps:
        indices = batch_indices(step, rank, world, config.batch_size, data.size, config.seed)
        cond = data.get(indices)

        loss_g, loss_f, ok_g, norm_g, ok_f, norm_f = vsd_iteration(
            backbone, roles, student, fake, cond, null_cond, shape, abar, alpha_bar_T,
            config, generator, autocast, step,
        )  # fmt: skip
        step += 1
        steps_run += 1
        if ok_g and ok_f:
            in_a_row = 0
            if ema is not None:
                _ema_update(ema, roles.student_named_state(), config.ema_decay)
        else:
            skipped += 1
            in_a_row += 1
            if is_main:
                print(
                    f"wadi distill: step {step} skipped (non-finite loss or gradients), {in_a_row} in a row"
                )
            if in_a_row >= config.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{in_a_row} non-finite steps in a row at step {step}; lower the learning rates, use "
                    "bf16 instead of fp16, or raise max_nonfinite_steps"
                )
        record = {
            "step": step,
            "loss_generator": float(loss_g),
            "loss_fake": float(loss_f),
            "grad_norm_student": norm_g,
            "grad_norm_fake": norm_f,
            "skipped": skipped,
        }
        history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                gen=f"{record['loss_generator']:.3g}", fake=f"{record['loss_fake']:.3g}"
            )
        if writer is not None and (step % config.log_every == 0 or step == config.max_steps):
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, step)
            writer.add_scalar("train/lr_student", student.optimizer.param_groups[0]["lr"], step)
        if is_main and config.validation_prompts and step % config.validate_every == 0:
            _validate(config, backbone, roles, alpha_bar_T, step, out, writer, dtype)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            _save_checkpoint(
                config, roles, student, fake, ema, generator, step, skipped, in_a_row, rank, world
            )
        if callback and is_main and callback_every and step % callback_every == 0:
            callback(step, context)

    seconds = (time.perf_counter() - t_start) / steps_run if steps_run else math.nan
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    from wadi import lorad

    student_state = {k: v.detach().clone() for k, v in roles.student_named_state().items()}
    fake_state = {
        k: v.detach().clone() for k, v in lorad.adapter_state_dict(roles.base, FAKE).items()
    }
    final_dir = None
    if is_main:
        final_dir = _write_final(config, backbone, roles, ema, alpha_bar_T, out)
    _barrier()
    return TrainResult(
        out, final_dir, step, skipped, history, seconds, student_state, fake_state, steps_run
    )


def _ema_update(ema: dict, current: dict, decay: float) -> None:
    with torch.no_grad():
        for name, value in current.items():
            ema[name].lerp_(value.detach().float(), 1 - decay)


def _summary_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but logging must never stop a run
        return None
    return SummaryWriter(str(out / "logs"))


# -- checkpoints --------------------------------------------------------------------------------------


def _save_checkpoint(
    config, roles, student, fake, ema, generator, step, skipped, in_a_row, rank, world
):
    out = Path(config.output_dir)
    tmp = ckpt.checkpoint_root(out) / f".tmp-{ckpt.step_dir_name(step)}"
    try:
        _write_checkpoint(
            tmp, config, roles, student, fake, ema, generator, step, skipped, in_a_row, rank, world
        )
    except OSError:  # nothing partial: the temporary folder goes (a full disk, ...)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if rank == 0 and config.progress:
        from tqdm.auto import tqdm

        final = ckpt.checkpoint_root(out) / ckpt.step_dir_name(step)
        tqdm.write(f"wadi distill: checkpoint of step {step} in {final}", file=sys.stderr)


def _write_checkpoint(
    tmp, config, roles, student, fake, ema, generator, step, skipped, in_a_row, rank, world
):
    out = Path(config.output_dir)
    if rank == 0:
        tmp = ckpt.begin(out, step)
    _barrier()
    ckpt.save_tensors(ckpt.rng_state(generator), tmp / f"rng-rank{rank}.safetensors")
    _barrier()
    if rank == 0:
        _write_weights(tmp, config, roles, ema)
        for update in (student, fake):
            tensors, meta = update.optimizer_files()
            ckpt.save_tensors(tensors, tmp / f"optimizer_{update.name}.safetensors")
            ckpt.write_json(meta, tmp / f"optimizer_{update.name}.json")
        state = {
            "step": step,
            "skipped_steps": skipped,
            "nonfinite_in_a_row": in_a_row,
            "world_size": world,
            "scaler": {u.name: u.scaler.state_dict() for u in (student, fake)},
        }
        ckpt.write_json(state, tmp / "state.json")
        ckpt.commit(tmp, config.keep_checkpoints)
    _barrier()


def _load_checkpoint(path: Path, roles, student, fake, ema, generator, rank, world):
    state = ckpt.read_state(path)
    if state["world_size"] != world:
        raise ValueError(
            f"checkpoint {path} was written by {state['world_size']} processes, this run has {world}; "
            "resume with the same number of processes"
        )
    current = roles.student_named_state()
    saved = ckpt.load_tensors(path / "student.safetensors")
    if set(saved) != set(current):
        raise ValueError(
            f"checkpoint {path} does not fit this student ({roles.adapter}); was the config changed?"
        )
    with torch.no_grad():
        for name, value in saved.items():
            current[name].copy_(value)
        from wadi import lorad

        fake_state = ckpt.load_tensors(path / "fake_adapter" / lorad.io.WEIGHTS_NAME)
        layers = dict(lorad.lorad_layers(roles.base))
        for key, value in fake_state.items():
            module, _, which = key.rpartition(".")
            getattr(layers[module], which)[FAKE].copy_(value)
        if ema is not None:
            for name, value in ckpt.load_tensors(path / "ema.safetensors").items():
                ema[name].copy_(value)
    for update in (student, fake):
        tensors = ckpt.load_tensors(path / f"optimizer_{update.name}.safetensors")
        meta = json.loads((path / f"optimizer_{update.name}.json").read_text())
        ckpt.optimizer_from_files(update.optimizer, tensors, meta)
        if state.get("scaler", {}).get(update.name):
            update.scaler.load_state_dict(state["scaler"][update.name])
    rng_file = path / f"rng-rank{rank}.safetensors"
    ckpt.set_rng_state(generator, ckpt.load_tensors(rng_file))
    return state["step"], state["skipped_steps"], state["nonfinite_in_a_row"]


# -- validation and final outputs ---------------------------------------------------------------------


@torch.no_grad()
def _validate(config, backbone, roles, alpha_bar_T, step, out, writer, dtype):
    """One-step samples of the validation prompts with fixed noise, saved as a PNG grid."""
    from wadi.backbones import one_step
    from wadi.images import save_image_grid

    prompts = config.validation_prompts
    g = torch.Generator(backbone.device).manual_seed(
        config.seed
    )  # own generator: training RNG untouched
    latent = backbone.latent_size(config.resolution)
    z = torch.randn(
        (len(prompts), backbone.latent_channels, latent, latent),
        generator=g,
        device=backbone.device,
    )
    cond = (
        backbone.encode_prompts(prompts).to(backbone.device)
        if backbone.text_encoder is not None
        else None
    )
    if cond is None:
        return
    autocast = torch.autocast(backbone.device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast, roles.student():
        x0 = one_step(backbone, z, cond, alpha_bar_T, config.generator_timestep)
    images = backbone.decode(x0.float())
    path = out / "samples" / f"{ckpt.step_dir_name(step)}.png"
    grid = save_image_grid(images, path, nrow=min(len(prompts), 8))
    if writer is not None:
        writer.add_image("validation", grid, step)


def _write_weights(folder: Path, config, roles, ema) -> None:
    """What both checkpoints and ``final/`` hold: config, student, fake adapter, EMA."""
    from wadi import lorad

    config.save(folder / "config.yaml")
    ckpt.save_tensors(roles.student_named_state(), folder / "student.safetensors")
    if roles.adapter == "lorad":
        lorad.save_adapter(roles.base, folder / "student_adapter", "student")
    lorad.save_adapter(roles.base, folder / "fake_adapter", FAKE)
    if ema is not None:
        ckpt.save_tensors(ema, folder / "ema.safetensors")


def _write_final(config, backbone, roles, ema, alpha_bar_T, out: Path) -> Path:
    """``OUTPUT/final``: student (and EMA) adapters, fake adapter, config, merged pipeline."""
    from wadi.files import atomic_directory

    final = out / "final"
    with atomic_directory(final) as tmp:
        _write_weights(tmp, config, roles, ema)
        summary = {"alpha_bar_T": alpha_bar_T, "adapter": roles.adapter}
        if config.export_pipeline:
            use_ema = ema is not None and config.export_ema
            merged = roles.merged_student(ema if use_ema else None)
            summary["pipeline_weights"] = "ema" if use_ema else "student"
            backbone.save_pipeline(merged, tmp / "pipeline", alpha_bar_T)
            summary["pipeline"] = "pipeline"
        ckpt.write_json(summary, tmp / "summary.json")
    return final
