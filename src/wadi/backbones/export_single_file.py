"""One-file checkpoints in the original Stable Diffusion key layout (A1111, ComfyUI).

A diffusers pipeline folder (a ``wadi export``, or any SD 1.x / 2.x / SDXL folder) becomes
one ``.safetensors`` with the LDM names ``model.diffusion_model.*`` (U-Net),
``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.*`` (CLIP text
encoder; SDXL: ``conditioner.embedders.0.transformer.*`` and the OpenCLIP layout
``conditioner.embedders.1.model.*``).

How the map is built: diffusers ships the FORWARD conversion only
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``; their fixed names in ``DIFFUSERS_TO_LDM_MAPPING``).
Here the fixed names are inverted from that table, the block names follow the same
block arithmetic the forward converters use (``input_blocks.{1 + b * (layers + 1) + l}``
...), and every file is checked before it is written: a probe state dict (each tensor a
distinct constant, zero-copy ``expand``) goes through the inverse map and then through
diffusers' own forward converters, which must give every tensor back, under its own name,
exactly once (:func:`check_round_trip`).  So what diffusers' ``from_single_file`` reads is
exactly the student, for any architecture the converters know.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch

from wadi.files import atomic_file, write_json
from wadi.paths import check_output_separate, writing_output

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "unet_key_map",
    "vae_key_map",
    "clip_key_map",
    "open_clip_key_map",
    "to_single_file",
    "check_round_trip",
    "read_pipeline_folder",
    "scheduler_note",
    "note_path",
    "save_single_file",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."

_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION_LEAVES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _mapping():
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    return DIFFUSERS_TO_LDM_MAPPING


def _unmapped(component: str, key: str) -> ValueError:
    return ValueError(
        f"{component} tensor {key!r} has no place in the original Stable Diffusion layout; "
        "single-file export supports SD 1.x/2.x and SDXL pipelines (use --format diffusers)"
    )


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_LEAVES.get(head, head)}.{tail}"


def unet_key_map(keys, config: dict) -> dict[str, str]:
    """diffusers U-Net key -> LDM key (without ``model.diffusion_model.``), one entry per key."""
    fixed = {}
    table = _mapping()["unet"]
    fixed.update(table["layers"])
    if config.get("addition_embed_type") == "text_time":
        fixed.update(table["addition_embed_type"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        fixed.update(table["class_embed_type"])
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ValueError("single-file export needs one layers_per_block for every U-Net level")
    span = per_block + 1
    keys = list(keys)
    up_attention = {
        int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }
    out = {}
    for key in keys:
        if key in fixed:
            out[key] = fixed[key]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = 1 + b * span + layer
            out[key] = (
                f"input_blocks.{i}.0.{_resnet(rest)}"
                if kind == "resnets"
                else f"input_blocks.{i}.1.{rest}"
            )
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[key] = f"input_blocks.{1 + int(m[1]) * span + per_block}.0.op.{m[2]}"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[key] = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
            out[key] = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
            i = b * span + layer
            out[key] = (
                f"output_blocks.{i}.0.{_resnet(rest)}"
                if kind == "resnets"
                else f"output_blocks.{i}.1.{rest}"
            )
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            slot = 2 if b in up_attention else 1
            out[key] = f"output_blocks.{b * span + per_block}.{slot}.conv.{m[2]}"
        else:
            raise _unmapped("U-Net", key)
    return out


def vae_key_map(keys, config: dict) -> dict[str, str]:
    """diffusers VAE key -> LDM key (without ``first_stage_model.``)."""
    fixed = dict(_mapping()["vae"])
    levels = len(config["up_block_types"])
    out = {}
    for key in keys:
        if key in fixed:
            out[key] = fixed[key]
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[key] = (
                f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
            )
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[key] = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            rest = m[3].replace("conv_shortcut", "nin_shortcut")
            out[key] = f"{m[1]}.mid.block_{int(m[2]) + 1}.{rest}"
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key
        ):
            if m[2] not in _VAE_ATTENTION_LEAVES:
                raise _unmapped("VAE", key)
            out[key] = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION_LEAVES[m[2]]}.{m[3]}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            level = levels - 1 - int(m[1])
            out[key] = (
                f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
            )
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            out[key] = f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
        else:
            raise _unmapped("VAE", key)
    return out


def clip_key_map(keys) -> dict[str, str]:
    """transformers ``CLIPTextModel`` key -> ``text_model.*`` (the prefix goes before it).

    transformers >= 5.6 stores the text model flat (no ``text_model.``); the LDM layout
    (and diffusers' forward converter) always has it.
    """
    keys = list(keys)
    if any(k.startswith("text_model.") for k in keys):
        return {k: k for k in keys}
    return {k: f"text_model.{k}" for k in keys}


def open_clip_key_map(keys) -> dict[str, str]:
    """``CLIPTextModelWithProjection`` key -> OpenCLIP key; q/k/v of a layer share ``in_proj_*``."""
    table = _mapping()["openclip"]
    fixed = dict(table["layers"])
    renames = list(table["transformer"].items())[::-1]
    out = {}
    for key in keys:
        if key in fixed:
            out[key] = fixed[key]
        elif m := re.fullmatch(
            r"text_model\.encoder\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)", key
        ):
            out[key] = f"transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"
        elif key.startswith("text_model.encoder.layers."):
            name = key
            for new, old in renames:
                if new.startswith("transformer.text_model"):
                    continue
                name = name.replace(new, old)
            out[key] = f"transformer.{name}"
        else:
            raise _unmapped("text_encoder_2", key)
    return out


def _components(kind: str) -> list[tuple[str, str]]:
    """(component, LDM prefix) of a pipeline kind."""
    if kind == "sdxl":
        return [
            ("unet", UNET_PREFIX),
            ("vae", VAE_PREFIX),
            ("text_encoder", SDXL_CLIP_PREFIX),
            ("text_encoder_2", SDXL_OPEN_CLIP_PREFIX),
        ]
    clip = SD2_OPEN_CLIP_PREFIX if kind == "sd2" else SD_CLIP_PREFIX
    return [("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("text_encoder", clip)]


def _key_map(component: str, state: dict, config: dict, kind: str) -> dict[str, str]:
    if component == "unet":
        return unet_key_map(state, config)
    if component == "vae":
        return vae_key_map(state, config)
    names = clip_key_map(state)
    if (component, kind) in (("text_encoder_2", "sdxl"), ("text_encoder", "sd2")):
        opened = open_clip_key_map(names.values())
        return {key: opened[name] for key, name in names.items()}
    return names


def to_single_file(states: dict[str, dict], configs: dict[str, dict], kind: str = "sd") -> dict:
    """The LDM state dict of a pipeline's ``states`` (component -> diffusers state dict).

    VAE attention weights become 1x1 convolutions and OpenCLIP's q/k/v are concatenated
    into ``in_proj_*`` (its ``text_projection`` transposed), as in the original files.
    """
    out: dict[str, torch.Tensor] = {}
    for component, prefix in _components(kind):
        if component not in states:
            raise ValueError(f"the pipeline has no {component}; single-file export needs it")
        state, config = states[component], configs[component]
        names = _key_map(component, state, config, kind)
        fused: dict[str, dict[str, torch.Tensor]] = {}
        for key, name in names.items():
            tensor = state[key]
            if (
                component == "vae"
                and ".mid.attn_1." in name
                and name.endswith("weight")
                and tensor.ndim == 2
            ):
                tensor = tensor[:, :, None, None]
            if name == "text_projection":
                tensor = tensor.T
            if ".attn.in_proj_" in name:
                fused.setdefault(prefix + name, {})[key.split(".")[-2][0]] = tensor
                continue
            if prefix + name in out:
                raise RuntimeError(f"two tensors map to {prefix + name}")
            out[prefix + name] = tensor
        for name, parts in fused.items():
            if sorted(parts) != ["k", "q", "v"]:
                raise ValueError(f"{name}: needs q, k and v projections, found {sorted(parts)}")
            out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def _forward(ldm: dict, configs: dict, kind: str) -> dict[str, dict]:
    """diffusers' own single-file converters applied to an LDM state dict."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    back = {
        "unet": convert_ldm_unet_checkpoint(ldm, configs["unet"]),
        "vae": convert_ldm_vae_checkpoint(ldm, configs["vae"]),
    }
    if kind == "sd2":
        model = SimpleNamespace(config=SimpleNamespace(**configs["text_encoder"]))
        back["text_encoder"] = convert_open_clip_checkpoint(model, ldm, prefix=SD2_OPEN_CLIP_PREFIX)
    else:
        back["text_encoder"] = convert_ldm_clip_checkpoint(ldm)
    if kind == "sdxl":
        model = SimpleNamespace(config=SimpleNamespace(**configs["text_encoder_2"]))
        back["text_encoder_2"] = convert_open_clip_checkpoint(
            model, ldm, prefix=SDXL_OPEN_CLIP_PREFIX
        )
    return back


