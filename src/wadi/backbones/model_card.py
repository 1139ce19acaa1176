"""Model cards (``README.md``) for every export, and the upload to the Hugging Face Hub.

A card follows diffusers' conventions: YAML front matter (``library_name: diffusers``,
``base_model``, ``tags``, ``pipeline_tag: text-to-image``) and a body with the pipeline
class, the recipe, the stock call that loads and samples the student, and the evaluation
numbers of ``wadi eval score`` runs on it.

A diffusers folder's card is a function of the folder: ``wadi_export.json`` (the stock
call, the teacher, ``recipe`` and ``base_model``), ``model_index.json``, the weights' dtype
and ``wadi_scores.json`` (score summaries).  So it can be rewritten at any time
(:func:`write_model_card`).  A single file or a LoRA gets its card beside it
(``NAME.md``; ``README.md`` once on the Hub).

``base_model`` must be a Hub model id (the Hub refuses a commit whose card names a
local path), so it is only written when one is known: ``--base-model``, or a teacher
that lives in the Hugging Face cache (``models--ORG--NAME/snapshots/REV``).  The body
names the teacher in every case (by folder name: cards do not carry local paths).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = [
    "CARD_NAME",
    "SCORES_NAME",
    "TAGS",
    "hub_id_of",
    "check_repo_id",
    "recipe_from_config",
    "recipe_from_adapter",
    "read_scores",
    "add_scores",
    "folder_card",
    "write_model_card",
    "update_card_from_scores",
    "file_card",
    "file_card_path",
    "push_to_hub",
]

CARD_NAME = "README.md"
SCORES_NAME = "wadi_scores.json"
TAGS = ["text-to-image", "diffusers", "wadi", "lorad", "one-step", "distillation"]
EXAMPLE_PROMPT = "a photo of a cat"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_CACHE_DIR = re.compile(r"^models--([^/]+?)--([^/]+)$")

#: the knobs of a run's config.yaml shown in the card, in this order
RECIPE_KEYS = (
    "adapter",
    "student_rank",
    "fake_rank",
    "include_conv",
    "objective",
    "guidance_scale",
    "generator_timesteps",
    "generator_timestep",
    "alpha_bar_T",
    "fake_updates",
    "gan_weight",
    "resolution",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "lr_student",
    "lr_fake",
    "optimizer",
    "warmup_steps",
    "ema_decay",
    "mixed_precision",
    "seed",
    "prompts",
    "embeddings",
)
_PATH_KEYS = ("prompts", "embeddings", "real_images")


# -- what the card says -------------------------------------------------------------------------


def hub_id_of(teacher: str | os.PathLike | None) -> str | None:
    """The Hub id of ``teacher`` when it is known: a snapshot in the Hugging Face cache
    (``.../models--ORG--NAME/snapshots/REV``) gives ``ORG/NAME``; anything else None."""
    if not teacher:
        return None
    parts = Path(teacher).expanduser().parts
    for i, part in enumerate(parts[:-1]):
        match = _CACHE_DIR.match(part)
        if match and parts[i + 1] == "snapshots":
            return f"{match.group(1)}/{match.group(2)}"
    return None


def check_repo_id(repo_id: str, flag: str = "--push-to-hub") -> str:
    """``ORG/NAME`` or one line naming the expected form."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id:
        raise ValueError(
            f"{flag} {repo_id!r} is not a Hub repo id; give it as USER/NAME or ORG/NAME "
            "(letters, digits, '-', '_', '.')"
        )
    return repo_id


def recipe_from_config(config, *, weights: str = "student") -> dict:
    """The card's recipe from a run's :class:`wadi.distill.config.DistillConfig`."""
    data = config.to_dict()
    recipe = {}
    for key in RECIPE_KEYS:
        value = data.get(key)
        if key == "generator_timestep" and data.get("generator_timesteps"):
            continue
        if key == "generator_timesteps" and not value:
            continue
        if key in _PATH_KEYS:
            if not value:
                continue
            value = Path(value).name  # no local paths in a card that may go public
        recipe[key] = value
    recipe["weights"] = weights
    return recipe


