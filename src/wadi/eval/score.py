"""``wadi eval score``: FID, precision/recall, CLIP score, PickScore and HPSv2 of an image folder.

Generated images are matched to captions by index (``00042.png`` is caption 42); both
they and the reference images go through the protocol's centre crop + LANCZOS resize;
reference features are cached by a hash of the protocol.  The result JSON records every
knob, including the generation sidecar when the folder has one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from wadi.eval.generate import SIDECAR
from wadi.eval.metrics import clip_score, frechet_distance, precision_recall, warn_small_sample
from wadi.eval.protocol import (
    Captions,
    Protocol,
    extract_features,
    list_images,
    reference_features,
)
from wadi.files import write_json
from wadi.paths import writing_output

METRICS = ("fid", "pr", "clip", "pickscore", "hpsv2")
#: human-preference scores (wadi.eval.preference), each from its own local model
PREFERENCE_METRICS = ("pickscore", "hpsv2")
DEFAULT_CACHE_DIR = Path("~/.cache/wadi/eval")


def match_images_to_captions(images_dir: str | Path, captions: Captions) -> list[Path]:
    """Image paths in caption order; each caption index must have exactly one image."""
    files = list_images(images_dir)
    if len(files) != len(captions):
        raise ValueError(
            f"{captions.source} has {len(captions)} captions but {images_dir} holds "
            f"{len(files)} images; finish generation (`wadi eval generate` resumes) "
            "or pass the captions file the images were made from"
        )
    by_index = {}
    for path in files:
        if not path.stem.isdigit():
            raise ValueError(
                f"{path.name} in {images_dir} is not named by caption index (00042.png)"
            )
        by_index[int(path.stem)] = path
    missing = [i for i in range(len(captions)) if i not in by_index]
    if missing:
        raise ValueError(
            f"{images_dir} has no image for caption {missing[0]} ({len(missing)} missing)"
        )
    return [by_index[i] for i in range(len(captions))]


def _check_generation(images_dir: Path, captions: Captions) -> dict | None:
    sidecar = images_dir / SIDECAR
    if not sidecar.is_file():
        return None
    generation = json.loads(sidecar.read_text())
    used = generation.get("captions", {}).get("list_sha256")
    if used and used != captions.list_sha256:
        raise ValueError(
            f"{images_dir} was generated from other captions than {captions.source} "
            f"(see {SIDECAR}); pass the captions file it names"
        )
    return generation


def score_images(
    images_dir: str | Path,
    captions: Captions,
    protocol: Protocol,
    *,
    reference_dir: str | Path | None = None,
    metrics: tuple[str, ...] = METRICS,
    extractor=None,
    clip_extractor=None,
    preference: dict | None = None,
    pr_extractor=None,
    k: int = 3,
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    batch_size: int = 64,
    workers: int = 4,
) -> dict:
    """Compute the requested metrics; return the full record (results + every knob).

    ``extractor`` gives the features of FID and precision/recall (Inception-v3 for the
    COCO protocol, the digits evaluator for the toy demo); ``clip_extractor`` the CLIP
    embeddings.  Both are :class:`wadi.eval.extractors.FeatureExtractor` objects.
    ``preference`` maps ``pickscore``/``hpsv2`` to a
    :class:`wadi.eval.preference.PreferenceModel`.  ``pr_extractor``, when given, gives
    precision/recall its own features (VGG-16 fc2 as in Kynkaanniemi et al.), at its
    ``default_resize``.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric {sorted(unknown)[0]!r}; choose from {', '.join(METRICS)}")
    images_dir = Path(images_dir).expanduser()
    paths = match_images_to_captions(images_dir, captions)
    generation = _check_generation(images_dir, captions)
    from wadi import __version__

    record: dict = {
        "wadi": __version__,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "images": str(images_dir),
        "num_images": len(paths),
        "protocol": protocol.to_dict(),
        "captions": captions.describe(),
        "generation": generation,
        "results": {},
    }
    start = time.time()
    pr_own = "pr" in metrics and pr_extractor is not None
    if "fid" in metrics or ("pr" in metrics and not pr_own):
        if extractor is None or reference_dir is None:
            raise ValueError(
                "FID and precision/recall need a feature extractor and --reference DIR"
            )
        ref, ref_record = reference_features(
            extractor, reference_dir, protocol, cache_dir, batch_size, workers
        )
        ref_record["folder"] = str(Path(reference_dir).expanduser())
        if (
            protocol.reference_count
            and ref_record["key"]["reference_count"] != protocol.reference_count
        ):
            ref_record["warning"] = (
                f"{protocol.name} expects {protocol.reference_count} reference images, "
                f"found {ref_record['key']['reference_count']}"
            )
        gen = extract_features(
            extractor,
            paths,
            protocol.resize,
            batch_size,
            workers,
            desc=f"generated {extractor.name}",
        )
        record["extractor"] = extractor.describe()
        record["reference"] = ref_record
        if "fid" in metrics:
            record["results"]["fid"] = frechet_distance(gen, ref)
            what = "FID" if extractor.name == "inception" else f"FD of {extractor.name} features"
            small = warn_small_sample(min(len(gen), len(ref)), what)
            if small:
                record.setdefault("warnings", []).append(small)
        if "pr" in metrics and not pr_own:
            precision, recall = precision_recall(ref, gen, k=k)
            record["results"].update(precision=precision, recall=recall)
            record["pr_k"] = k
    if pr_own:
        if reference_dir is None:
            raise ValueError("precision/recall needs --reference DIR")
        pr_protocol = protocol.with_resize(pr_extractor.default_resize or protocol.resize)
        pr_ref, pr_ref_record = reference_features(
            pr_extractor, reference_dir, pr_protocol, cache_dir, batch_size, workers
        )
        pr_ref_record["folder"] = str(Path(reference_dir).expanduser())
        pr_gen = extract_features(
            pr_extractor, paths, pr_protocol.resize, batch_size, workers,
            desc=f"generated {pr_extractor.name}",
        )  # fmt: skip
        precision, recall = precision_recall(pr_ref, pr_gen, k=k)
        record["results"].update(precision=precision, recall=recall)
        record["pr_k"] = k
        record["pr_extractor"] = {**pr_extractor.describe(), "resize": pr_protocol.resize}
        record["pr_reference"] = pr_ref_record
    if "clip" in metrics:
        if clip_extractor is None:
            raise ValueError("the CLIP score needs a CLIP model: pass --clip-model DIR")
        img = extract_features(
            clip_extractor, paths, protocol.resize, batch_size, workers, desc="generated clip"
        )
        texts = [protocol.clip_prefix + t for t in captions.texts]
        txt = np.concatenate(
            [
                clip_extractor.text_features(texts[s : s + batch_size])
                for s in range(0, len(texts), batch_size)
            ]
        )
        record["results"]["clip_score"] = clip_score(img, txt)
        record["clip"] = {
            **clip_extractor.describe(),
            "prefix": protocol.clip_prefix,
            "score": "mean over captions of cos(image, text), unclamped and unscaled",
        }
    for name in (m for m in PREFERENCE_METRICS if m in metrics):
        from wadi.eval.preference import score_preference

        scorer = (preference or {}).get(name)
        if scorer is None:
            flag = "--pickscore DIR" if name == "pickscore" else "--hpsv2 FILE and --clip-h DIR"
            raise ValueError(f"{name} needs its local model: pass {flag} (see docs/eval.md)")
        mean, info = score_preference(scorer, paths, captions.texts, batch_size, workers)
        record["results"][name] = mean
        record[name] = info
    record["seconds"] = round(time.time() - start, 1)
    return record


def save_record(record: dict, path: str | Path) -> Path:
    """Write the record atomically; a failed write is one ``ValueError`` naming the path."""
    path = Path(path).expanduser()
    with writing_output(path):
        return write_json(path, record, sort_keys=True)