def check_round_trip(states: dict[str, dict], configs: dict[str, dict], kind: str = "sd") -> int:
    """Check that diffusers' forward converters undo :func:`to_single_file` on these keys.

    Each tensor is replaced by a distinct constant of its shape (a zero-copy ``expand``);
    after the inverse map and diffusers' forward conversion every diffusers key must come
    back with its own shape and constant, and nothing else may come back.  Returns the
    number of tensors checked; raises ``RuntimeError`` naming the first mismatch.
    """
    tags: dict[tuple[str, str], int] = {}
    probe: dict[str, dict] = {}
    for component, state in states.items():
        probe[component] = {}
        for key, tensor in state.items():
            tags[(component, key)] = tag = len(tags) + 1
            probe[component][key] = torch.tensor(float(tag)).expand(tensor.shape)
    back = _forward(to_single_file(probe, configs, kind), configs, kind)
    for component, _ in _components(kind):
        got = dict(back[component])
        if component.startswith("text_encoder"):
            want_flat = not any(k.startswith("text_model.") for k in states[component])
            if want_flat:
                got = {k.removeprefix("text_model."): v for k, v in got.items()}
        missing = sorted(set(states[component]) - set(got))
        extra = sorted(set(got) - set(states[component]))
        if missing or extra:
            raise RuntimeError(
                f"{component}: diffusers' converter does not give back {missing[:3]} / "
                f"gives unexpected {extra[:3]}"
            )
        for key, tensor in got.items():
            want = states[component][key].shape
            tag = float(tags[(component, key)])
            corners = [tensor[(0,) * tensor.ndim], tensor[tuple(s - 1 for s in tensor.shape)]]
            if tensor.shape != want or any(float(c) != tag for c in corners):
                raise RuntimeError(f"{component}.{key} does not round-trip through the LDM layout")
    return len(tags)


