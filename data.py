"""Caption datasets: Flickr8k (Hub id or local Kaggle folder), imagefolders, the built-in `shapes` set.

Every source becomes the same `datasets.DatasetDict` with splits `train`, `validation` and
`test`, one row per image: `image` (a `datasets.Image()`), `image_id` (str) and `captions`
(all reference captions of that image). Splits are always by image, never by caption row.

    >>> splits = load_caption_dataset("shapes")             # offline, generated on first use
    >>> splits["train"][0]["captions"][:2]
    ['there is a blue square at the top', 'a blue square at the top']

Sections: errors and constants; image checks; splits; local folders (Kaggle layout and
imagefolder + metadata.jsonl); Hub datasets; the synthetic `shapes` set; the public loader
and its command-line flags. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import torch
from huggingface_hub import HfApi
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm.auto import tqdm

from processing import ImageLoadError, first_line, is_hub_id, load_image

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Errors and constants
# --------------------------------------------------------------------------------------

DEFAULT_DATASET = "jxie/flickr8k"
SPLITS = ("train", "validation", "test")
BAD_IMAGE_POLICIES = ("skip", "error")
CAPTION_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
    }
)
# Official Flickr8k split lists, as shipped with the original dataset.
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Karpathy's dataset_*.json split names; "restval" is extra training data.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
# Folder / Hub split names accepted as aliases of ours.
SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}
# The seeded split holds out this many images for validation and for test (Flickr8k's 1,000),
# one eighth of the images for smaller sets.
HELD_OUT_IMAGES = 1000

_OFFLINE_ALTERNATIVES = (
    "use a local Flickr8k folder in the Kaggle layout (Images/ + captions.txt), an imagefolder with "
    "metadata.jsonl, or 'shapes' (the built-in synthetic set, no download)"
)


class DatasetFormatError(ValueError):
    """A local dataset that does not have the expected layout; the message names the file and line."""


class DatasetUnavailableError(RuntimeError):
    """A Hub dataset that cannot be loaded (offline, not found); the message names the alternatives."""


def default_cache_dir() -> Path:
    """Where generated data and caches go: `$CLIP_LSTM_CACHE`, else `~/.cache/clip_lstm_captioner`.

    Example:
        >>> default_cache_dir().name
        'clip_lstm_captioner'
    """
    return Path(os.environ.get("CLIP_LSTM_CACHE") or Path.home() / ".cache" / "clip_lstm_captioner")


# --------------------------------------------------------------------------------------
# Image checks: cheap (header, size, end-of-stream); full decode errors are the cache's job
# --------------------------------------------------------------------------------------


def _tail(source: Path | bytes, size: int = 64) -> bytes:
    if isinstance(source, bytes):
        return source[-size:]
    with open(source, "rb") as file:
        file.seek(max(0, source.stat().st_size - size))
        return file.read()


def _decode_problem(source: Path | bytes, name: str) -> str | None:
    """Full decode through `load_image`; only for files the cheap checks could not clear."""
    try:
        load_image(source if isinstance(source, Path) else Image.open(io.BytesIO(source)))
    except ImageLoadError as error:
        return str(error)
    except (OSError, SyntaxError, ValueError) as error:  # a PIL image from bytes fails outside load_image
        return (
            f"{name}: unreadable image ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        )
    return None


def image_problem(source: Path | bytes, name: str | None = None) -> str | None:
    """Say in one line why `source` (a file or encoded bytes) is not a usable image, or return None.

    Cheap enough for every Flickr8k image: a header parse, a size check and, for JPEG, a
    look at the end-of-image marker (a truncated download lacks it); PNG CRCs are verified.
    Only a JPEG without the marker (or an unusual format) is decoded in full.

    Example:
        >>> image_problem(Path("empty.jpg"))
        'empty.jpg: empty file (0 bytes)'
    """
    name = name or str(source)
    try:
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        if size == 0:
            return f"{name}: empty file (0 bytes)"
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if min(image.size) < 1:
                return f"{name}: image of size {image.size}"
            if image.format == "JPEG":
                # Trailing padding after the EOI marker is legal, so strip it before looking.
                if _tail(source).rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
                    return None
            elif image.format == "PNG":
                image.verify()
                return None
    except FileNotFoundError:
        return f"{name}: no such image file"
    except UnidentifiedImageError:
        return f"{name}: not an image file PIL can read"
    except (OSError, SyntaxError, ValueError) as error:
        return (
            f"{name}: unreadable image ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
        )
    return _decode_problem(source, name)


def _check_images(paths: dict[str, Path], on_bad_image: str) -> dict[str, Path]:
    """Return `paths` without unreadable images (on_bad_image="skip") or raise ImageLoadError."""
    # Threads overlap the file reads (slow on cold or network disks); chunks of 64 keep the
    # per-task overhead below the cost of the check itself when files are in the page cache.
    files = list(paths.values())
    chunks = [files[start : start + 64] for start in range(0, len(files), 64)]
    with ThreadPoolExecutor(4) as pool:
        results = tqdm(
            pool.map(lambda chunk: [image_problem(f) for f in chunk], chunks),
            total=len(chunks),
            desc="checking images",
            unit="x64 images",
            disable=len(files) < 2000,
            leave=False,
        )
        problems = [problem for chunk in results for problem in chunk]
    return _apply_bad_image_policy(dict(zip(paths, problems, strict=True)), on_bad_image, paths)


def _apply_bad_image_policy(problems: dict, on_bad_image: str, items: dict) -> dict:
    bad = [problem for problem in problems.values() if problem]
    if not bad:
        return items
    if on_bad_image == "error":
        raise ImageLoadError(f"{bad[0]} (pass --on_bad_image skip to leave unreadable images out)")
    logger.warning("skipped %d unreadable image%s, e.g. %s", len(bad), "s" * (len(bad) > 1), bad[0])
    return {key: value for key, value in items.items() if not problems[key]}


# --------------------------------------------------------------------------------------
# Splits (always by image)
# --------------------------------------------------------------------------------------


def held_out_size(num_images: int) -> int:
    """Images in each of validation and test for a seeded split: 1,000 for Flickr8k-size sets.

    Example:
        >>> held_out_size(8091), held_out_size(2000), held_out_size(3)
        (1000, 250, 1)
    """
    return min(HELD_OUT_IMAGES, max(1, round(num_images / 8)))


def seeded_split(image_ids, seed: int = 0) -> dict[str, list[str]]:
    """Split image ids into train/validation/test, reproducibly from `seed` and never empty.

    The result depends only on the set of ids and the seed, not on their order.

    Example:
        >>> {k: len(v) for k, v in seeded_split([f"{i}.jpg" for i in range(40)]).items()}
        {'train': 30, 'validation': 5, 'test': 5}
    """
    ids = sorted(set(image_ids))
    if len(ids) < 3:
        raise DatasetFormatError(
            f"only {len(ids)} usable image(s); a dataset needs at least 3 (one per split)"
        )
    random.Random(seed).shuffle(ids)
    held_out = held_out_size(len(ids))
    return {
        "train": sorted(ids[2 * held_out :]),
        "validation": sorted(ids[:held_out]),
        "test": sorted(ids[held_out : 2 * held_out]),
    }


def _read_split_lists(root: Path) -> dict[str, list[str]] | None:
    """The official Flickr_8k.*Images.txt lists in `root`, or None when there are none."""
    present = {split: root / name for split, name in FLICKR8K_SPLIT_FILES.items() if (root / name).is_file()}
    if not present:
        return None
    if len(present) < len(FLICKR8K_SPLIT_FILES):
        missing = [name for split, name in FLICKR8K_SPLIT_FILES.items() if split not in present]
        raise DatasetFormatError(f"{root}: found some Flickr8k split lists but not {', '.join(missing)}")
    return {
        split: [line.strip() for line in path.read_text().splitlines() if line.strip()]
        for split, path in present.items()
    }


def _read_karpathy_json(root: Path) -> dict[str, list[str]] | None:
    """Splits from a Karpathy `dataset_*.json` in `root` (restval goes to train), or None."""
    found = sorted(root.glob("dataset_*.json"))
    if not found:
        return None
    if len(found) > 1:
        raise DatasetFormatError(
            f"{root}: several Karpathy split files ({', '.join(p.name for p in found)}); keep one"
        )
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for entry in json.loads(found[0].read_text())["images"]:
        if entry["split"] not in KARPATHY_SPLITS:
            raise DatasetFormatError(f"{found[0]}: unknown split {entry['split']!r} for {entry['filename']}")
        splits[KARPATHY_SPLITS[entry["split"]]].append(entry["filename"])
    return splits


def _apply_split_lists(lists: dict[str, list[str]], image_ids, source: str) -> dict[str, list[str]]:
    """Keep the listed images that exist; an image in two lists or an empty split is an error."""
    available = set(image_ids)
    seen: dict[str, str] = {}
    splits = {}
    for split in SPLITS:
        for image_id in lists[split]:
            if seen.setdefault(image_id, split) != split:
                raise DatasetFormatError(
                    f"{source}: {image_id} is listed in both {seen[image_id]} and {split}"
                )
        splits[split] = [image_id for image_id in dict.fromkeys(lists[split]) if image_id in available]
        if not splits[split]:
            raise DatasetFormatError(f"{source}: the {split} list names none of the usable images")
    unlisted = len(available - set(seen))
    if unlisted:  # Flickr8k's captions.txt has 91 images outside the official lists
        logger.info("%s: %d images are in no split list and are left out", source, unlisted)
    return splits


# --------------------------------------------------------------------------------------
# Building the DatasetDict
# --------------------------------------------------------------------------------------


def _build_dataset_dict(
    splits: dict[str, list[str]], paths: dict[str, Path], captions: dict[str, list[str]]
) -> datasets.DatasetDict:
    """One row per image; images stay files on disk, decoded on access."""
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "image": [str(paths[i]) for i in splits[split]],
                    "image_id": list(splits[split]),
                    "captions": [captions[i] for i in splits[split]],
                },
                features=CAPTION_FEATURES,
                split=datasets.NamedSplit(split),
            )
            for split in SPLITS
        }
    )


# --------------------------------------------------------------------------------------
# Local folders: Kaggle Flickr8k layout (Images/ + captions.txt)
# --------------------------------------------------------------------------------------


def _csv_field(text: str) -> str:
    """Undo the CSV quoting of a fully quoted field (outer quotes, doubled inner quotes); keep other text."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1].replace('""', ""):
        return text[1:-1].replace('""', '"')
    return text


