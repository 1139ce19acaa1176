"""``--fsdp``: the frozen base denoiser sharded across processes with FSDP2 (``fully_shard``).

Every block of the denoiser (each entry of ``down_blocks``, ``mid_block``, ``up_blocks``,
``transformer_blocks``, ``single_transformer_blocks``) is its own FSDP unit, the denoiser
the root unit holding the rest (embeddings, ``conv_in``/``conv_out``, final norm).  Each
process keeps ``1/N`` of every frozen weight; a unit's weights are all-gathered when its
forward starts, freed when it ends, and gathered again for backward.

The adapters are *not* sharded: every trained tensor (LoRaD ``lorad_A``/``lorad_B``, PEFT
``lora_*``) is passed to ``fully_shard`` as ``ignored_params``, so it stays a plain tensor,
whole on every process, with a whole optimizer state; its gradient is averaged by the
run's one flat all-reduce as without FSDP (:mod:`wadi.distill.distributed`).  No frozen
weight ever gets a gradient, so FSDP itself only all-gathers (no reduce-scatter).  The
reasons, and what sharding the adapters too would cost, are in ``docs/design.md``.

Checkpoints hold only the adapters (whole tensors), the same files with and without
``--fsdp``.  ``final/pipeline`` needs the merged full weights: the main process loads the
teacher's denoiser again, unsharded, copies the trained adapters into it and merges
(:func:`plain_roles`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["block_names", "check_process_group", "shard_base", "shard_bytes", "plain_roles"]

#: module lists whose entries are the blocks of a U-Net or DiT denoiser (diffusers names)
BLOCK_LISTS = ("down_blocks", "up_blocks", "transformer_blocks", "single_transformer_blocks")
#: single modules that are blocks
BLOCK_MODULES = ("mid_block",)


def block_names(denoiser: nn.Module) -> list[str]:
    """Module names of the denoiser's blocks, each one FSDP unit."""
    names = []
    for attr in BLOCK_LISTS:
        blocks = getattr(denoiser, attr, None)
        if isinstance(blocks, nn.ModuleList):
            names += [f"{attr}.{i}" for i in range(len(blocks))]
    for attr in BLOCK_MODULES:
        if isinstance(getattr(denoiser, attr, None), nn.Module):
            names.append(attr)
    return names


def check_process_group(world: int, device: torch.device) -> None:
    """One line unless this run can shard: several processes whose backend all-gathers on ``device``.

    FSDP2 unshards with ``all_gather_into_tensor``; one such call on a 2-element tensor
    per process tells whether the backend does it on this device (gloo on CPU and nccl on
    GPUs do; nccl cannot on CPU, gloo cannot on GPU tensors).
    """
    if world < 2 or not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "--fsdp shards the frozen base across processes, but this run has 1 process; launch "
            "it with `accelerate launch --num_processes N` (or torchrun) with N >= 2, or drop "
            "--fsdp"
        )
    backend = dist.get_backend()
    probe = torch.ones(2, device=device)
    out = torch.empty(2 * world, device=device)
    try:
        dist.all_gather_into_tensor(out, probe)
    except (RuntimeError, ValueError, NotImplementedError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--fsdp: the process group's backend {backend!r} cannot all-gather {device.type} "
            f"tensors ({first}); use gloo on CPU or nccl on GPUs, or drop --fsdp"
        ) from None


def shard_base(roles, device: torch.device, world: int) -> list[str]:
    """Shard ``roles.base`` in place: each block one unit, then the root; returns the block names.

    Adapter tensors (whatever requires a gradient on the base, and every LoRaD / PEFT
    factor, trained or frozen like DoRA's fixed magnitude) are left whole.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = roles.base
    keep = {
        p for n, p in base.named_parameters() if p.requires_grad or "lorad_" in n or "lora_" in n
    }
    blocks = block_names(base)
    if not blocks:
        raise ValueError(
            f"--fsdp: {type(base).__name__} has none of the blocks wadi shards "
            f"({', '.join(BLOCK_LISTS + BLOCK_MODULES)}); drop --fsdp for this teacher"
        )
    mesh = init_device_mesh(device.type, (world,))
    for name in blocks:
        block = base.get_submodule(name)
        fully_shard(block, mesh=mesh, ignored_params=keep & set(block.parameters()))
    fully_shard(base, mesh=mesh, ignored_params=keep)
    return blocks


def shard_bytes(module: nn.Module) -> dict[str, int]:
    """Parameter bytes this process holds: ``sharded`` (its local FSDP shards) and ``whole``
    (plain tensors: the adapters, or everything without FSDP)."""
    from torch.distributed.tensor import DTensor

    sharded = whole = 0
    for p in module.parameters():
        if isinstance(p, DTensor):
            local = p.to_local()
            sharded += local.numel() * local.element_size()
        else:
            whole += p.numel() * p.element_size()
    return {"sharded": sharded, "whole": whole}


def plain_roles(run):
    """Unsharded roles for export: the teacher's denoiser loaded again on this process
    (no text encoder), with the run's trained student (and fake) tensors copied in."""
    from wadi import lorad
    from wadi.backbones import load_backbone

    from .roles import FAKE, Roles

    config, roles = run.config, run.roles
    fresh = load_backbone(
        config.teacher,
        dtype=run.backbone.dtype,  # the dtype the run loaded the base in
        device=run.backbone.device,
        load_text_encoder=False,
    )
    stub = SimpleNamespace(
        denoiser=fresh.denoiser,
        student_preset=run.backbone.student_preset,
        fake_preset=run.backbone.fake_preset,
    )
    plain = Roles(
        stub,
        config.adapter,
        config.student_rank,
        config.fake_rank,
        config.include_conv,
        config.full_scope,
    )
    with torch.no_grad():
        target = plain.student_named_state()
        for name, value in roles.student_named_state().items():
            target[name].copy_(value)
        if getattr(roles, "has_fake", True):
            target = lorad.adapter_state_dict(plain.base, FAKE)
            for name, value in lorad.adapter_state_dict(roles.base, FAKE).items():
                target[name].copy_(value)
    return plain
