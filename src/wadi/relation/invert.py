"""``wadi invert-relation``: learn a relation token ``<R>`` from exemplar images (ReVersion).

What is trained: one new row of the base's token-embedding table, nothing else.  The row is
a separate fp32 parameter spliced into the embedding's output wherever the token occurs (a
forward hook), so the table, the text encoder, the U-Net and the VAE are never written
during training: every other row and parameter stays bitwise as loaded.  At the end the
row is written to ``OUTPUT/final/embedding.safetensors`` (diffusers' textual-inversion
format) and into the in-memory table.

Per step (ReVersion, Huang et al. 2023): a batch of exemplars (a seeded permutation per
epoch, a pure function of the step), timesteps by relation-focal importance sampling,
the denoising loss in the base's parametrization, plus ``contrastive_weight`` times the
relation-steering InfoNCE (positives: ``num_positives`` prepositions sampled per exemplar;
negatives: the caption's other words, stop words and prepositions left out).

The run folder follows ``wadi distill``'s policy (:mod:`wadi.distill.run_dir`: one run per
folder under a lock, a foreign or different run refused, write errors in one line) and
its checkpoint format (:mod:`wadi.distill.checkpoint`: atomic, manifest-checked,
pickle-free, resumed bit for bit with ``--resume latest``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wadi.distill import checkpoint as ckpt
from wadi.distill import run_dir

from .embedding import EMBEDDING_NAME, save_embedding
from .losses import (
    PREPOSITIONS,
    STOP_WORDS,
    denoising_target,
    focal_weights,
    sample_focal_timesteps,
    steer_loss,
)

__all__ = ["RelationConfig", "InvertResult", "invert_relation", "read_captions", "CONFIG_NAME"]

CONFIG_NAME = "relation.json"

#: fields a resumption may change (they do not change what is learned)
RESUMABLE = frozenset(
    {"max_steps", "checkpoint_every", "keep_checkpoints", "device", "progress", "output_dir"}
)


@dataclass
class RelationConfig:
    """Everything that defines a relation-inversion run (saved as ``OUTPUT/relation.json``)."""

    base: str
    images: str
    prompts: str
    output_dir: str
    token: str = "<R>"
    init_word: str = "and"  # ReVersion's initializer token
    max_steps: int = 3000  # ReVersion's
    resolution: int | None = None  # default: the base's native size
    batch_size: int = 2
    gradient_accumulation_steps: int = 4  # ReVersion: batch 2 x 4
    learning_rate: float = 2e-3  # ReVersion: 2.5e-4 scaled by its batch 2 x 4 (--scale_lr)
    weight_decay: float = 1e-2
    contrastive_weight: float = 0.01
    temperature: float = 0.07
    num_positives: int = 4
    focal_alpha: float = 0.5
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    dtype: str = "fp32"  # of the frozen base; the learned row is always fp32
    device: str | None = None
    progress: bool = True

    def validate(self) -> None:
        positive = (
            "max_steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
            "keep_checkpoints",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.resolution is not None and self.resolution < 1:
            raise ValueError(f"--resolution must be positive, got {self.resolution}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.contrastive_weight < 0:
            raise ValueError(f"--contrastive-weight must be >= 0, got {self.contrastive_weight}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be positive, got {self.temperature}")
        if self.num_positives < 1 and self.contrastive_weight > 0:
            raise ValueError("--num-positives must be at least 1 (or --contrastive-weight 0)")
        if self.num_positives > len(PREPOSITIONS):
            raise ValueError(f"--num-positives must be at most {len(PREPOSITIONS)}")
        focal_weights(2, self.focal_alpha)  # one line if alpha is outside [0, 1)
        token = self.token
        if not token or token != token.strip() or " " in token:
            raise ValueError(f"--token {token!r} must be one word without spaces, e.g. <R>")
        if not self.init_word or " " in self.init_word.strip():
            raise ValueError(f"--init-word {self.init_word!r} must be one word, e.g. and")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self, other: RelationConfig) -> list[str]:
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in RESUMABLE and a[k] != b[k]]

    def save(self, path: Path) -> None:
        ckpt.write_json(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path) -> RelationConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def absolute(self) -> RelationConfig:
        paths = {k: os.path.abspath(getattr(self, k)) for k in ("images", "prompts", "output_dir")}
        if Path(self.base).exists():
            paths["base"] = os.path.abspath(self.base)
        return dataclasses.replace(self, **paths)


@dataclass
class InvertResult:
    output_dir: Path
    final_dir: Path
    embedding_path: Path
    token: str
    token_id: int
    vector: torch.Tensor
    steps: int
    steps_run: int
    history: list[dict]
    seconds_per_step: float
    backbone: object = None  # the base, its table holding the learned row


def _log(message: str) -> None:
    print(f"wadi invert-relation: {message}", file=sys.stderr, flush=True)


# -- inputs ------------------------------------------------------------------------------------


def read_captions(
    prompts: str | os.PathLike, image_names: list[str], token: str
) -> list[list[str]]:
    """Captions per image (in ``image_names`` order), each containing ``token``.

    ``.json``: ``{"image file name": "caption" or ["caption", ...]}`` (ReVersion's
    ``text.json`` layout, with the token written out); any other file: one caption per
    line (blank lines skipped), line ``i`` for the ``i``-th image in name order.
    """
    path = Path(prompts)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts file {path} not found")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--prompts {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--prompts {path} must map image file names to captions")
        missing = [n for n in image_names if n not in data]
        extra = sorted(set(data) - set(image_names))
        if missing or extra:
            raise ValueError(
                f"--prompts {path} does not match the images: "
                + (f"no caption for {', '.join(missing[:3])}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"captions for images not in --images: {', '.join(extra[:3])}" if extra else "")
            )
        captions = []
        for name in image_names:
            value = data[name]
            value = [value] if isinstance(value, str) else value
            if (
                not isinstance(value, list)
                or not value
                or not all(isinstance(v, str) for v in value)
            ):
                raise ValueError(f"--prompts {path}: {name} needs a caption or a list of captions")
            captions.append([v.strip() for v in value])
    else:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        lines = [ln for ln in lines if ln]
        if len(lines) != len(image_names):
            raise ValueError(
                f"--prompts {path} has {len(lines)} captions for {len(image_names)} images; give "
                "one caption per image (line i for the i-th image in name order) or a .json "
                "mapping image names to captions"
            )
        captions = [[line] for line in lines]
    for name, options in zip(image_names, captions):
        for caption in options:
            if token not in caption.split():
                raise ValueError(
                    f"the caption {caption!r} of {name} does not contain the token {token} as a "
                    f"word; write it where the relation goes, e.g. 'cat {token} wall'"
                )
    return captions


def _image_names(folder: str) -> list[str]:
    from wadi.data.images import _image_files

    return [p.name for p in _image_files(Path(folder))]


def _word_ids(tokenizer, word: str) -> list[int]:
    return list(tokenizer(word, add_special_tokens=False).input_ids)


class _Text:
    """Token ids the losses need, computed once: positives per preposition, negatives per caption."""

    def __init__(self, tokenizer, token: str, token_id: int, captions: list[list[str]]):
        self.tokenizer, self.token, self.token_id = tokenizer, token, token_id
        special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        self.positive_ids = [
            [i for i in _word_ids(tokenizer, w) if i not in special] for w in PREPOSITIONS
        ]
        skip = {w.lower() for w in (*STOP_WORDS, *PREPOSITIONS)}
        self.negative_ids = {}
        for options in captions:
            for caption in options:
                words = [w.strip(".,;:!?\"'()").lower() for w in caption.split() if w != token]
                ids = [
                    i
                    for w in words
                    if w and w not in skip
                    for i in _word_ids(tokenizer, w)
                    if i not in special and i != token_id
                ]
                self.negative_ids[caption] = ids
        limit = tokenizer.model_max_length
        for caption in self.negative_ids:
            ids = tokenizer(caption, truncation=True, max_length=limit).input_ids
            if token_id not in ids:
                raise ValueError(
                    f"the caption {caption!r} is longer than the tokenizer's {limit} tokens and "
                    f"{token} is cut off; shorten it"
                )


# -- the run folder ------------------------------------------------------------------------------


def _prepare(config: RelationConfig, resume: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (or None), refusing to mix runs (as ``wadi distill``)."""
    out = Path(config.output_dir)
    run_dir.check_location(out)
    existing = out / CONFIG_NAME
    if existing.is_file():
        try:
            previous = RelationConfig.load(existing)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{existing} is damaged ({err}); pass --overwrite to start again"
            ) from None
        diffs = previous.differences(config)
        if resume and diffs:
            raise ValueError(
                f"{out} holds a relation run with different settings ({', '.join(diffs)}); resume "
                "it with its own settings, or choose another --output-dir"
            )
        if not resume and not overwrite:
            what = f"a run with different settings ({', '.join(diffs)})" if diffs else "a run"
            raise ValueError(
                f"{out} already holds {what}; pass --resume latest to continue it or "
                "--overwrite to replace it"
            )
    elif out.is_dir() and not overwrite:
        content = [p for p in out.iterdir() if p.name != run_dir.LOCK_NAME]
        if content:
            raise ValueError(
                f"{out} exists, is not empty and is not a wadi invert-relation run; choose "
                "another --output-dir"
            )
    if resume:
        return ckpt.resolve_resume(out, resume, _log)
    return None