def _component_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    plain = [
        f for f in files if not re.search(r"\.(fp16|bf16|fp32)(-\d+-of-\d+)?\.safetensors$", f.name)
    ]
    return plain or files


def check_single_file_source(index: dict, folder) -> None:
    """Refuse a pipeline the original SD layout cannot hold (pixel space, other classes)."""
    name = index.get("_class_name", "")
    if name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ValueError(
            f"{folder} holds a {name or 'unknown pipeline'}; single-file export supports "
            "StableDiffusionPipeline and StableDiffusionXLPipeline (use --format diffusers)"
        )
    if not any(index.get("vae") or []):
        raise ValueError(
            f"{folder} is a pixel-space pipeline (no VAE); the original SD layout needs one: "
            "use --format diffusers or lora"
        )


def read_pipeline_folder(folder: str | os.PathLike) -> tuple[dict, dict, str]:
    """(states, configs, kind) of a diffusers SD 1.x / 2.x / SDXL folder, from its safetensors.

    ``kind``: ``"sd"`` (CLIP-L text encoder), ``"sd2"`` (OpenCLIP text encoder, gelu) or
    ``"sdxl"``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json)"
        )
    index = json.loads(index_path.read_text())
    check_single_file_source(index, folder)
    name = index.get("_class_name", "")
    if name == "StableDiffusionXLPipeline":
        kind = "sdxl"
    elif name == "StableDiffusionPipeline":
        kind = "sd"
    else:
        raise ValueError(
            f"{folder} holds a {name or 'unknown pipeline'}; single-file export supports "
            "StableDiffusionPipeline and StableDiffusionXLPipeline (use --format diffusers)"
        )
    states, configs = {}, {}
    for component, _ in _components(kind):
        sub = folder / component
        files = _component_files(sub) if sub.is_dir() else []
        if not files or not (sub / "config.json").is_file():
            raise FileNotFoundError(
                f"{sub} has no config.json and safetensors weights; re-export the pipeline"
            )
        states[component] = {}
        for file in files:
            states[component].update(load_file(str(file)))
        configs[component] = json.loads((sub / "config.json").read_text())
    if kind == "sd" and configs["text_encoder"].get("hidden_act") == "gelu":
        kind = "sd2"  # OpenCLIP ViT-H (gelu; OpenAI's CLIP-L uses quick_gelu): OpenCLIP keys
    return states, configs, kind


def scheduler_note(folder: str | os.PathLike) -> dict:
    """How to sample the single file: steps, timesteps, CFG and the stock scheduler settings."""
    folder = Path(folder)
    info_path = folder / "wadi_export.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    timesteps = info.get("timesteps") or [999]
    call = info.get("pipeline_call") or {
        "num_inference_steps": len(timesteps),
        "guidance_scale": 1.0,
    }
    caveat = None
    if scheduler.get("trained_betas") is not None:
        caveat = (
            "the scheduler's betas differ from the teacher's (a trained alpha_bar_T or a "
            "timestep below 999): a UI sampling with the teacher's schedule feeds the model "
            "a slightly different noise level; diffusers with diffusers_scheduler is exact"
        )
    return {
        "caveat": caveat,
        "steps": len(timesteps),
        "timesteps": timesteps,
        "cfg": 1.0,
        "prediction_type": scheduler.get("prediction_type", "epsilon"),
        "alpha_bar_T": info.get("alpha_bar_T"),
        "diffusers_scheduler": scheduler,
        "diffusers_call": call,
        "summary": (
            f"{len(timesteps)} step(s) at timestep(s) {timesteps} (trailing spacing), CFG 1, "
            f"{scheduler.get('prediction_type', 'epsilon')} prediction"
        ),
    }


def note_path(path: str | os.PathLike) -> Path:
    """The scheduler note written beside a single-file checkpoint: ``NAME.scheduler.json``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".scheduler.json")