def _iter_caption_rows(path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, image name, caption) from a Kaggle captions.txt, checking each row.

    Captions contain commas, so each line is split on its FIRST comma only.
    """
    with open(path, encoding="utf-8-sig", newline=None) as file:  # -sig: tolerate a BOM
        header = file.readline().strip()
        if header.replace(" ", "").lower() != "image,caption":
            raise DatasetFormatError(
                f"{path} line 1: expected the header 'image,caption', got {header[:60]!r}"
            )
        for number, line in enumerate(file, start=2):
            if not line.strip():
                continue
            name, comma, caption = line.rstrip("\n").partition(",")
            name, caption = _csv_field(name), _csv_field(caption)
            if not comma:
                raise DatasetFormatError(
                    f"{path} line {number}: no comma between image and caption: {line.strip()[:60]!r}"
                )
            if not name or not caption:
                raise DatasetFormatError(
                    f"{path} line {number}: empty {'image name' if not name else 'caption'}"
                )
            yield number, name, caption


def read_captions_txt(root: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Read `root/captions.txt` into ({image_id: path}, {image_id: captions}) in file order.

    A malformed row, or one naming an image missing from `root/Images`, raises
    `DatasetFormatError` naming the line.

    Example:
        >>> paths, captions = read_captions_txt(Path("flickr8k"))
        >>> len(captions["1000268201_693b08cb0e.jpg"])
        5
    """
    images_dir, captions_file = root / "Images", root / "captions.txt"
    on_disk = set(os.listdir(images_dir))  # one listing instead of 40k stat calls
    paths: dict[str, Path] = {}
    captions: dict[str, list[str]] = {}
    for number, name, caption in _iter_caption_rows(captions_file):
        if name not in paths:
            if name not in on_disk and not (images_dir / name).is_file():
                raise DatasetFormatError(
                    f"{captions_file} line {number}: image {name!r} not found in {images_dir}"
                )
            paths[name], captions[name] = images_dir / name, []
        captions[name].append(caption)
    return paths, captions