def _clear(out: Path) -> None:
    run_dir.clear_run(out)
    (out / CONFIG_NAME).unlink(missing_ok=True)


# -- training ---------------------------------------------------------------------------------------


def invert_relation(
    config: RelationConfig, *, resume: str | None = None, overwrite: bool = False
) -> InvertResult:
    """Learn ``config.token`` (see the module docstring); returns the learned vector and paths."""
    from wadi.devices import resolve_device
    from wadi.paths import check_output_separate

    config.validate()
    config = config.absolute()
    device = resolve_device(config.device)
    check_output_separate(config.output_dir, config.images, config.prompts, config.base)
    names = _image_names(config.images)  # before the model loads: bad inputs fail fast
    captions = read_captions(config.prompts, names, config.token)
    lock = run_dir.RunLock(config.output_dir, log=_log)
    lock.acquire()
    try:
        result = _invert(config, names, captions, device, resume, overwrite)
    except BaseException as err:
        lock.release_after_failure()
        if isinstance(err, OSError):
            line = run_dir.place_error(err, Path(config.output_dir))
            if line is not err:
                raise line from err
        raise
    lock.release()
    return result


def _load_base(config: RelationConfig, device):
    from wadi.backbones.export import parse_dtype
    from wadi.backbones.registry import load_backbone

    backbone = load_backbone(config.base, dtype=parse_dtype(config.dtype), device=device)
    if backbone.kind != "sd-unet":
        raise ValueError(
            f"wadi invert-relation supports SD 1.x/2.x bases (one CLIP text encoder); "
            f"{config.base} is a {backbone.kind} model"
        )
    return backbone


