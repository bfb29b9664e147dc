"""Train/validation/test splits, always by image: official lists, Karpathy JSON, or seeded.

>>> {name: len(ids) for name, ids in seeded_split([f"{i}.jpg" for i in range(40)]).items()}
{'train': 30, 'validation': 5, 'test': 5}
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from .errors import DatasetFormatError

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