def _load_kaggle_folder(root: Path, seed: int, on_bad_image: str) -> datasets.DatasetDict:
    if not (root / "Images").is_dir():
        raise DatasetFormatError(f"{root}: has captions.txt but no Images/ folder (Kaggle Flickr8k layout)")
    paths, captions = read_captions_txt(root)
    paths = _check_images(paths, on_bad_image)
    lists = _read_split_lists(root) or _read_karpathy_json(root)
    splits = _apply_split_lists(lists, paths, str(root)) if lists else seeded_split(paths, seed)
    return _build_dataset_dict(splits, paths, captions)


# --------------------------------------------------------------------------------------
# Local folders: imagefolder layout with metadata.jsonl (COCO, Flickr30k, your own photos)
# --------------------------------------------------------------------------------------


def _captions_of(record: dict, caption_column: str, where: str) -> list[str]:
    if caption_column not in record:
        raise DatasetFormatError(
            f"{where}: no {caption_column!r} key (keys: {', '.join(record)}); pass --caption_column"
        )
    value = record[caption_column]
    values = [value] if isinstance(value, str) else value
    if (
        not isinstance(values, list)
        or not values
        or not all(isinstance(v, str) and v.strip() for v in values)
    ):
        raise DatasetFormatError(f"{where}: {caption_column!r} must be a non-empty string or list of strings")
    return [v.strip() for v in values]


def _read_metadata(
    path: Path,
    root: Path,
    image_column: str,
    caption_column: str,
    paths: dict[str, Path],
    captions: dict[str, list[str]],
) -> None:
    """Add one metadata.jsonl's images and captions to `paths`/`captions`, grouping rows per image."""
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        # `file_name` is the datasets imagefolder convention; image_column is accepted too.
        file_key = "file_name" if "file_name" in record else image_column
        if not isinstance(record.get(file_key), str):
            raise DatasetFormatError(f"{where}: no 'file_name' (or {image_column!r}) key naming the image")
        image_path = path.parent / record[file_key]
        if not image_path.is_file():
            raise DatasetFormatError(f"{where}: image {record[file_key]!r} not found in {path.parent}")
        image_id = image_path.relative_to(root).as_posix()
        paths.setdefault(image_id, image_path)
        captions.setdefault(image_id, []).extend(_captions_of(record, caption_column, where))


def _folder_splits(image_ids, split_dirs: dict[str, Path], root: Path) -> dict[str, list[str]]:
    """Assign each image to the split named by its top folder (train/, validation/ or val/, test/)."""
    if set(split_dirs.values()) != set(SPLITS):
        raise DatasetFormatError(
            f"{root}: split folders {sorted(split_dirs)} must be train, validation and test"
        )
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for image_id in image_ids:
        top = image_id.split("/", 1)[0]
        if top not in split_dirs:
            raise DatasetFormatError(f"{root}: {image_id} is outside the split folders {sorted(split_dirs)}")
        splits[split_dirs[top]].append(image_id)
    for split, ids in splits.items():
        if not ids:
            raise DatasetFormatError(f"{root}: the {split} folder has no usable images")
    return splits


def _load_imagefolder(
    root: Path, image_column: str, caption_column: str, seed: int, on_bad_image: str
) -> datasets.DatasetDict:
    split_dirs = {
        p.name: SPLIT_ALIASES[p.name] for p in root.iterdir() if p.is_dir() and p.name in SPLIT_ALIASES
    }
    metadata_files = [
        d / "metadata.jsonl"
        for d in [root, *(root / name for name in split_dirs)]
        if (d / "metadata.jsonl").is_file()
    ]
    paths: dict[str, Path] = {}
    captions: dict[str, list[str]] = {}
    for metadata in metadata_files:
        _read_metadata(metadata, root, image_column, caption_column, paths, captions)
    paths = _check_images(paths, on_bad_image)
    splits = _folder_splits(paths, split_dirs, root) if split_dirs else seeded_split(paths, seed)
    return _build_dataset_dict(splits, paths, captions)


def _has_metadata(root: Path) -> bool:
    return (root / "metadata.jsonl").is_file() or any(
        (root / name / "metadata.jsonl").is_file() for name in SPLIT_ALIASES
    )


def _load_local_folder(
    root: Path, image_column: str, caption_column: str, seed: int, on_bad_image: str
) -> datasets.DatasetDict:
    if (root / "captions.txt").is_file():
        return _load_kaggle_folder(root, seed, on_bad_image)
    if _has_metadata(root):
        return _load_imagefolder(root, image_column, caption_column, seed, on_bad_image)
    raise DatasetFormatError(
        f"{root}: neither a Kaggle Flickr8k folder (Images/ + captions.txt) nor an imagefolder with metadata.jsonl"
    )


# --------------------------------------------------------------------------------------
# Hub datasets (and already-loaded Dataset / DatasetDict objects)
# --------------------------------------------------------------------------------------


def _unavailable(source: str, reason: str) -> DatasetUnavailableError:
    cache_hint = (
        "offline mode found no copy in your Hugging Face cache"
        if datasets.config.HF_HUB_OFFLINE
        else "with HF_HUB_OFFLINE=1 a copy already in your Hugging Face cache is used"
    )
    return DatasetUnavailableError(
        f"cannot load {source!r} from the Hugging Face Hub ({reason}), and there is no local folder of that name; "
        f"{_OFFLINE_ALTERNATIVES}; {cache_hint}"
    )


