"""What a run tells its user at the start: one block of facts, and warnings about the recipe."""

from __future__ import annotations

from pathlib import Path

#: a student training more than this share of the base is hardly a low-rank adapter any more
MAX_STUDENT_SHARE = 0.5


def native_resolution(backbone) -> int:
    """The teacher's own image side: the denoiser's ``sample_size`` times the VAE factor."""
    own = getattr(backbone, "resolution", None)  # backbones that know it (SDXL, FLUX)
    if own:
        return int(own)
    size = backbone.denoiser.config.sample_size
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) * backbone.vae_scale_factor


def share_warning(config, counts: dict[str, int]) -> str | None:
    """A warning when a rank-based student trains more than half of the base's parameters."""
    if config.adapter == "full" or not counts["base"]:
        return None
    share = counts["student"] / counts["base"]
    if share <= MAX_STUDENT_SHARE:
        return None
    return (
        f"warning: the {config.adapter} student trains {counts['student']:,} parameters, "
        f"{share:.0%} of the base's {counts['base']:,}; lower --student-rank "
        f"(now {config.student_rank or 'the preset'})"
    )


def summary(config, backbone, counts, *, device, dtype, world, step, resume_from) -> str:
    """The start-of-run block: device, dtype, teacher, sizes, trainable shares, steps, folder."""
    base = counts["base"]

    def share(n: int) -> str:
        return f"{n:,} ({n / base:.2%} of the base's {base:,})" if base else f"{n:,}"

    latent = backbone.latent_size(config.resolution)
    start = f"from {Path(resume_from).name}" if resume_from is not None else "from scratch"
    student = config.adapter + (f", scope {config.full_scope}" if config.adapter == "full" else "")
    rows = [
        ("device", f"{device} ({world} process{'es' if world > 1 else ''}), dtype {dtype}"),
        ("teacher", f"{config.teacher} ({type(backbone).__name__})"),
        ("resolution", f"{config.resolution} px (latent {latent}x{latent})"),
        ("batch", _batch(config, world)),
        ("student", f"{student}: {share(counts['student'])} trainable"),
        ("fake score", f"lorad: {share(counts['fake'])} trainable"),
        ("steps", f"{step} -> {config.max_steps} ({start})"),
        ("generator", _generator(config)),
        ("output", str(Path(config.output_dir))),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"wadi distill: {k:<{width}}  {v}" for k, v in rows)


def _batch(config, world: int) -> str:
    k = config.gradient_accumulation_steps
    per_process = config.batch_size * k
    accumulated = f" ({config.batch_size} x {k} accumulated)" if k > 1 else ""
    return f"{per_process} per process{accumulated}, {per_process * world} in all"


def _generator(config) -> str:
    steps = config.timesteps
    kind = "one step" if len(steps) == 1 else f"{len(steps)} steps"
    return f"{kind} at t = {', '.join(map(str, steps))}, objective {config.objective}"