def recipe_from_adapter(adapter_dir: str | os.PathLike) -> dict:
    """The card's recipe from a LoRaD adapter folder (``wadi export --teacher --adapter``)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"adapter": "lorad"}
    targets = data.get("target_modules")
    recipe = {"adapter": data.get("adapter_type", "lorad"), "student_rank": data.get("rank")}
    if isinstance(targets, list):
        recipe["adapted_layers"] = len(targets)
    recipe["include_conv"] = bool(data.get("include_conv", False))
    return recipe


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_scores(path: str | os.PathLike) -> dict:
    """A compact summary of a ``scores.json`` written by ``wadi eval score``.

    The record must name the model its images came from (``generation``: the
    ``generation.json`` of ``wadi eval generate``), else the card could not say what the
    numbers measure.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"scores file {path} not found; give the scores.json written by `wadi eval score`"
        )
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun `wadi eval score`") from None
    results = record.get("results") if isinstance(record, dict) else None
    numbers = {k: float(v) for k, v in (results or {}).items() if _number(v)}
    if not numbers:
        raise ValueError(
            f"{path} holds no results; give the scores.json written by `wadi eval score`"
        )
    generation = record.get("generation")
    if not isinstance(generation, dict) or not generation.get("model_sha256"):
        raise ValueError(
            f"{path} does not record which model made its images (no generation.json beside "
            "them); generate them with `wadi eval generate --model DIR` and score again"
        )
    extractor = (record.get("extractor") or {}).get("name")
    protocol = record.get("protocol") or {}
    return {
        "results": numbers,
        "feature_extractor": extractor,
        "num_images": record.get("num_images"),
        "protocol": protocol.get("name"),
        "steps": generation.get("steps"),
        "guidance": generation.get("guidance"),
        "resolution": generation.get("resolution"),
        "dtype": generation.get("dtype"),
        "seed": generation.get("seed"),
        "model": Path(str(generation.get("model", ""))).name,
        "model_sha256": generation["model_sha256"],
        "date_utc": record.get("date_utc"),
        "wadi": record.get("wadi"),
    }


def add_scores(folder: str | os.PathLike, summaries: list[dict]) -> list[dict]:
    """Add score summaries to ``folder/wadi_scores.json`` (one entry per distinct summary)."""
    from wadi.files import write_json

    path = Path(folder) / SCORES_NAME
    current = json.loads(path.read_text()) if path.is_file() else []
    for summary in summaries:
        if summary not in current:
            current.append(summary)
    write_json(path, current)
    return current


def _metric_label(name: str, extractor: str | None) -> str:
    if name == "fid":
        return "FID" if extractor in (None, "inception") else f"FD ({extractor} features)"
    labels = {"clip_score": "CLIP score", "precision": "precision", "recall": "recall"}
    labels |= {"pickscore": "PickScore", "hpsv2": "HPSv2"}  # wadi.eval.preference
    return labels.get(name, name)


def _scores_section(scores: list[dict], fingerprint: str | None) -> list[str]:
    if not scores:
        return [
            "## Evaluation",
            "",
            "Not evaluated yet: `wadi eval generate --model DIR`, then `wadi eval score ... "
            "--model-card` puts the numbers here (or `wadi export ... --scores FILE`).",
            "",
        ]
    lines = [
        "## Evaluation",
        "",
        "| metric | value | images | protocol | steps | CFG | resolution | dtype | model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in scores:
        same = fingerprint is not None and s.get("model_sha256") == fingerprint
        model = "these weights" if same else f"`{s.get('model')}` (another export)"
        for name, value in s["results"].items():
            lines.append(
                f"| {_metric_label(name, s.get('feature_extractor'))} | {value:.4g} | "
                f"{s.get('num_images')} | {s.get('protocol') or 'custom'} | {s.get('steps')} | "
                f"{s.get('guidance')} | {s.get('resolution')} | {s.get('dtype')} | {model} |"
            )
    dates = ", ".join(sorted({str(s["date_utc"]) for s in scores}))
    lines += ["", f"Measured with `wadi eval score` ({dates})."]
    if any(s.get("model_sha256") != fingerprint for s in scores):
        lines[-1] += (
            ' "another export": the images came from a folder with other files than this one '
            "(e.g. another dtype of the same student)."
        )
    return [*lines, ""]


def _recipe_section(recipe: dict | None) -> list[str]:
    if not recipe:
        return []
    lines = ["## Recipe", "", "| knob | value |", "|---|---|"]
    for key, value in recipe.items():
        shown = "default" if value is None else value
        if isinstance(value, (list, tuple)):
            shown = ", ".join(str(v) for v in value)
        lines.append(f"| `{key}` | {shown} |")
    return [*lines, ""]


def _front_matter(base_model: str | None, extra_tags: tuple[str, ...] = ()) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        library_name="diffusers",
        base_model=base_model,
        tags=[*TAGS, *extra_tags],
        pipeline_tag="text-to-image",
    )
    return f"---\n{data.to_yaml()}\n---\n"


def _call_text(call: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in call.items())


def _teacher_name(info: dict, base_model: str | None) -> str:
    if base_model:
        return base_model
    teacher = info.get("teacher")
    return Path(teacher).name if teacher else "its teacher"