def _download_hub_dataset(source: str, cache_dir: str | None) -> datasets.DatasetDict:
    """`datasets.load_dataset(source)`, failing in seconds (not after ~25 s of retries) when offline."""
    if not datasets.config.HF_HUB_OFFLINE:
        # datasets retries an unreachable Hub five times with backoff; one short request without
        # retries tells us first. Any failure of that request means the Hub cannot serve it.
        try:
            HfApi().dataset_info(source, timeout=5)
        except Exception as error:  # network, HTTP and not-found errors all end here
            raise _unavailable(source, first_line(error)) from None
    try:
        return datasets.load_dataset(source, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise _unavailable(source, first_line(error)) from None


def _caption_columns(columns: list[str], caption_column: str) -> list[str]:
    """`caption` itself (a string or list column), else `caption_0`, `caption_1`, ... in order."""
    if caption_column in columns:
        return [caption_column]
    numbered = [c for c in columns if re.fullmatch(rf"{re.escape(caption_column)}_\d+", c)]
    if not numbered:
        raise DatasetFormatError(
            f"no caption column {caption_column!r} or {caption_column}_0.. (columns: {', '.join(columns)}); "
            "pass --caption_column"
        )
    return sorted(numbered, key=lambda c: int(c.rsplit("_", 1)[1]))


def _convert_batch(
    batch: dict, indices: list[int], *, split: str, image_column: str, caption_columns: list[str]
) -> dict:
    """Map function: our columns, plus `problem` (why an image is unreadable, or None)."""
    image_ids, captions, problems = [], [], []
    for row, (image, index) in enumerate(zip(batch[image_column], indices, strict=True)):
        name = Path(image["path"]).name if image.get("path") else f"{split}-{index:06d}"
        values = [batch[c][row] for c in caption_columns]
        values = [v for value in values for v in ([value] if isinstance(value, str) else value or [])]
        source = image["bytes"] if image.get("bytes") else Path(image["path"])
        image_ids.append(name)
        captions.append([v.strip() for v in values if v and v.strip()])
        problems.append(image_problem(source, f"{split}[{index}] {name}"))
    return {"image": batch[image_column], "image_id": image_ids, "captions": captions, "problem": problems}


def _convert_split(
    dataset: datasets.Dataset, split: str, image_column: str, caption_columns: list[str]
) -> tuple[datasets.Dataset, list]:
    features = datasets.Features(
        {**CAPTION_FEATURES, "image": datasets.Image(decode=False), "problem": datasets.Value("string")}
    )
    converted = dataset.cast_column(image_column, datasets.Image(decode=False)).map(
        _convert_batch,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        fn_kwargs=dict(split=split, image_column=image_column, caption_columns=caption_columns),
        desc=f"checking {split} images",
    )
    return converted, converted["problem"]


def _resplit_rows(converted: dict[str, datasets.Dataset], seed: int) -> datasets.DatasetDict:
    """Use the source's train/validation/test splits when it has all three, else a seeded split."""
    named = {SPLIT_ALIASES.get(name): ds for name, ds in converted.items()}
    if set(named) >= set(SPLITS):
        return datasets.DatasetDict({split: named[split] for split in SPLITS})
    pooled = datasets.concatenate_datasets(list(converted.values()))
    row_of = {image_id: row for row, image_id in enumerate(pooled["image_id"])}
    return datasets.DatasetDict(
        {split: pooled.select([row_of[i] for i in ids]) for split, ids in seeded_split(row_of, seed).items()}
    )


def _from_rows(
    raw: datasets.Dataset | datasets.DatasetDict,
    image_column: str,
    caption_column: str,
    seed: int,
    on_bad_image: str,
) -> datasets.DatasetDict:
    """Convert a Hub-style dataset (one row per image) to our columns and splits."""
    raw = datasets.DatasetDict({"train": raw}) if isinstance(raw, datasets.Dataset) else raw
    columns = next(iter(raw.values())).column_names
    if image_column not in columns:
        raise DatasetFormatError(
            f"no image column {image_column!r} (columns: {', '.join(columns)}); pass --image_column"
        )
    caption_columns = _caption_columns(columns, caption_column)
    converted = {}
    for split, dataset in raw.items():
        rows, problems = _convert_split(dataset, split, image_column, caption_columns)
        keep = _apply_bad_image_policy(
            dict(enumerate(problems)), on_bad_image, dict.fromkeys(range(len(rows)))
        )
        converted[split] = rows.select(list(keep)) if len(keep) < len(rows) else rows
    ids = [i for rows in converted.values() for i in rows["image_id"]]
    if len(set(ids)) < len(ids):  # file names missing or repeated: number the rows instead
        converted = {
            split: rows.map(lambda _, index, s=split: {"image_id": f"{s}-{index:06d}"}, with_indices=True)
            for split, rows in converted.items()
        }
    splits = _resplit_rows(converted, seed)
    return splits.remove_columns("problem").cast(CAPTION_FEATURES)


# --------------------------------------------------------------------------------------
# The built-in synthetic set `shapes`
# --------------------------------------------------------------------------------------

SHAPES_VERSION = 1  # bump when the generator changes, so old caches are not reused
SHAPES_IMAGE_SIZE = 96
SHAPES_NUM_IMAGES = 2000
# Saturated colours with one-word names: every one has a channel <= 50, while every
# background channel is >= 205, so no object can be mistaken for background.
SHAPES_COLOURS = {
    "red": (215, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 205, 15),
    "green": (30, 150, 45),
    "blue": (35, 75, 215),
    "purple": (130, 45, 170),
    "black": (25, 25, 25),
}
# Fraction of its bounding square that each shape fills (for sizing by area).
SHAPES_KINDS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5}
# Areas in pixels (at 96 px); the smallest big object is >= 2x the largest small one.
_BIG_AREA, _SMALL_AREA = (700, 1200), (150, 330)
_POSITION_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "middle": "in the middle",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_NUMBERS = {1: "one", 2: "two", 3: "three"}


def _position_word(centre: tuple[float, float], image_size: int) -> str:
    column = ("left", "", "right")[min(2, int(3 * centre[0] / image_size))]
    row = ("top", "", "bottom")[min(2, int(3 * centre[1] / image_size))]
    return f"{row} {column}".strip() or "middle"


