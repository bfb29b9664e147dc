"""Train/validation/test splits, always by image: official lists, Karpathy JSON, a split column, or seeded.

Whichever source decides the split is logged once per load (`log_split_source`).

>>> {name: len(ids) for name, ids in seeded_split([f"{i}.jpg" for i in range(40)]).items()}
{'train': 30, 'validation': 5, 'test': 5}
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from .errors import DatasetFormatError
from .layouts import karpathy_entries, karpathy_id, karpathy_json

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Official Flickr8k split lists, as shipped with the original dataset.
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Karpathy's dataset_*.json split names; "restval" is extra training data.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}
OFFICIAL_LISTS = "the official split lists (Flickr_8k.*Images.txt)"
SPLIT_COLUMN = "the 'split' column"
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


def read_split_lists(root: Path) -> dict[str, list[str]] | None:
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


def read_karpathy_json(root: Path) -> dict[str, list[str]] | None:
    """Splits from a Karpathy `dataset_*.json` in `root` (restval goes to train), or None.

    COCO entries are named `filepath/filename` (val2014/COCO_val2014_....jpg), Flickr ones by file name.
    """
    found = karpathy_json(root)
    if found is None:
        return None
    column = {karpathy_id(entry): entry["split"] for entry in karpathy_entries(found)}
    return splits_from_column(column, str(found), KARPATHY_SPLITS)


def splits_from_column(
    split_of: dict[str, str], source: str, names: dict | None = None
) -> dict[str, list[str]]:
    """Lists from each image's split name (train/restval/val/validation/dev/test), in `split_of`'s order.

    Example:
        >>> splits_from_column({"a.jpg": "train", "b.jpg": "val", "c.jpg": "restval"}, "x")
        {'train': ['a.jpg', 'c.jpg'], 'validation': ['b.jpg'], 'test': []}
    """
    names = names or {**SPLIT_ALIASES, "restval": "train"}
    lists: dict[str, list[str]] = {split: [] for split in SPLITS}
    for image_id, name in split_of.items():
        if name not in names:
            raise DatasetFormatError(
                f"{source}: unknown split {name!r} for {image_id} (expected one of {', '.join(names)})"
            )
        lists[names[name]].append(image_id)
    return lists


def halved(image_ids, seed: int) -> tuple[list[str], list[str]]:
    """Split ids in two halves by a seeded shuffle (COCO's val2014 -> validation, test).

    Example:
        >>> [len(half) for half in halved([f"{i}.jpg" for i in range(7)], seed=0)]
        [3, 4]
    """
    ids = sorted(set(image_ids))
    random.Random(seed).shuffle(ids)
    return sorted(ids[: len(ids) // 2]), sorted(ids[len(ids) // 2 :])


def log_split_source(source: str, how: str, splits: dict[str, list[str]]) -> None:
    """One log line per load saying which source decided the split (issue: it must always be said)."""
    sizes = " / ".join(f"{split} {len(splits[split])}" for split in SPLITS)
    logger.info("%s: splits from %s (%s images)", source, how, sizes)


def apply_split_lists(lists: dict[str, list[str]], image_ids, source: str) -> dict[str, list[str]]:
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
