"""Caption datasets: Flickr8k (Hub id or local Kaggle folder), imagefolders, the built-in `shapes` set.

Every source becomes the same `datasets.DatasetDict` with splits `train`, `validation` and
`test`, one row per image: `image` (a `datasets.Image()`), `image_id` (str) and `captions`
(all reference captions of that image). Splits are always by image, never by caption row
(`splits.py`); images are checked as they load (`images.py`).

    splits = load_caption_dataset("shapes")     # offline, generated on first use
    splits["train"][0]["captions"]              # five reference captions

Sections: local folders (Kaggle layout and imagefolder + metadata.jsonl); Hub datasets; the
public loader and its command-line flags. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import datasets

from processing import first_line, is_hub_id

from .cli import hub_unreachable
from .errors import DatasetFormatError, DatasetUnavailableError
from .images import BAD_IMAGE_POLICIES, apply_bad_image_policy, check_images, check_policy, image_problem
from .shapes import make_shapes_dataset, shapes_root
from .splits import (
    SPLIT_ALIASES,
    SPLITS,
    apply_split_lists,
    read_karpathy_json,
    read_split_lists,
    seeded_split,
)

logger = logging.getLogger(__name__)

DEFAULT_DATASET = "jxie/flickr8k"
CAPTION_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "image_id": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
    }
)
_OFFLINE_ALTERNATIVES = (
    "use a local Flickr8k folder in the Kaggle layout (Images/ + captions.txt), an imagefolder with "
    "metadata.jsonl, or 'shapes' (the built-in synthetic set, no download)"
)

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
        paths, captions = read_captions_txt(Path("flickr8k"))
        len(captions["1000268201_693b08cb0e.jpg"])
        # -> 5
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
    paths = check_images(paths, on_bad_image)
    lists = read_split_lists(root) or read_karpathy_json(root)
    splits = apply_split_lists(lists, paths, str(root)) if lists else seeded_split(paths, seed)
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
    paths = check_images(paths, on_bad_image)
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
    reason = None if datasets.config.HF_HUB_OFFLINE else hub_unreachable(source, "dataset")
    if reason:
        raise _unavailable(source, reason)
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
        keep = apply_bad_image_policy(
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
        splits = load_caption_dataset("shapes")
        {name: len(rows) for name, rows in splits.items()}
        # -> {'train': 1500, 'validation': 250, 'test': 250}
        sorted(splits["train"].features)
        # -> ['captions', 'image', 'image_id']
    """
    check_policy(on_bad_image)
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
        parser = add_data_args(argparse.ArgumentParser())
        dataset_from_args(parser.parse_args(["--dataset", "shapes"]))["test"].num_rows
        # -> 250
    """
    return load_caption_dataset(
        args.dataset,
        image_column=args.image_column,
        caption_column=args.caption_column,
        seed=args.split_seed,
        on_bad_image=args.on_bad_image,
        cache_dir=args.data_cache_dir,
    )