def _weights_dtype(folder: Path) -> str:
    """The dtype of the denoiser's stored weights (safetensors header): ``float16``, ..."""
    from safetensors import safe_open

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for sub in ("unet", "transformer"):
        for file in sorted((folder / sub).glob("*.safetensors")):
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        name = f.get_slice(key).get_dtype()
                        if name in names:
                            return names[name]
            except Exception:  # noqa: BLE001 - a damaged file is the loader's to report
                continue
    return "float32"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_card(folder: str | os.PathLike, *, load_from: str | None = None) -> str:
    """The ``README.md`` text of a ``wadi export`` diffusers folder (read from the folder).

    ``load_from`` is what the snippet passes to ``from_pretrained`` when the folder has no
    recorded Hub repo (``repo_id`` in ``wadi_export.json``); default: the folder's path.
    """
    folder = Path(folder)
    info = _read_json(folder / "wadi_export.json")
    index = _read_json(folder / "model_index.json")
    scores_path = folder / SCORES_NAME
    scores = json.loads(scores_path.read_text()) if scores_path.is_file() else []
    base_model = info.get("base_model")
    recipe = info.get("recipe")
    cls = index.get("_class_name", "DiffusionPipeline")
    pixel = index.get("vae", [None])[0] is None
    dtype = _weights_dtype(folder)
    variant = info.get("variant")
    call = info.get("pipeline_call") or {"num_inference_steps": 1, "guidance_scale": 1.0}
    timesteps = info.get("timesteps") or [999]
    teacher = _teacher_name(info, base_model)
    load_from = info.get("repo_id") or load_from or str(folder)
    prompt = EXAMPLE_PROMPT
    if recipe and recipe.get("validation_prompts"):
        prompt = recipe["validation_prompts"][0]
    steps = len(timesteps)
    when = f"1 step at timestep {timesteps[0]}" if steps == 1 else f"{steps} steps at {timesteps}"
    lines = [
        f"# One-step student of {teacher}"
        if steps == 1
        else f"# {steps}-step student of {teacher}",
        "",
        f"A text-to-image generator distilled from `{teacher}` with wadi (variational score "
        "distillation with a LoRaD student: the teacher's weights, rotated), merged into a "
        "stock diffusers pipeline.",
        "",
        f"- Pipeline: `{cls}`, scheduler `{info.get('scheduler', 'DDIMScheduler')}`, {when}, "
        f"guidance scale {call.get('guidance_scale', 1.0)}.",
        f"- Weights: {dtype}" + (f" (variant `{variant}`)" if variant else "") + ".",
        f"- Teacher: `{teacher}`" + ("" if base_model else " (local folder)") + ".",
        "",
        "## How to use",
        "",
    ]
    if pixel:
        lines += [
            "A pixel-space model: the stock pipelines need a VAE, so it loads with wadi:",
            "",
            "```bash",
            f'wadi generate --pipeline {load_from} --prompt "{prompt}" --out samples',
            "```",
            "",
        ]
    else:
        kwargs = ""
        if dtype != "float32":
            kwargs = f", torch_dtype=torch.{dtype}" + (f', variant="{variant}"' if variant else "")
        lines += [
            "```python",
            *(["import torch"] if kwargs else []),
            f"from diffusers import {cls}",
            "",
            f'pipe = {cls}.from_pretrained("{load_from}"{kwargs})',
            f'image = pipe("{prompt}", {_call_text(call)}).images[0]',
            "```",
            "",
            "The scheduler in the folder is set up for the student: keep it (and the call's "
            "steps and guidance scale), or the images are not the student's.",
            "",
        ]
    lines += _recipe_section(recipe)
    from wadi.eval.generate import model_fingerprint

    lines += _scores_section(scores, model_fingerprint(folder) if scores else None)
    return _front_matter(base_model) + "\n" + "\n".join(lines)