def _add_token(backbone, config: RelationConfig) -> int:
    """Add the token (refused if the vocabulary has it), its row a copy of the init word's."""
    tokenizer, encoder = backbone.tokenizer, backbone.text_encoder
    from .embedding import add_token_embeddings, known_token

    if known_token(tokenizer, config.token):
        raise ValueError(
            f"--token {config.token} is already in the vocabulary of {config.base}; choose "
            "a new token, e.g. <R2>"
        )
    init = _word_ids(tokenizer, config.init_word)
    if len(init) != 1:
        raise ValueError(
            f"--init-word {config.init_word!r} is {len(init)} tokens for this tokenizer; "
            "choose a word that is one token (ReVersion uses 'and')"
        )
    table = encoder.get_input_embeddings().weight
    (token_id,) = add_token_embeddings(
        tokenizer, encoder, {config.token: table[init[0]].detach().float().cpu()}
    )
    return token_id


def _invert(config, names, captions, device, resume, overwrite) -> InvertResult:
    from tqdm.auto import tqdm

    from wadi.data.images import encode_images, load_image_folder

    out = Path(config.output_dir)
    resume_from = _prepare(config, resume, overwrite)
    backbone = _load_base(config, device)
    resolution = (
        config.resolution or backbone.denoiser.config.sample_size * backbone.vae_scale_factor
    )
    backbone.latent_size(resolution)  # one line if not a multiple of the VAE factor
    channels = backbone.latent_channels if backbone.vae is None else backbone.vae.config.in_channels
    images = load_image_folder(config.images, resolution, channels=int(channels))
    x0_all = encode_images(backbone, images.to(device))
    token_id = _add_token(backbone, config)
    text = _Text(backbone.tokenizer, config.token, token_id, captions)
    if overwrite and not resume:  # every input checked: only now the old run goes
        _clear(out)

    encoder = backbone.text_encoder
    table = encoder.get_input_embeddings()
    row = torch.nn.Parameter(table.weight[token_id].detach().to(torch.float32).clone())
    optimizer = torch.optim.AdamW(
        [row], lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    rng = torch.Generator().manual_seed(config.seed)
    param = backbone.parametrization
    weights = focal_weights(param.num_train_timesteps, config.focal_alpha)
    step = 0
    if resume_from is not None:
        step = _load_checkpoint(resume_from, row, optimizer, rng)
        _log(f"resuming from {resume_from} (step {step})")
    config.save(out / CONFIG_NAME)

    def splice(module, inputs, output):  # the new row wherever the token occurs
        where = (inputs[0] == token_id).unsqueeze(-1)
        return torch.where(where, row.to(output.dtype), output)

    hook = table.register_forward_hook(splice)
    history, steps_run, t0 = [], 0, time.perf_counter()
    bar = tqdm(
        total=config.max_steps, initial=step, desc="invert-relation", unit="step",
        disable=not config.progress,
    )  # fmt: skip
    try:
        with bar:
            while step < config.max_steps:
                record = _step(
                    step, config, backbone, param, x0_all, captions, text, row, table,
                    optimizer, rng, weights,
                )  # fmt: skip
                step += 1
                steps_run += 1
                history.append({"step": step, **record})
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    _save_checkpoint(out, step, config, row, optimizer, rng)
    finally:
        hook.remove()
    seconds = (time.perf_counter() - t0) / steps_run if steps_run else math.nan
    with torch.no_grad():
        table.weight[token_id] = row.detach().to(table.weight)
    final = _write_final(out, config, row, token_id, step, history, seconds)
    return InvertResult(
        out, final, final / EMBEDDING_NAME, config.token, token_id, row.detach().clone(),
        step, steps_run, history, seconds, backbone,
    )  # fmt: skip


def _step(step, config, backbone, param, x0_all, captions, text, row, table, optimizer, rng,
          weights) -> dict:  # fmt: skip
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; every random
    draw comes from ``rng`` and the data position is a function of the step (resumable)."""
    accumulate = config.gradient_accumulation_steps
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "denoise": 0.0, "steer": 0.0}
    timesteps = []
    for micro in range(accumulate):
        parts, t = _micro_loss(
            step * accumulate + micro, config, backbone, param, x0_all, captions, text, row,
            table, rng, weights,
        )  # fmt: skip
        if not torch.isfinite(parts["loss"]):
            raise ValueError(
                f"the loss became {float(parts['loss'])} at step {step + 1}; lower "
                "--learning-rate (or use --dtype fp32), then --resume latest"
            )
        (parts["loss"] / accumulate).backward()
        for key, value in parts.items():
            totals[key] += float(value.detach()) / accumulate
        timesteps += [int(v) for v in t]
    optimizer.step()
    return {**totals, "timesteps": timesteps}


def _micro_loss(position, config, backbone, param, x0_all, captions, text, row, table, rng,
                weights):  # fmt: skip
    """``({"loss", "denoise", "steer"}, t)`` of the micro-batch at ``position`` (with gradient)."""
    from wadi.distill.data import batch_indices

    device = x0_all.device
    idx = batch_indices(position, 0, 1, config.batch_size, len(captions), config.seed)
    prompts = []
    for i in idx:
        options = captions[i]
        pick = int(torch.randint(len(options), (1,), generator=rng)) if len(options) > 1 else 0
        prompts.append(options[pick])
    x0 = x0_all[idx]
    eps = torch.randn(x0.shape, generator=rng, dtype=torch.float32)
    eps = eps.to(device=device, dtype=x0.dtype)
    t = sample_focal_timesteps(len(idx), weights, rng, device=device)
    positives = [
        int(j)
        for _ in idx
        for j in torch.randperm(len(text.positive_ids), generator=rng)[: config.num_positives]
    ]
    x_t = param.add_noise(x0, eps, t)
    with torch.enable_grad():
        cond = backbone._encode(prompts)  # with the hook: gradient reaches the row only
        out = backbone.predict(x_t.to(backbone.dtype), t, cond)
        target = denoising_target(param, x0, eps, t)
        denoise = F.mse_loss(out.float(), target.float())
        loss = denoise
        steer = torch.zeros((), device=device)
        if config.contrastive_weight > 0:
            pos_ids = [i for j in positives for i in text.positive_ids[j]]
            neg_ids = [i for p in prompts for i in text.negative_ids[p]]
            weight = table.weight.detach()
            steer = steer_loss(
                row, weight[pos_ids].float(), weight[neg_ids].float().reshape(-1, row.shape[0]),
                config.temperature,
            )  # fmt: skip
            loss = loss + config.contrastive_weight * steer
    return {"loss": loss, "denoise": denoise, "steer": steer}, t


# -- checkpoints and final -------------------------------------------------------------------------


def _save_checkpoint(out: Path, step: int, config, row, optimizer, rng) -> Path:
    tmp = ckpt.begin(out, step)
    try:
        config.save(tmp / CONFIG_NAME)
        ckpt.save_tensors({"row": row}, tmp / "row.safetensors")
        tensors, meta = ckpt.optimizer_to_files(optimizer)
        ckpt.save_tensors(tensors, tmp / "optimizer_row.safetensors")
        ckpt.write_json(meta, tmp / "optimizer_row.json")
        ckpt.save_tensors(ckpt.rng_state(rng), tmp / "rng-rank0.safetensors")
        state = {"step": step, "skipped_steps": 0, "nonfinite_in_a_row": 0, "world_size": 1}
        ckpt.write_json(state, tmp / "state.json")
        return ckpt.commit(tmp, config.keep_checkpoints)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_checkpoint(path: Path, row, optimizer, rng) -> int:
    saved = ckpt.load_tensors(path / "row.safetensors")
    if set(saved) != {"row"} or saved["row"].shape != row.shape:
        raise ValueError(f"checkpoint {path} is not a relation-inversion checkpoint of this base")
    with torch.no_grad():
        row.copy_(saved["row"])
    meta = json.loads((path / "optimizer_row.json").read_text())
    ckpt.optimizer_from_files(
        optimizer, ckpt.load_tensors(path / "optimizer_row.safetensors"), meta
    )
    ckpt.set_rng_state(rng, ckpt.load_tensors(path / "rng-rank0.safetensors"))
    return int(ckpt.read_state(path)["step"])


def _write_final(out: Path, config, row, token_id, step, history, seconds) -> Path:
    from wadi.files import atomic_directory, write_json

    final = out / "final"
    with atomic_directory(final) as tmp:
        save_embedding(tmp / EMBEDDING_NAME, config.token, row)
        config.save(tmp / CONFIG_NAME)
        last = history[-10:]
        summary = {
            "token": config.token,
            "token_id": token_id,
            "init_word": config.init_word,
            "steps": step,
            "seconds_per_step": None if math.isnan(seconds) else seconds,
            "embedding": EMBEDDING_NAME,
            "load_with": f"pipe.load_textual_inversion('{EMBEDDING_NAME}')",
            "mean_of_last_steps": {
                k: sum(h[k] for h in last) / len(last) for k in ("loss", "denoise", "steer")
            }
            if last
            else None,
        }
        write_json(tmp / "summary.json", summary)
        lines = "".join(json.dumps(h) + "\n" for h in history)
        (tmp / "history.jsonl").write_text(lines, encoding="utf-8")
    return final