def save_single_file(
    pipeline_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the pipeline folder ``pipeline_dir`` as one LDM-layout ``out`` (``.safetensors``).

    The map is checked against diffusers' converters first (:func:`check_round_trip`);
    ``dtype`` casts the floating tensors.  The scheduler note goes to :func:`note_path`.
    """
    from safetensors.torch import save_file

    from .export import parse_dtype

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must name a .safetensors file for --format single-file")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name the .safetensors file to write")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    check_output_separate(out, pipeline_dir)
    check_output_separate(note_path(out), pipeline_dir)
    dtype = parse_dtype(dtype)
    states, configs, kind = read_pipeline_folder(pipeline_dir)
    check_round_trip(states, configs, kind)
    ldm = to_single_file(states, configs, kind)
    ldm = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
        for k, v in ldm.items()
    }
    note = scheduler_note(pipeline_dir)
    note["file"] = out.name
    note["layout"] = "original Stable Diffusion (LDM) keys" + (", SDXL" if kind == "sdxl" else "")
    with writing_output(out), atomic_file(out) as tmp:
        save_file(
            ldm,
            str(tmp),
            metadata={
                "format": "pt",
                "wadi": json.dumps(
                    {k: note[k] for k in ("steps", "timesteps", "cfg", "prediction_type")}
                ),
            },
        )
    with writing_output(note_path(out)):
        write_json(note_path(out), note)
    return out