def write_model_card(
    folder: str | os.PathLike,
    *,
    load_from: str | None = None,
    base_model: str | None = None,
    recipe: dict | None = None,
    scores: list[str | os.PathLike] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write ``folder/README.md``; ``base_model``, ``recipe`` and ``repo_id`` (the Hub repo
    the folder goes to) are recorded in ``wadi_export.json`` and ``scores`` (``scores.json``
    files) in ``wadi_scores.json`` first, so a later rewrite keeps them."""
    from wadi.files import write_json, write_text

    folder = Path(folder)
    summaries = [read_scores(p) for p in scores or []]
    changes = {"base_model": base_model, "recipe": recipe, "repo_id": repo_id}
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes:
        info_path = folder / "wadi_export.json"
        write_json(info_path, {**_read_json(info_path), **changes})
    if summaries:
        add_scores(folder, summaries)
    return write_text(folder / CARD_NAME, folder_card(folder, load_from=load_from))


def update_card_from_scores(scores_file: str | os.PathLike) -> Path:
    """``wadi eval score --model-card``: add a scores file's numbers to the card of the
    ``wadi export`` folder its images came from; returns the card.

    The folder must still hold the weights that made the images (same fingerprint, card
    files aside), or the numbers would describe another model.
    """
    from wadi.eval.generate import model_fingerprint

    summary = read_scores(scores_file)
    record = json.loads(Path(scores_file).expanduser().read_text())
    folder = Path(str(record["generation"].get("model", "")))
    if not (folder / "wadi_export.json").is_file():
        raise ValueError(
            f"the images of {scores_file} came from {folder}, which is not a `wadi export` "
            "folder (no wadi_export.json); drop --model-card, or pass the scores to "
            "`wadi export --scores`"
        )
    if model_fingerprint(folder) != summary["model_sha256"]:
        raise ValueError(
            f"{folder} changed since its images were generated (other weights or configs); "
            "regenerate the images from it, or drop --model-card"
        )
    return write_model_card(folder, scores=[scores_file])


# -- single files and LoRAs ---------------------------------------------------------------------


def file_card_path(path: str | os.PathLike) -> Path:
    """The card beside a single file or LoRA: ``NAME.safetensors`` -> ``NAME.md``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".md")


def file_card(
    path: str | os.PathLike,
    fmt: str,
    pipeline_dir: str | os.PathLike,
    *,
    info: dict,
    repo_id: str | None = None,
    scores: list[str | os.PathLike] | None = None,
) -> str:
    """The card of a ``--format single-file`` or ``lora`` export ``path``.

    ``pipeline_dir`` is the diffusers folder the file was made from (read for the
    pipeline class, the teacher, the recipe and the scheduler); ``info`` the export's
    note (single-file) or error summary (lora).
    """
    path, folder = Path(path), Path(pipeline_dir)
    export = _read_json(folder / "wadi_export.json")
    index = _read_json(folder / "model_index.json")
    base_model = export.get("base_model")
    teacher = _teacher_name(export, base_model)
    teacher_ref = base_model or "TEACHER_DIR"
    cls = index.get("_class_name", "StableDiffusionPipeline")
    name = path.name
    where = f"{repo_id}" if repo_id else "this folder"
    summaries = [read_scores(p) for p in scores or []]
    dtype = info.get("dtype") or ""
    call = export.get("pipeline_call") or {"num_inference_steps": 1, "guidance_scale": 1.0}
    note = file_note_name(path) if fmt == "single-file" else None
    local = "" if base_model else " (`TEACHER_DIR`: the teacher's diffusers folder)"
    if fmt == "single-file":
        title = f"# One-step student of {teacher} (single-file checkpoint)"
        what = (
            f"`{name}` holds the merged student in the original Stable Diffusion key layout "
            "(A1111, ComfyUI: load it as a checkpoint). The scheduler is not in the file; "
            f"sample with: {info.get('summary', '1 step, trailing timestep, CFG 1')}. "
            f"`{note}` has the exact diffusers scheduler."
        )
        code = [
            "import json",
            f"from diffusers import {cls}, {export.get('scheduler', 'DDIMScheduler')}",
            "",
            f'pipe = {cls}.from_single_file("{name}", config="{teacher_ref}")',
            f"pipe.scheduler = {export.get('scheduler', 'DDIMScheduler')}.from_config("
            f'json.load(open("{note}"))["diffusers_scheduler"])',
            f'image = pipe("{EXAMPLE_PROMPT}", {_call_text(call)}).images[0]',
        ]
        extra_tags: tuple[str, ...] = ("single-file",)
    else:
        title = f"# One-step student of {teacher} as a LoRA"
        error = info.get("relative_to_change")
        what = (
            f"`{name}` is the student's change to its teacher's weights as a LoRA "
            f"({info.get('keys', 'peft')} keys, rank {info.get('rank')}"
            + (f", relative weight error {error:.3g} of the change" if _number(error) else "")
            + "). Apply it to the teacher and use the student's scheduler "
            f"({export.get('scheduler', 'DDIMScheduler')}: {len(export.get('timesteps') or [999])} "
            "step(s), trailing timesteps, CFG 1)."
        )
        scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
        settings = {
            k: scheduler[k]
            for k in (
                "timestep_spacing",
                "set_alpha_to_one",
                "clip_sample",
                "thresholding",
                "rescale_betas_zero_snr",
                "prediction_type",
            )
            if k in scheduler
        }
        code = [
            f"from diffusers import {cls}, {export.get('scheduler', 'DDIMScheduler')}",
            "",
            f'pipe = {cls}.from_pretrained("{teacher_ref}")',
            f'pipe.load_lora_weights("{repo_id or "."}", weight_name="{name}")',
            f"pipe.scheduler = {export.get('scheduler', 'DDIMScheduler')}.from_config("
            f"pipe.scheduler.config, {_call_text(settings)})",
            f'image = pipe("{EXAMPLE_PROMPT}", {_call_text(call)}).images[0]',
        ]
        if scheduler.get("trained_betas") is not None:
            what += (
                " The student's scheduler has its own betas (a trained alpha_bar_T or a "
                "timestep below 999): the teacher's schedule is close, the diffusers-folder "
                "export is exact."
            )
        extra_tags = ("lora",)
    lines = [
        title,
        "",
        what,
        "",
        f"- Files in {where}: `{name}`" + (f", `{note}`" if note else "") + ".",
        f"- Pipeline: `{cls}`; teacher: `{teacher}`"
        + ("" if base_model else " (local folder)")
        + (f"; weights {dtype}" if dtype else "")
        + ".",
        "",
        "## How to use",
        "",
        f"With diffusers{local}:",
        "",
        "```python",
        *code,
        "```",
        "",
    ]
    lines += _recipe_section(export.get("recipe"))
    lines += _scores_section(summaries, None)
    return _front_matter(base_model, extra_tags) + "\n" + "\n".join(lines)