def _shape_mask(kind: str, box: list[int], image_size: int) -> Image.Image:
    """A 0/255 mask of one shape drawn in the inclusive square `box` = [x0, y0, x1, y1]."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if kind == "circle":
        draw.ellipse(box, fill=255)
    elif kind == "square":
        draw.rectangle(box, fill=255)
    elif kind == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    return mask


def _overlaps(box: list[int], others: list[list[int]], gap: int = 3) -> bool:
    return any(
        box[0] <= o[2] + gap and o[0] <= box[2] + gap and box[1] <= o[3] + gap and o[1] <= box[3] + gap
        for o in others
    )


def _place(
    side: int, taken: list[list[int]], used_cells: set, rng: random.Random, size: int
) -> list[int] | None:
    """A box of `side` px centred near the middle of a free third-of-image cell, or None."""
    for _ in range(50):
        cell = rng.choice([(r, c) for r in range(3) for c in range(3) if (r, c) not in used_cells])
        centre = [(k + 0.5) * size / 3 + rng.uniform(-6, 6) for k in (cell[1], cell[0])]
        x0, y0 = (int(min(max(c - side / 2, 2), size - 2 - side)) for c in centre)
        box = [x0, y0, x0 + side - 1, y0 + side - 1]
        if not _overlaps(box, taken):
            return box
    return None


def _sample_objects(rng: random.Random, size: int) -> list[dict] | None:
    """1-3 objects, the first strictly the largest (one big object, the rest small); None to retry."""
    count = rng.choice((1, 2, 3))
    pairs = rng.sample([(k, c) for k in SHAPES_KINDS for c in SHAPES_COLOURS], count)
    big = [count > 1 or rng.random() < 0.5] + [False] * (count - 1)
    objects, boxes, cells = [], [], set()
    for (kind, colour), is_big in zip(pairs, big, strict=True):
        area = rng.uniform(*(_BIG_AREA if is_big else _SMALL_AREA)) * (size / 96) ** 2
        side = round(math.sqrt(area / SHAPES_KINDS[kind]))
        box = _place(side, boxes, cells, rng, size)
        if box is None:
            return None
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        cells.add((min(2, int(3 * centre[1] / size)), min(2, int(3 * centre[0] / size))))
        boxes.append(box)
        objects.append(
            {
                "shape": kind,
                "colour": colour,
                "size": "big" if is_big else "small",
                "side": side,
                "bbox": box,
                "position": _position_word(centre, size),
            }
        )
    return objects


def _background(rng: random.Random, size: int) -> tuple[np.ndarray, dict]:
    """A light plain, gradient or noisy background: every channel stays in 205..255."""

    def tint() -> list[int]:
        return [rng.randint(222, 250) for _ in range(3)]

    kind = rng.choice(("plain", "gradient", "noise"))
    start, end = tint(), tint() if kind == "gradient" else None
    pixels = np.broadcast_to(np.array(start, dtype=np.float64), (size, size, 3)).copy()
    if kind == "gradient":
        ramp = np.linspace(0.0, 1.0, size)[:, None, None]  # top -> bottom
        pixels = np.broadcast_to((1 - ramp) * np.array(start) + ramp * np.array(end), (size, size, 3))
        pixels = pixels if rng.random() < 0.5 else pixels.transpose(1, 0, 2)  # or left -> right
    elif kind == "noise":
        pixels += np.random.default_rng(rng.getrandbits(64)).normal(0.0, 4.0, pixels.shape)
    info = {"kind": kind, "colours": [start] + ([end] if end else [])}
    return np.clip(np.rint(pixels), 205, 255).astype(np.uint8), info


def _noun(obj: dict, with_size: bool = False) -> str:
    words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
    return f"{'an' if words[0][0] in 'aeiou' else 'a'} {' '.join(words)}"


def _relation(a: dict, b: dict) -> str | None:
    """Where `a` is relative to `b`, only when their boxes are clearly apart on that axis."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
    dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
    vertical = "above" if ay1 < by0 else "below" if ay0 > by1 else None
    horizontal = "to the left of" if ax1 < bx0 else "to the right of" if ax0 > bx1 else None
    if vertical and horizontal:
        return vertical if abs(dy) >= abs(dx) else horizontal
    return vertical or horizontal


def shape_captions(objects: list[dict], rng: random.Random) -> list[str]:
    """Five different true captions of a scene whose first object is the largest, named first.

    Example:
        >>> captions = shape_captions([{"shape": "circle", "colour": "red", "size": "big", "position": "left",
        ...                             "bbox": [2, 30, 40, 68]}], random.Random(0))
        >>> len(set(captions)), captions[1]
        (5, 'a big red circle on the left')
    """
    largest, rest = objects[0], objects[1:]
    where = _POSITION_PHRASES[largest["position"]]
    if not rest:
        candidates = [
            _noun(largest),
            _noun(largest, True),
            f"{_noun(largest)} {where}",
            f"{_noun(largest, True)} {where}",
            f"there is {_noun(largest)} {where}",
            f"a picture of {_noun(largest)}",
            f"one {largest['colour']} {largest['shape']}",
        ]
    else:
        n = len(objects)
        others = " and ".join(_noun(o, True) for o in rest)
        placed = " and ".join(f"{_noun(o, True)} {_POSITION_PHRASES[o['position']]}" for o in rest)
        candidates = [
            f"{_noun(largest, True)} {'and' if n == 2 else 'with'} {others}",
            f"{_noun(largest)} and {_NUMBERS[n - 1]} small shape{'s' * (n > 2)}",
            f"{_noun(largest, True)} {where} and {placed}",
            f"{_NUMBERS[n]} shapes and the biggest is {_noun(largest)}",
            f"there is {_noun(largest, True)} {where}",
            f"{_noun(largest)} is the biggest of {_NUMBERS[n]} shapes",
        ]
        relation = _relation(largest, rest[0])
        if relation:
            candidates.append(f"{_noun(largest)} {relation} {_noun(rest[0])}")
    return rng.sample(list(dict.fromkeys(candidates)), 5)


def _draw_scene(seed: int, index: int, size: int) -> tuple[Image.Image, dict, list[str]]:
    """Scene `index` of the set with `seed`: the same (seed, index) always gives the same picture."""
    rng = random.Random(f"shapes-{seed}-{index}")  # str seeds hash with SHA-512: stable across runs
    objects = None
    while objects is None:
        objects = _sample_objects(rng, size)
    pixels, background = _background(rng, size)
    image = Image.fromarray(pixels, mode="RGB")
    for obj in objects:
        mask = _shape_mask(obj["shape"], obj["bbox"], size)
        obj["area"] = int(np.count_nonzero(np.asarray(mask)))
        image.paste(SHAPES_COLOURS[obj["colour"]], mask=mask)
    assert all(objects[0]["area"] >= 1.6 * o["area"] for o in objects[1:]), (
        "largest object must be clearly largest"
    )
    return image, {"background": background, "objects": objects}, shape_captions(objects, rng)


