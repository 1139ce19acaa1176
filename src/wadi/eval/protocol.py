"""The evaluation protocol: captions, image preprocessing and cached reference features.

method.md §6: 30,000 COCO-2014 val captions against all 40,504 val2014 images, both
sides centre-cropped and LANCZOS-resized to 256, and "A photo depicts " before each
caption for the CLIP score.  A COCO-2017 5K mode uses one caption per val2017 image.
No data is downloadable here: the user points at local caption and image files.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from wadi.files import atomic_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Protocol:
    """Every knob that decides how images and captions are compared."""

    name: str
    description: str
    num_captions: int | None  # None: any number
    reference_count: int | None  # expected reference images (a mismatch is reported, not fatal)
    resize: int | None = 256  # square side after the centre crop; None keeps the crop's size
    crop: str = "center"
    resample: str = "lanczos"
    clip_prefix: str = "A photo depicts "
    caption_seed: int = 0  # draws the captions from a COCO annotation file

    def with_resize(self, resize: int | None) -> Protocol:
        return Protocol(**{**asdict(self), "resize": resize})

    def to_dict(self) -> dict:
        return asdict(self)


PROTOCOLS: dict[str, Protocol] = {
    "coco2014-30k": Protocol(
        "coco2014-30k",
        "30,000 COCO-2014 val captions vs all 40,504 val2014 images",
        num_captions=30_000,
        reference_count=40_504,
    ),
    "coco2017-5k": Protocol(
        "coco2017-5k",
        "one caption per image of the 5,000 val2017 images vs val2017",
        num_captions=5_000,
        reference_count=5_000,
    ),
    "custom": Protocol("custom", "any captions file and reference folder", None, None),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj) -> str:
    """Hash of a JSON-able object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


@dataclass
class Captions:
    """The captions of one evaluation, in caption-index order, and where they came from."""

    texts: list[str]
    source: str
    file_sha256: str
    selection: str  # how they were picked from the file

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def list_sha256(self) -> str:
        return sha256_json(self.texts)

    def describe(self) -> dict:
        return {
            "file": self.source,
            "file_sha256": self.file_sha256,
            "selection": self.selection,
            "count": len(self.texts),
            "list_sha256": self.list_sha256,
        }


def _coco_captions(data: dict, protocol: Protocol, path: Path) -> tuple[list[str], str]:
    """Pick captions from a COCO ``captions_val20xx.json`` annotation file."""
    annotations = sorted(data["annotations"], key=lambda a: a["id"])
    if protocol.name == "coco2014-30k":
        n = protocol.num_captions
        if len(annotations) < n:
            raise ValueError(f"{path} holds {len(annotations)} captions, fewer than {n}")
        rng = np.random.default_rng(protocol.caption_seed)
        picked = np.sort(rng.choice(len(annotations), size=n, replace=False))
        texts = [annotations[i]["caption"] for i in picked]
        return texts, f"{n} annotations drawn without replacement, seed {protocol.caption_seed}"
    first: dict[int, str] = {}
    for ann in annotations:  # lowest annotation id per image
        first.setdefault(ann["image_id"], ann["caption"])
    texts = [first[i] for i in sorted(first)]
    return texts, "first caption (lowest annotation id) of each image, by image id"


def load_captions(path: str | Path, protocol: Protocol) -> Captions:
    """Captions from a ``.txt`` (one per line), a ``.json`` list, or a COCO annotation file.

    The count must match the protocol (30,000 or 5,000) unless it is ``custom``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".json":
        data = json.loads(raw)
        if isinstance(data, dict) and "annotations" in data:
            texts, selection = _coco_captions(data, protocol, path)
        elif isinstance(data, list) and all(isinstance(t, str) for t in data):
            texts, selection = data, "all entries of the JSON list, in order"
        else:
            raise ValueError(
                f"{path}: expected a JSON list of strings or a COCO captions annotation file"
            )
    else:
        lines = raw.decode("utf-8").splitlines()
        if lines and lines[-1] == "":
            lines = lines[:-1]
        empty = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if empty:
            raise ValueError(f"{path}: line {empty[0]} is empty; one caption per line expected")
        texts, selection = lines, "all lines, in order"
    texts = [t.strip() for t in texts]
    if not texts:
        raise ValueError(f"{path} holds no captions")
    if protocol.num_captions is not None and len(texts) != protocol.num_captions:
        raise ValueError(
            f"{path} has {len(texts)} captions but protocol {protocol.name} needs "
            f"{protocol.num_captions}; pass the right file or --protocol custom"
        )
    return Captions(texts, str(path), sha256_bytes(raw), selection)


def center_crop_resize(image, size: int | None = 256):
    """RGB, centre square crop (side = shorter side), then LANCZOS resize to ``size``.

    The crop offset is ``int(round((w - side) / 2.0))`` as in torchvision's ``CenterCrop``,
    so the crop matches torchvision-based reference pipelines pixel for pixel;
    ``(w - side) // 2`` sits one pixel off when ``w - side`` is 3 modulo 4 (640 x 425).
    """
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    if (w, h) != (side, side):
        image = image.crop((left, top, left + side, top + side))
    if size is not None and side != size:
        image = image.resize((size, size), resample=Image.Resampling.LANCZOS)
    return image


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; error when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not files:
        raise ValueError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}; point at the right "
            "folder or fill it with `wadi eval generate`"
        )
    return files


def folder_listing_sha256(files: Sequence[Path]) -> str:
    """Hash of a folder's file names and sizes: changes when images are added or replaced."""
    return sha256_json([[p.name, p.stat().st_size] for p in files])


