"""Human-preference scores of generated images: PickScore and HPSv2, from local weights.

Both are CLIP ViT-H/14 fine-tunes that score an (image, prompt) pair by a scaled cosine
of their embeddings; they differ in the scale the field reports:

* **PickScore** (Kirstain et al. 2023, ``yuvalkirstain/PickScore_v1``): a transformers
  ``CLIPModel``; ``score = logit_scale.exp() * cos(image, text)`` (logit_scale.exp() is
  about 100), averaged over the prompts.  Its processor is the one of its base model,
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.  The paper's other form, the probability
  that one set's image is preferred to another's for the same prompt, is the softmax of
  the two scores: :func:`preference_probability`.
* **HPSv2** (Wu et al. 2023, ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``): an
  open_clip ``ViT-H-14`` fine-tune; ``score = 100 * cos(image, text)`` averaged over the
  prompts, as the HPSv2 benchmark prints it.  The published checkpoints are pickles, which
  wadi does not open: the user converts the state dict to safetensors once (docs/eval.md)
  and wadi maps open_clip's keys onto a transformers ``CLIPModel``
  (:func:`open_clip_to_transformers`), whose config comes from the local base folder.

Nothing is downloaded; a missing file is one ``ValueError`` naming the file and its
source.  Images reach the model as saved (centre square crop only, no protocol resize),
then through the CLIP processor: bicubic shortest side 224, centre crop 224, CLIP
mean/std, which is also what open_clip's ViT-H-14 validation transform does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wadi.eval.extractors import TransformersCLIP

PICKSCORE_SOURCE = "yuvalkirstain/PickScore_v1"
CLIP_H_SOURCE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPSV2_SOURCE = "xswu/HPSv2 (HPS_v2.1_compressed.pt or HPS_v2_compressed.pt)"
HPSV2_SCALE = 100.0

__all__ = [
    "scaled_cosine",
    "preference_probability",
    "open_clip_to_transformers",
    "PreferenceModel",
    "load_pickscore",
    "load_hpsv2",
    "score_preference",
]


def scaled_cosine(image_embeds, text_embeds, scale: float) -> np.ndarray:
    """Per pair ``scale * cos(image_i, text_i)`` in float64, shape ``(N,)``."""
    img = np.asarray(image_embeds, dtype=np.float64)
    txt = np.asarray(text_embeds, dtype=np.float64)
    if img.ndim != 2 or img.shape != txt.shape or img.shape[0] == 0:
        raise ValueError(
            f"image embeddings {img.shape} and text embeddings {txt.shape} must be equal (N, D)"
        )
    img = img / np.linalg.norm(img, axis=1, keepdims=True).clip(1e-12)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True).clip(1e-12)
    return float(scale) * (img * txt).sum(axis=1)


def preference_probability(scores_a, scores_b) -> float:
    """Mean over prompts of P(image A preferred to image B) = softmax of the two scores.

    PickScore's pairwise form (``exp(a) / (exp(a) + exp(b))``, i.e. ``sigmoid(a - b)``),
    for two image sets scored on the same prompts in the same order.
    """
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(
            f"need per-prompt scores of both sets for the same prompts, got {a.size} and {b.size}"
        )
    # sigmoid(a - b) written with tanh: no overflow for any score difference
    return float((0.5 * (1.0 + np.tanh((a - b) / 2.0))).mean())


# --------------------------------------------------------------------------------------
# open_clip ViT CLIP -> transformers CLIPModel keys
# --------------------------------------------------------------------------------------

_TOP = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# open_clip stores the projections as (width, embed) matrices applied as x @ P
_TRANSPOSED = {
    "text_projection": "text_projection.weight",
    "visual.proj": "visual_projection.weight",
}
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
# buffers some open_clip versions save; recomputed by the model, never weights
_IGNORED = {"attn_mask", "visual.attn_mask"}


def open_clip_to_transformers(state: dict) -> dict:
    """An open_clip ViT CLIP state dict (``visual.*``, ``transformer.*``...) in the key
    layout of ``transformers.CLIPModel``.

    Each open_clip tensor lands in exactly one place: the packed attention input
    projection ``in_proj_weight`` (3W x W, rows q|k|v) is split into ``q_proj``,
    ``k_proj`` and ``v_proj``; the two projection matrices are transposed into the
    ``nn.Linear`` weights; the rest is renamed.  A key outside this layout (another
    tower, a custom text encoder, SigLIP's ``logit_bias``) is a ``ValueError`` naming it.
    """
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    out: dict = {}
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _IN_PROJ.match(key)
        if m:
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}.self_attn"
            if value.shape[0] % 3:
                raise ValueError(f"{key} has {value.shape[0]} rows, not 3 x width (q, k, v)")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{m.group(3)}"] = part.contiguous()
            continue
        m = _RESBLOCK.match(key)
        if m and m.group(3) in _BLOCK:
            tower = "vision_model" if m.group(1) else "text_model"
            out[f"{tower}.encoder.layers.{m.group(2)}.{_BLOCK[m.group(3)]}.{m.group(4)}"] = value
            continue
        raise ValueError(
            f"unexpected key {key!r}: not an open_clip ViT CLIP state dict like HPSv2's "
            "(convert the checkpoint's 'state_dict' entry, see docs/eval.md)"
        )
    return out


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _processor_folder(folder: Path, for_what: str) -> Path:
    has_tokenizer = (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )
    # transformers < 5 writes preprocessor_config.json (the Hub's files), 5 processor_config.json
    has_images = any(
        (folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
    )
    if not has_images or not has_tokenizer:
        raise ValueError(
            f"no CLIP processor in {folder} (preprocessor_config.json and tokenizer files) "
            f"for {for_what}: pass --clip-h DIR, a local copy of {CLIP_H_SOURCE} "
            "(config.json, preprocessor_config.json, tokenizer files; its weights are not needed)"
        )
    return folder


def _load_processor(folder: Path):
    from transformers import CLIPProcessor

    return CLIPProcessor.from_pretrained(folder, local_files_only=True)


class PreferenceModel(TransformersCLIP):
    """A CLIP model that scores (image, prompt) pairs by ``scale * cos``.

    ``features``/``text_features`` are those of :class:`TransformersCLIP`; ``scale`` is
    the field's normalisation of this score (PickScore: the model's ``logit_scale.exp()``,
    HPSv2: 100).
    """

    def __init__(self, name: str, model, processor, scale: float, info: dict, device="cpu"):
        import torch

        self.name = name
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.processor = processor
        self.scale = float(scale)
        self.info = info

    def scores(self, image_embeds, text_embeds) -> np.ndarray:
        return scaled_cosine(image_embeds, text_embeds, self.scale)

    def describe(self) -> dict:
        return {"name": self.name, "backend": "transformers", "scale": self.scale, **self.info}


def load_pickscore(
    folder: str | Path, clip_h: str | Path | None = None, device: str = "cpu"
) -> PreferenceModel:
    """PickScore from a local copy of ``yuvalkirstain/PickScore_v1`` (safetensors only).

    The processor comes from ``clip_h`` (a local ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)
    or, without it, from the PickScore folder itself when its processor files are there.
    """
    from transformers import CLIPModel

    from wadi.eval.extractors import folder_weights_sha256

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"no PickScore model at {folder} (config.json missing): put config.json and "
            f"model.safetensors of {PICKSCORE_SOURCE} there"
        )
    if not list(folder.glob("*.safetensors")):
        raise ValueError(
            f"{folder} has no model.safetensors: get model.safetensors of {PICKSCORE_SOURCE} "
            "(wadi reads safetensors only, never pytorch_model.bin)"
        )
    processor_dir = _processor_folder(Path(clip_h).expanduser() if clip_h else folder, "PickScore")
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    info = {
        "model": str(folder),
        "weights_sha256": folder_weights_sha256(folder),
        "processor": str(processor_dir),
        "source": PICKSCORE_SOURCE,
        "score": "mean over prompts of logit_scale.exp() * cos(image, prompt) (Kirstain et al.)",
    }
    scale = float(model.logit_scale.detach().double().exp())
    return PreferenceModel("pickscore", model, _load_processor(processor_dir), scale, info, device)


def _materialise_position_ids(model) -> None:
    """Non-persistent ``position_ids`` buffers of a model built on the meta device."""
    import torch

    for module in model.modules():
        buffer = module._buffers.get("position_ids")
        if buffer is not None and buffer.is_meta:
            n = module.position_embedding.num_embeddings
            module.register_buffer(
                "position_ids", torch.arange(n).expand((1, -1)), persistent=False
            )
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"HPSv2 model has tensors left without values: {left[:3]}")


def load_hpsv2(
    weights: str | Path, clip_h: str | Path | None, device: str = "cpu"
) -> PreferenceModel:
    """HPSv2 from an open_clip state dict in safetensors and the local ViT-H-14 base folder.

    ``clip_h`` gives the architecture (its ``config.json``, a ``CLIPConfig``) and the
    processor; open_clip's ViT-H-14 uses exact GELU, so both towers are set to ``gelu``
    whatever the config says.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    from wadi.eval.inception import file_sha256

    weights = Path(weights).expanduser()
    if weights.suffix != ".safetensors":
        raise ValueError(
            f"--hpsv2 takes a .safetensors file, got {weights.name}: wadi does not unpickle "
            "HPS_v2*_compressed.pt; convert its 'state_dict' once (one line in docs/eval.md)"
        )
    if not weights.is_file():
        raise ValueError(
            f"HPSv2 weights not found: {weights}; convert the 'state_dict' of {HPSV2_SOURCE} "
            "to safetensors (one line in docs/eval.md)"
        )
    if clip_h is None:
        raise ValueError(
            f"HPSv2 needs --clip-h DIR, a local copy of {CLIP_H_SOURCE} (config.json, "
            "preprocessor_config.json, tokenizer files; its weights are not needed)"
        )
    base = Path(clip_h).expanduser()
    if not (base / "config.json").is_file():
        raise ValueError(
            f"no config.json in --clip-h {base}: put config.json of {CLIP_H_SOURCE} there"
        )
    processor_dir = _processor_folder(base, "HPSv2")
    config = CLIPConfig.from_pretrained(base, local_files_only=True)
    config.text_config.hidden_act = config.vision_config.hidden_act = "gelu"
    state = open_clip_to_transformers(load_file(str(weights)))
    with torch.device("meta"):
        model = CLIPModel(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(
            f"{weights.name} lacks {missing[0]} ({len(missing)} tensors missing): not a full "
            f"open_clip ViT CLIP state dict for the config in {base}"
        )
    for key, tensor in state.items():
        if key not in expected:
            raise ValueError(f"{weights.name}: {key} has no place in the CLIPModel of {base}")
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{weights.name}: {key} is {tuple(tensor.shape)}, the config in {base} wants "
                f"{tuple(expected[key].shape)} (another architecture than {CLIP_H_SOURCE}?)"
            )
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    _materialise_position_ids(model)
    info = {
        "weights": str(weights),
        "weights_sha256": file_sha256(weights),
        "config": str(base),
        "processor": str(processor_dir),
        "source": HPSV2_SOURCE,
        "score": "mean over prompts of 100 * cos(image, prompt) (HPSv2 benchmark)",
    }
    return PreferenceModel(
        "hpsv2", model, _load_processor(processor_dir), HPSV2_SCALE, info, device
    )


def score_preference(
    scorer: PreferenceModel,
    paths: Sequence[Path],
    prompts: Sequence[str],
    batch_size: int = 64,
    workers: int = 4,
) -> tuple[float, dict]:
    """Mean score of images ``paths[i]`` for ``prompts[i]``; the record of how it was made."""
    from wadi.eval.protocol import extract_features

    if len(paths) != len(prompts):
        raise ValueError(f"{len(paths)} images but {len(prompts)} prompts")
    img = extract_features(
        scorer, paths, None, batch_size, workers, desc=f"generated {scorer.name}"
    )
    txt = np.concatenate(
        [
            scorer.text_features(list(prompts[s : s + batch_size]))
            for s in range(0, len(prompts), batch_size)
        ]
    )
    per_image = scorer.scores(img, txt)
    record = {
        **scorer.describe(),
        "std": float(per_image.std(ddof=1)) if len(per_image) > 1 else None,
        # image i's score, for preference_probability against another set on these prompts
        "per_image": [float(v) for v in per_image],
        "prompts": "the captions as given, no prefix",
        "input": "image as saved (centre square crop only), then the CLIP processor: bicubic "
        "shortest side 224, centre crop 224, CLIP mean/std, float32",
    }
    return float(per_image.mean()), record