def _write_shapes(folder: Path, num_images: int, seed: int, size: int) -> None:
    """Write the whole set (Kaggle layout, split lists, scenes.jsonl, shapes.json) into `folder`."""
    (folder / "Images").mkdir(parents=True)
    names = [f"shapes_{index:05d}.jpg" for index in range(num_images)]
    with (
        open(folder / "captions.txt", "w", newline="") as captions_file,
        open(folder / "scenes.jsonl", "w") as scenes_file,
    ):
        writer = csv.writer(captions_file, lineterminator="\n")
        writer.writerow(["image", "caption"])
        for index, name in enumerate(tqdm(names, desc="generating shapes", leave=False)):
            image, scene, captions = _draw_scene(seed, index, size)
            # subsampling=0 (4:4:4 chroma) keeps small shapes' colours crisp.
            image.save(folder / "Images" / name, format="JPEG", quality=95, subsampling=0)
            writer.writerows([name, caption] for caption in captions)
            scenes_file.write(json.dumps({"image": name, **scene}) + "\n")
    for split, ids in seeded_split(names, seed).items():
        (folder / FLICKR8K_SPLIT_FILES[split]).write_text("".join(f"{i}\n" for i in ids))
    params = {"version": SHAPES_VERSION, "num_images": num_images, "seed": seed, "image_size": size}
    (folder / "shapes.json").write_text(json.dumps(params) + "\n")


def make_shapes_dataset(
    root: str | os.PathLike,
    num_images: int = SHAPES_NUM_IMAGES,
    seed: int = 0,
    image_size: int = SHAPES_IMAGE_SIZE,
) -> Path:
    """Generate the synthetic `shapes` set into `root` (Kaggle layout) unless it is already there.

    Deterministic: the same arguments give byte-identical files. The set is built in a temporary
    folder beside `root` and renamed into place, so an interrupted run never leaves a partial set.

    Example:
        >>> root = make_shapes_dataset("/tmp/shapes", num_images=60)
        >>> sorted(p.name for p in root.iterdir())[:3]
        ['Flickr_8k.devImages.txt', 'Flickr_8k.testImages.txt', 'Flickr_8k.trainImages.txt']
    """
    root = Path(root).expanduser()
    if num_images < 3 or image_size < 48:
        raise ValueError(
            f"make_shapes_dataset needs num_images >= 3 and image_size >= 48, got {num_images}, {image_size}"
        )
    params = {"version": SHAPES_VERSION, "num_images": num_images, "seed": seed, "image_size": image_size}
    if root.exists():
        return _check_existing_shapes(root, params)
    root.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        logger.info("generating the shapes set (%d images) in %s", num_images, root)
        _write_shapes(building / "set", num_images, seed, image_size)
        try:
            (building / "set").rename(root)
        except OSError:  # another process finished first; its set is identical
            return _check_existing_shapes(root, params)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root


def _check_existing_shapes(root: Path, params: dict) -> Path:
    try:
        existing = json.loads((root / "shapes.json").read_text())
    except (OSError, ValueError):
        raise ValueError(
            f"{root} exists and is not a shapes set (no readable shapes.json); choose another folder"
        ) from None
    if existing != params:
        raise ValueError(
            f"{root} holds a shapes set made with {existing}, not {params}; choose another folder"
        )
    return root