def load_image(path: Path, size: int | None) -> np.ndarray:
    """One image file as uint8 ``(S, S, 3)`` after the protocol's crop and resize.

    A file PIL cannot decode (truncated, random bytes) is a ``ValueError`` naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(center_crop_resize(im, size))
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL signals a bad file by OSError (truncated, unidentified) or SyntaxError (bad chunk)
        reason = str(err)
        if isinstance(err, Image.UnidentifiedImageError) or str(path) in reason:
            reason = "no image format recognised: random bytes, or cut inside the header"
        raise ValueError(
            f"cannot decode image {path} ({reason}); replace or delete it "
            "(`wadi eval generate` remakes a deleted generated image)"
        ) from None


def load_images(paths: Sequence[Path], size: int | None, workers: int = 4, pool=None) -> np.ndarray:
    """Decode and preprocess images to one uint8 array ``(B, S, S, 3)`` (threads: PIL
    releases the GIL while decoding and resizing)."""
    if pool is None:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as own:
            return load_images(paths, size, pool=own)
    arrays = list(pool.map(lambda p: load_image(p, size), paths))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"images differ in size after preprocessing ({sorted(shapes)[:2]}); set a resize"
        )
    return np.stack(arrays)


def extract_features(
    extractor,
    paths: Sequence[Path],
    size: int | None,
    batch_size: int = 64,
    workers: int = 4,
    desc: str = "features",
) -> np.ndarray:
    """Features ``(N, D)`` of image files, in batches, with a progress bar.

    The next batch is decoded in background threads while the extractor runs.
    """
    from tqdm.auto import tqdm

    starts = list(range(0, len(paths), batch_size))
    out = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, ThreadPoolExecutor(1) as ahead:

        def submit(start):
            return ahead.submit(load_images, paths[start : start + batch_size], size, pool=pool)

        pending = submit(starts[0]) if starts else None
        for i in tqdm(range(len(starts)), desc=desc, unit="batch"):
            batch = pending.result()
            pending = submit(starts[i + 1]) if i + 1 < len(starts) else None
            out.append(np.asarray(extractor.features(batch), dtype=np.float32))
    return np.concatenate(out)


def reference_key(extractor, protocol: Protocol, files: Sequence[Path]) -> dict:
    """Everything the reference features depend on (not paths: a moved cache stays valid)."""
    described = {k: v for k, v in extractor.describe().items() if k not in ("weights", "model")}
    if extractor.describe().get("backend") == "open_clip":
        described["model"] = extractor.describe()["model"]
    return {
        "extractor": described,
        "resize": protocol.resize,
        "crop": protocol.crop,
        "resample": protocol.resample,
        "reference_listing_sha256": folder_listing_sha256(files),
        "reference_count": len(files),
    }


def reference_features(
    extractor,
    reference_dir: str | Path,
    protocol: Protocol,
    cache_dir: str | Path | None,
    batch_size: int = 64,
    workers: int = 4,
) -> tuple[np.ndarray, dict]:
    """Features of the reference folder, cached under ``cache_dir`` by a hash of the protocol.

    Returns the features and a record (key, hash, cache file, whether it was a cache hit).
    """
    from safetensors.numpy import load_file, save_file

    files = list_images(reference_dir)
    key = reference_key(extractor, protocol, files)
    digest = sha256_json(key)
    record = {"key": key, "hash": digest, "cache_file": None, "cache_hit": False}
    cache_file = None
    if cache_dir is not None:
        cache_file = (
            Path(cache_dir).expanduser() / f"ref-{extractor.name}-{digest[:20]}.safetensors"
        )
        record["cache_file"] = str(cache_file)
        if cache_file.is_file():
            try:
                cached = load_file(str(cache_file))["features"]
            except Exception as err:  # noqa: BLE001 - truncated or foreign file: recompute
                warnings.warn(
                    f"reference feature cache {cache_file} is damaged "
                    f"({type(err).__name__}); computing the features again",
                    stacklevel=2,
                )
            else:
                record["cache_hit"] = True
                return cached, record
    feats = extract_features(
        extractor, files, protocol.resize, batch_size, workers, desc=f"reference {extractor.name}"
    )
    if cache_file is not None:
        try:
            with atomic_file(cache_file) as tmp:
                save_file({"features": feats}, str(tmp), metadata={"key": json.dumps(key)})
        except OSError as err:  # a read-only cache must not throw the features away
            record["cache_file"] = None
            warnings.warn(
                f"reference features not cached: cannot write {cache_file} "
                f"({err.strerror or err}); pass a writable --cache-dir or --no-cache",
                stacklevel=2,
            )
    return feats, record
