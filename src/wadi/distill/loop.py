"""The WaDi training loop: one readable loop over the parts of a run.

Per step: the prompts of this process (a pure function of the step, so resuming
continues exactly), one iteration (generator update, then fake-score update(s):
:mod:`wadi.distill.iteration`), then the hooks (EMA, progress, TensorBoard, samples,
checkpoints: :mod:`wadi.distill.hooks`).  What the run holds is built in
:mod:`wadi.distill.run`; the objective, generator and adapters are parts chosen by the
config, so a new one never changes this file.  Another training recipe over the same
loop (fine-tuning: :mod:`wadi.finetune`) passes a :class:`Recipe`: its own run builder
(iteration, data, trained parts) and ``final/`` writer; lock, hooks, checkpoints and
resume stay this code.

Multi-process: every process holds the same frozen base; adapter gradients are averaged
with one all-reduce per optimizer step (:mod:`wadi.distill.distributed`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from . import report, run_dir
from .config import DistillConfig
from .data import batch_indices
from .distributed import all_true, barrier
from .hooks import default_hooks
from .roles import FAKE
from .run import DTYPES, NonFiniteError, build_run
from .run_state import write_final

__all__ = ["train", "TrainResult", "Recipe", "NonFiniteError", "batch_indices"]


@dataclass(frozen=True)
class Recipe:
    """What a training command brings to the loop (WaDi's by default): ``build_run(config,
    device, rank, world, resume, overwrite) -> (Run, config)``, ``write_final(run) -> Path``
    and ``summary(config, backbone, counts, **facts) -> str`` (the start block)."""

    build_run: Callable = build_run
    write_final: Callable = write_final
    summary: Callable = report.summary
    command: str = "wadi distill"


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


def train(
    config: DistillConfig,
    *,
    resume: str | None = None,
    overwrite: bool = False,
    callback: Callable[[int, dict], None] | None = None,
    callback_every: int = 0,
    recipe: Recipe | None = None,
) -> TrainResult:
    """Distill ``config.teacher`` into a one- or few-step student (see the module docstring).

    ``callback(step, context)`` runs on the main process every ``callback_every`` steps
    (and at step 0) with ``context`` holding ``backbone``, ``roles``, ``generator``,
    ``alpha_bar_T``, ``config`` and ``ema`` (the student's EMA tensors or None); it must
    not use the training RNG.  ``recipe`` swaps in another training recipe (see the module
    docstring).
    """
    from accelerate import PartialState

    from wadi.devices import resolve_device, warn_if_half_on_cpu

    recipe = recipe or Recipe()
    config.validate()
    config.check_inputs()
    if getattr(config, "fsdp", False) and callback is not None and callback_every:
        raise ValueError(
            "a callback runs on the main process only, but with --fsdp the denoiser needs "
            "every process; train without the callback or without fsdp"
        )
    config = config.with_absolute_paths()  # config.yaml then works from any folder
    wanted = resolve_device(config.device) if config.device else None  # one line if absent
    state = PartialState(cpu=wanted == "cpu")
    device, rank, world = state.device, state.process_index, state.num_processes
    if wanted is not None and wanted != "cpu" and state.num_processes == 1:
        device = torch.device(wanted)
    if rank == 0:
        warn_if_half_on_cpu(device, config.mixed_precision, recipe.command)
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
        result = _train(
            config, device, rank, world, resume, overwrite, callback, callback_every, recipe
        )
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


def _train(config, device, rank, world, resume, overwrite, callback, callback_every, recipe):
    """The loop itself, run while the main process holds the run folder's lock."""
    run, config = recipe.build_run(config, device, rank, world, resume, overwrite)
    summary = recipe.summary(
        config, run.backbone, run.counts, device=device, dtype=DTYPES[config.mixed_precision],
        world=world, step=run.step, resume_from=run.resume_from,
    )  # fmt: skip
    hooks = default_hooks(
        run,
        summary=summary,
        dtype=DTYPES[config.mixed_precision],
        callback=callback,
        callback_every=callback_every,
    )
    for hook in hooks:
        hook.on_start(run)
    history, t_start, steps_run = [], time.perf_counter(), 0
    while run.step < config.max_steps:
        indices = batch_indices(
            run.step, rank, world, config.global_batch, run.data.size, config.seed
        )
        result = run.iteration(run.data.get(indices), run.null_cond, run.shape, run.rng, run.step)
        run.step += 1
        steps_run += 1
        record = run.account(result)
        for hook in hooks:
            hook.on_step(run, record)
        history.append({k: v for k, v in record.items() if k != "skipped_now"})
    seconds = (time.perf_counter() - t_start) / steps_run if steps_run else math.nan
    for hook in hooks:
        hook.on_end(run)

    from wadi import lorad

    student_state = {k: v.detach().clone() for k, v in run.roles.student_named_state().items()}
    fake_state = (
        {k: v.detach().clone() for k, v in lorad.adapter_state_dict(run.roles.base, FAKE).items()}
        if run.roles.has_fake
        else {}
    )
    final_dir = recipe.write_final(run) if run.is_main else None
    barrier()
    return TrainResult(
        Path(config.output_dir), final_dir, run.step, run.skipped, history, seconds,
        student_state, fake_state, steps_run,
    )  # fmt: skip