def shapes_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the default `shapes` set under `cache_dir` (default: `default_cache_dir()`).

    Example:
        >>> shapes_root("/tmp/cache").name
        'shapes-v1-n2000-seed0'
    """
    return (
        Path(cache_dir or default_cache_dir()).expanduser()
        / f"shapes-v{SHAPES_VERSION}-n{SHAPES_NUM_IMAGES}-seed0"
    )


def read_scenes(root: str | os.PathLike) -> dict[str, dict]:
    """Read a shapes set's `scenes.jsonl`: {image_id: {"image", "background", "objects"}}.

    Each object has shape, colour, size ("big"/"small"), side and area in pixels, position
    word and bbox [x0, y0, x1, y1] (inclusive); the first object is the largest.

    Example:
        >>> read_scenes(shapes_root())["shapes_00000.jpg"]["objects"][0]["colour"]
        'blue'
    """
    lines = (Path(root) / "scenes.jsonl").read_text().splitlines()
    return {scene["image"]: scene for scene in map(json.loads, lines)}


def _first_word_of(caption: str, words) -> str | None:
    return next((word for word in caption.lower().split() if word in words), None)


def score_shapes_captions(captions: dict[str, str], scenes: dict[str, dict]) -> dict[str, float]:
    """How often a caption's first colour word and first shape word name the largest object drawn.

    A model that ignores the image gets about 1 / len(SHAPES_COLOURS) on colour.

    Example:
        >>> score_shapes_captions({"shapes_00000.jpg": "a big blue square"}, read_scenes(shapes_root()))
        {'colour_accuracy': 1.0, 'shape_accuracy': 1.0, 'num_images': 1}
    """
    colour_hits = shape_hits = 0
    for image_id, caption in captions.items():
        largest = max(scenes[image_id]["objects"], key=lambda obj: obj["area"])
        colour_hits += _first_word_of(caption, SHAPES_COLOURS) == largest["colour"]
        shape_hits += _first_word_of(caption, SHAPES_KINDS) == largest["shape"]
    count = max(len(captions), 1)
    return {"colour_accuracy": colour_hits / count, "shape_accuracy": shape_hits / count, "num_images": len(captions)}


# --------------------------------------------------------------------------------------
# The public loader and its command-line flags
# --------------------------------------------------------------------------------------


def load_caption_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict = DEFAULT_DATASET,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    seed: int = 0,
    on_bad_image: str = "error",
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Load a caption dataset as train/validation/test splits of one row per image.

    `source` is "shapes" (the built-in synthetic set, generated under `cache_dir`), a local
    folder (Kaggle Flickr8k layout `Images/` + `captions.txt`, or an imagefolder with
    `metadata.jsonl`), a Hub dataset id such as `DEFAULT_DATASET`, or a loaded `Dataset` /
    `DatasetDict` with one row per image. `image_column`/`caption_column` name the columns of
    Hub datasets and metadata.jsonl (`caption` may hold a string or a list, or be split into
    `caption_0`, `caption_1`, ...). Folders without official split lists are split by image
    with `seed`. `on_bad_image="skip"` leaves unreadable images out with a logged count;
    "error" stops at the first with an `ImageLoadError` naming it.

    Example:
        >>> splits = load_caption_dataset("shapes")
        >>> {name: len(rows) for name, rows in splits.items()}
        {'train': 1500, 'validation': 250, 'test': 250}
        >>> sorted(splits["train"].features)
        ['captions', 'image', 'image_id']
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if isinstance(source, datasets.Dataset | datasets.DatasetDict):
        return _from_rows(source, image_column, caption_column, seed, on_bad_image)
    if str(source) == "shapes":
        return _load_kaggle_folder(make_shapes_dataset(shapes_root(cache_dir)), seed, on_bad_image)
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _load_local_folder(folder, image_column, caption_column, seed, on_bad_image)
    if is_hub_id(str(source)):
        raw = _download_hub_dataset(str(source), str(cache_dir) if cache_dir else None)
        return _from_rows(raw, image_column, caption_column, seed, on_bad_image)
    raise DatasetFormatError(
        f"dataset {str(source)!r}: no such folder and not a Hub dataset id; {_OFFLINE_ALTERNATIVES}"
    )


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the dataset flags shared by the training and evaluation scripts.

    Example:
        >>> args = add_data_args(argparse.ArgumentParser()).parse_args(["--dataset", "shapes"])
        >>> args.dataset, args.on_bad_image
        ('shapes', 'error')
    """
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset",
        default=DEFAULT_DATASET,
        help=f"Hub dataset id (default {DEFAULT_DATASET}, needs the network), a local folder "
        "(Kaggle Flickr8k layout Images/ + captions.txt, or an imagefolder with "
        "metadata.jsonl), or 'shapes': the built-in synthetic set, for offline use.",
    )
    group.add_argument(
        "--image_column",
        default="image",
        help="Column holding the image in a Hub dataset, or the file column of metadata.jsonl "
        "when it has no 'file_name' (default: image).",
    )
    group.add_argument(
        "--caption_column",
        default="caption",
        help="Column holding the caption(s): a string or list column, or the prefix of "
        "caption_0, caption_1, ... columns (default: caption).",
    )
    group.add_argument(
        "--split_seed",
        type=int,
        default=0,
        help="Seed of the by-image train/validation/test split for folders without split lists (default: 0).",
    )
    group.add_argument(
        "--on_bad_image",
        choices=BAD_IMAGE_POLICIES,
        default="error",
        help="What to do with an unreadable image: 'skip' it with a count in the log, or "
        "stop with an 'error' naming it (default: error).",
    )
    group.add_argument(
        "--data_cache_dir",
        default=None,
        help="Folder for generated data (the shapes set) and Hub downloads (default: "
        "$CLIP_LSTM_CACHE or ~/.cache/clip_lstm_captioner; Hub data: the HF cache).",
    )
    return parser


def dataset_from_args(args: argparse.Namespace) -> datasets.DatasetDict:
    """Load the dataset chosen by the flags of `add_data_args`.

    Example:
        >>> parser = add_data_args(argparse.ArgumentParser())
        >>> dataset_from_args(parser.parse_args(["--dataset", "shapes"]))["test"].num_rows
        250
    """
    return load_caption_dataset(
        args.dataset,
        image_column=args.image_column,
        caption_column=args.caption_column,
        seed=args.split_seed,
        on_bad_image=args.on_bad_image,
        cache_dir=args.data_cache_dir,
    )


# --------------------------------------------------------------------------------------
# The CLIP embedding cache: the frozen tower runs once per image and dataset
# --------------------------------------------------------------------------------------


class ImageFiles(torch.utils.data.Dataset):
    """Images (dicts with "path" and/or "bytes", undecoded) -> CLIP pixel tensors, in DataLoader workers.

    A bad image becomes (None, message) so the main process decides: skip or stop. Batch with
    `collate_fn=collate_pixels`. Used by the embedding cache and by caption_images.py.

    Example:
        >>> loader = DataLoader(ImageFiles([{"path": "a.jpg"}], image_processor), collate_fn=collate_pixels)
    """

    def __init__(self, sources: list[dict], image_processor):
        self.sources, self.image_processor = sources, image_processor

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        try:
            raw = source.get("bytes")
            image = load_image(Image.open(io.BytesIO(raw)) if raw else source["path"])
        except (ImageLoadError, OSError, SyntaxError, ValueError) as error:
            name = source.get("path") or f"image #{index}"
            return None, str(error) if isinstance(error, ImageLoadError) else f"{name}: unreadable image ({error})"
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return pixels, None


def collate_pixels(items):
    """Stack the readable images; keep the messages of the unreadable ones with their position."""
    good = [i for i, (pixels, _) in enumerate(items) if pixels is not None]
    pixels = torch.stack([items[i][0] for i in good]) if good else None
    return pixels, good, [(i, message) for i, (_, message) in enumerate(items) if message is not None]