def file_note_name(path: Path) -> str:
    return path.name.removesuffix(".safetensors") + ".scheduler.json"


# -- the Hub ----------------------------------------------------------------------------------


def push_to_hub(
    paths: list[str | os.PathLike],
    repo_id: str,
    *,
    card: str | os.PathLike | None = None,
    private: bool = False,
    token: str | None = None,
    api=None,
) -> str:
    """Upload an export to the Hub repo ``repo_id`` (created if needed); returns its URL.

    ``paths``: one folder (a diffusers export, uploaded as it is) or the files of a
    single-file / LoRA export with their ``card`` (uploaded as ``README.md``).  The token
    is ``token``, else ``HF_TOKEN`` / the stored login.  Offline, without a token or when
    the Hub refuses, one line names the fix; the local export is never touched.
    """

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    done = Path(paths[0])
    token = token or os.environ.get("HF_TOKEN") or None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError(
            f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; the export is complete in "
            f"{done}: unset HF_HUB_OFFLINE and upload it with `hf upload {repo_id} {done}`"
        )
    if token is None and not _stored_token():
        raise ValueError(
            f"cannot push to {repo_id}: no Hugging Face token; set HF_TOKEN, pass --token, or "
            f"run `hf auth login` (the export is complete in {done})"
        )
    api = api or HfApi(token=token)
    paths = [Path(p) for p in paths]
    message = "Upload one-step student exported by wadi"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if len(paths) == 1 and paths[0].is_dir():
            api.upload_folder(
                repo_id=repo_id, folder_path=str(paths[0]), commit_message=message, token=token
            )
        else:  # files (and their card as README.md) in one commit, read where they lie
            from huggingface_hub import CommitOperationAdd

            files = [(p.name, p) for p in paths]
            if card is not None:
                files.append((CARD_NAME, Path(card)))
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                for name, path in files
            ]
            api.create_commit(
                repo_id=repo_id, operations=operations, commit_message=message, token=token
            )
    except OfflineModeIsEnabled:
        raise ValueError(
            f"cannot push to {repo_id}: huggingface_hub is in offline mode; unset "
            f"HF_HUB_OFFLINE (the export is complete in {done})"
        ) from None
    except HfHubHTTPError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"the Hub refused the upload to {repo_id} ({first}); check the token's write "
            f"access and the repo name (the export is complete in {done})"
        ) from None
    except Exception as err:
        if not _network_error(err):
            raise
        raise ValueError(
            f"cannot reach the Hub to push to {repo_id} ({type(err).__name__}); check the "
            f"network and retry (the export is complete in {done})"
        ) from None
    return str(url) if url is not None else f"https://huggingface.co/{repo_id}"


def _network_error(err: BaseException) -> bool:
    """A connection problem (requests, httpx, sockets), not a bug or a local file error."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return True
    try:
        import httpx

        return isinstance(err, httpx.TransportError)
    except ImportError:
        return False


def _stored_token() -> bool:
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - an unreadable token file is no token
        return False