def _embed_images(sources, model, image_processor, batch_size: int, num_workers: int, on_bad_image: str):
    """(N, D) float32 CLIP features of `sources`; rows of skipped images are NaN."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(sources, image_processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_pixels,
        pin_memory=torch.cuda.is_available(),
    )
    features = np.full((len(sources), model.config.image_feature_dim), np.nan, dtype=np.float32)
    bad, start = [], 0
    for pixels, good, problems in tqdm(loader, desc="CLIP embeddings", unit="batch"):
        if problems and on_bad_image == "error":
            raise ImageLoadError(problems[0][1])
        bad += [message for _, message in problems]
        if pixels is not None:
            rows = [start + i for i in good]
            features[rows] = model.get_image_features(pixels).cpu().numpy()
        start += len(good) + len(problems)
    if bad:
        logger.warning("skipped %d unreadable images while embedding, e.g. %s", len(bad), bad[0])
    return features


def weights_digest(module: torch.nn.Module) -> str:
    """Identity of a module's weights: a hash of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _files_digest(dataset: datasets.Dataset) -> str:
    """Size and modification time of every image file, so an edited image is re-embedded."""
    digest = hashlib.blake2b(digest_size=16)
    for source in dataset.cast_column("image", datasets.Image(decode=False))["image"]:
        path = source.get("path")
        if path and not source.get("bytes") and os.path.exists(path):
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def embedding_fingerprint(dataset: datasets.Dataset, model, image_processor, encoder_digest: str | None = None) -> str:
    """The cache key: the dataset's rows and files, the encoder's weights, the feature choice, preprocessing.

    Example:
        >>> embedding_fingerprint(splits["test"], model, processor.image_processor)
        'clip-embeds-3f2a9c...'
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in (
        dataset._fingerprint,
        _files_digest(dataset),
        encoder_digest or weights_digest(model.vision_tower),
        model.config.image_feature,
        image_processor.to_json_string(),
    ):
        digest.update(str(part).encode())
    return f"clip-embeds-{digest.hexdigest()}"


def cache_image_embeds(
    dataset: datasets.Dataset,
    model,
    image_processor,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
    on_bad_image: str = "error",
    encoder_digest: str | None = None,
) -> datasets.Dataset:
    """Add an `image_embeds` column: each image's raw (unnormalised) CLIP feature, computed once.

    The frozen tower of `model` (a ClipLstmForImageCaptioning) runs inside one `datasets.map`
    call, with images decoded in parallel by DataLoader workers (forked `num_proc` workers do
    not mix with CUDA), in bfloat16 on CUDA. The result is a datasets cache file named by
    `embedding_fingerprint`: a second run with the same data, encoder, feature and preprocessing
    reads it back instead of running CLIP; changing any of them computes a new one. Under
    several processes call it inside `accelerator.main_process_first()` so it runs once.
    Unreadable images stop with their path (`on_bad_image="error"`) or are dropped ("skip").
    Pass `encoder_digest=weights_digest(model.vision_tower)` when caching several splits with
    one encoder, to hash its weights (350 MB for ViT-B/32) once instead of per split.

    Example:
        >>> test = cache_image_embeds(splits["test"], model, processor.image_processor)
        >>> test.with_format("torch")["image_embeds"].shape
        torch.Size([250, 768])
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    key = embedding_fingerprint(dataset, model, image_processor, encoder_digest)
    folder = Path(cache_dir or default_cache_dir()) / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    features = undecoded.features.copy()
    features["image_embeds"] = datasets.List(datasets.Value("float32"), length=model.config.image_feature_dim)
    with_embeds = undecoded.map(
        lambda batch: {
            "image_embeds": _embed_images(batch["image"], model, image_processor, batch_size, workers, on_bad_image)
        },
        batched=True,
        batch_size=None,  # one call: the DataLoader inside does the batching and the parallel decoding
        features=features,
        cache_file_name=str(folder / f"{key}.arrow"),
        new_fingerprint=key,
        load_from_cache_file=True,
        desc="caching CLIP embeddings",
    )
    with_embeds = with_embeds.cast_column("image", datasets.Image())
    finite = torch.isfinite(image_embeds_of(with_embeds)).all(dim=1)
    return with_embeds if finite.all() else with_embeds.select(torch.nonzero(finite).flatten().tolist())


def image_embeds_of(split: datasets.Dataset) -> torch.Tensor:
    """The `image_embeds` column of a cached split as one (N, D) float32 tensor.

    Example:
        >>> image_embeds_of(test).shape
        torch.Size([250, 768])
    """
    return split.with_format("torch", columns=["image_embeds"])[:]["image_embeds"].float()


# --------------------------------------------------------------------------------------
# Training pairs: one item per (image, reference caption), padded per batch
# --------------------------------------------------------------------------------------


class CaptionPairs(torch.utils.data.Dataset):
    """Every reference caption of every image, as training items (image features, caption tokens).

    Captions are kept in one padded (N, L) tensor, and a batch is cut with a few tensor ops
    (`__getitems__`, which DataLoader calls with a batch's indices) and trimmed to its longest
    caption: no per-item Python padding, which would dominate a 10 ms GPU step.

    Example:
        >>> pairs = CaptionPairs.from_split(train, processor.tokenizer)
        >>> len(pairs) == sum(len(c) for c in train["captions"])
        True
        >>> sorted(pairs.__getitems__([0, 7]))
        ['attention_mask', 'image_embeds', 'input_ids', 'labels']
    """

    def __init__(self, image_embeds: torch.Tensor, image_index: torch.Tensor, token_ids: list[list[int]], pad_token_id: int):
        self.image_embeds, self.image_index = image_embeds, torch.as_tensor(image_index, dtype=torch.long)
        self.lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
        longest = int(self.lengths.max()) if len(token_ids) else 1
        self.tokens = torch.full((len(token_ids), longest), pad_token_id, dtype=torch.long)
        for row, ids in enumerate(token_ids):
            self.tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)

    @classmethod
    def from_split(cls, split: datasets.Dataset, tokenizer, max_length: int = 64) -> CaptionPairs:
        """Tokenise all captions of a split that has an `image_embeds` column."""
        image_index = [i for i, captions in enumerate(split["captions"]) for _ in captions]
        captions = [caption for captions in split["captions"] for caption in captions]
        token_ids = tokenizer(captions, truncation=True, max_length=max_length)["input_ids"] if captions else []
        return cls(image_embeds_of(split), image_index, token_ids, tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """A batch padded to its longest caption: `image_embeds`, `input_ids`, `attention_mask`, `labels` (-100 at padding)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        lengths = self.lengths[indices]
        input_ids = self.tokens[indices, : int(lengths.max())]
        attention_mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        return {
            "image_embeds": self.image_embeds[self.image_index[indices]],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, -100),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: value[0] for name, value in self.__getitems__([index]).items()}


def keep_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataLoader collate_fn for `CaptionPairs`: `__getitems__` already built the batch."""
    return batch
