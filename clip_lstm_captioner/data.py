"""Caption datasets: Hub ids, local folders in every public layout, the built-in `shapes` set.

Every source becomes the same `datasets.DatasetDict` with splits `train`, `validation` and
`test`, one row per image: `image` (a `datasets.Image()`), `image_id` (str) and `captions`
(all reference captions of that image). Splits are always by image, never by caption row
(`splits.py`), and the log says which source decided them; images are checked as they load
(`images.py`); the public folder layouts are read by `layouts.py`.

    splits = load_caption_dataset("shapes")     # offline, generated on first use
    splits["train"][0]["captions"]              # five reference captions

Sections: local folders (Kaggle, UIUC, COCO, Karpathy JSON, imagefolder metadata, folders that
`datasets` loads); Hub datasets; the public loader and its command-line flags. Importing this
module has no side effects.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

import datasets

from processing import first_line, is_hub_id

from .cli import hub_unreachable
from .errors import DatasetFormatError, DatasetUnavailableError
from .images import BAD_IMAGE_POLICIES, apply_bad_image_policy, check_images, check_policy, image_problem
from .layouts import (
    coco_annotation_files,
    karpathy_json,
    metadata_files,
    metadata_records,
    read_captions_txt,
    read_coco,
    read_karpathy,
    read_uiuc,
    uiuc_token_file,
)
from .shapes import make_shapes_dataset, shapes_root
from .splits import (
    OFFICIAL_LISTS,
    SPLIT_ALIASES,
    SPLIT_COLUMN,
    SPLITS,
    apply_split_lists,
    halved,
    log_split_source,
    read_karpathy_json,
    read_split_lists,
    seeded_split,
    splits_from_column,
)

__all__ = [
    "CAPTION_FEATURES",
    "DEFAULT_DATASET",
    "add_data_args",
    "dataset_from_args",
    "load_caption_dataset",
]
__all__ += ["DatasetFormatError", "DatasetUnavailableError", "read_captions_txt"]

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
    "use a local folder (Kaggle Images/ + captions.txt, the UIUC Flickr8k_text/, COCO annotations/, a "
    "Karpathy dataset_*.json, an imagefolder with metadata.jsonl/.csv/.parquet, a Hub download or "
    "save_to_disk folder), or 'shapes' (the built-in synthetic set, no download)"
)
LAYOUTS_HINT = (
    "expected Images/ + captions.txt (Kaggle), Flickr8k_text/Flickr8k.token.txt (UIUC), "
    "annotations/captions_*.json (COCO), a Karpathy dataset_*.json, metadata.jsonl/.csv/.parquet "
    "(imagefolder), README.md + data/*.parquet (a Hub download) or a save_to_disk folder"
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
# Local folders in the public layouts (readers in layouts.py)
# --------------------------------------------------------------------------------------


def _from_files(
    root: Path, paths: dict, captions: dict, lists: tuple[str, dict] | None, seed: int, on_bad_image: str
) -> datasets.DatasetDict:
    """Check the images, split them (by `lists` = (how, {split: ids}) when given, else seeded), build."""
    paths = check_images(paths, on_bad_image)
    if lists is None:
        how, splits = f"a seeded split by image (seed {seed})", seeded_split(paths, seed)
    else:
        how, splits = lists[0], apply_split_lists(lists[1], paths, str(root))
    log_split_source(str(root), how, splits)
    return _build_dataset_dict(splits, paths, captions)


def _flickr_lists(*folders: Path) -> tuple[str, dict] | None:
    """The official split lists, else a Karpathy JSON, in the first of `folders` holding one."""
    for folder in folders:
        lists = read_split_lists(folder)
        if lists:
            return OFFICIAL_LISTS, lists
    for folder in folders:
        found = karpathy_json(folder)
        if found:
            return f"the Karpathy split file {found.name}", read_karpathy_json(folder)
    return None


def _load_kaggle_folder(root: Path, seed: int, on_bad_image: str) -> datasets.DatasetDict:
    if not (root / "Images").is_dir():
        raise DatasetFormatError(f"{root}: has captions.txt but no Images/ folder (Kaggle Flickr8k layout)")
    paths, captions = read_captions_txt(root)
    return _from_files(root, paths, captions, _flickr_lists(root), seed, on_bad_image)


def _load_coco(root: Path, files: list[Path], seed: int, on_bad_image: str) -> datasets.DatasetDict:
    """Karpathy's split when a dataset_coco.json is beside the annotations, else by folder.

    Without it, train2014 is training data and val2014 is halved by image (seeded) into
    validation and test: COCO publishes no test captions, and halving keeps both held-out
    splits from the same distribution.
    """
    paths, captions, folders = read_coco(files)
    lists = _flickr_lists(root, root / "annotations")
    if lists is None:
        train = [i for name, ids in folders.items() if name.startswith("train") for i in ids]
        held_out = [i for name, ids in folders.items() if not name.startswith("train") for i in ids]
        validation, test = halved(held_out, seed)
        held_names = ", ".join(name for name in folders if not name.startswith("train"))
        how = f"the image folders ({held_names} halved by image with seed {seed} into validation and test)"
        lists = how, {"train": train, "validation": validation, "test": test}
    return _from_files(root, paths, captions, lists, seed, on_bad_image)


def _load_uiuc(root: Path, token_file: Path, seed: int, on_bad_image: str) -> datasets.DatasetDict:
    paths, captions = read_uiuc(root, token_file)
    return _from_files(root, paths, captions, _flickr_lists(token_file.parent, root), seed, on_bad_image)


def _load_karpathy(root: Path, found: Path, seed: int, on_bad_image: str) -> datasets.DatasetDict:
    paths, captions = read_karpathy(root, found)
    return _from_files(root, paths, captions, _flickr_lists(root), seed, on_bad_image)


# --------------------------------------------------------------------------------------
# Local folders: imagefolder layout with metadata.jsonl / .csv / .parquet
# --------------------------------------------------------------------------------------


def _caption_columns(columns: list[str], caption_column: str, where: str = "") -> list[str]:
    """`caption` itself (a string or list column), else `caption_0`, `caption_1`, ... in order.

    With the default name, a `text` column (the datasets imagefolder convention) is used when
    there is neither. The Hub path and metadata files share this rule.
    """
    if caption_column in columns:
        return [caption_column]
    numbered = [c for c in columns if re.fullmatch(rf"{re.escape(caption_column)}_\d+", c)]
    if not numbered and caption_column == "caption" and "text" in columns:
        return ["text"]
    if not numbered:
        raise DatasetFormatError(
            f"{where + ': ' if where else ''}no caption column {caption_column!r} or {caption_column}_0.. "
            f"(columns: {', '.join(columns)}); pass --caption_column"
        )
    return sorted(numbered, key=lambda c: int(c.rsplit("_", 1)[1]))


def _captions_of(record: dict, columns: list[str], where: str) -> list[str]:
    """All captions of a record over its caption columns; each a string, a list of strings or empty."""
    found = []
    for column in columns:
        if column not in record:
            raise DatasetFormatError(
                f"{where}: no {column!r} key (keys: {', '.join(record)}); pass --caption_column"
            )
        value = record[column]
        values = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise DatasetFormatError(f"{where}: {column!r} must be a non-empty string or list of strings")
        found += [v.strip() for v in values if v.strip()]
    if not found:
        raise DatasetFormatError(f"{where}: {columns[0]!r} must be a non-empty string or list of strings")
    return found


def _read_metadata(path: Path, root: Path, image_column: str, caption_column: str, rows: dict) -> None:
    """Add one metadata file's images, captions and `split` values to `rows`, grouping rows per image."""
    columns = None
    for where, record in metadata_records(path):
        columns = columns or _caption_columns(list(record), caption_column, where)
        # `file_name` is the datasets imagefolder convention; image_column is accepted too.
        file_key = "file_name" if "file_name" in record else image_column
        if not isinstance(record.get(file_key), str):
            raise DatasetFormatError(f"{where}: no 'file_name' (or {image_column!r}) key naming the image")
        image_path = path.parent / record[file_key]
        if not image_path.is_file():
            raise DatasetFormatError(f"{where}: image {record[file_key]!r} not found in {path.parent}")
        image_id = image_path.relative_to(root).as_posix()
        paths, captions, split_of = rows["paths"], rows["captions"], rows["split_of"]
        paths.setdefault(image_id, image_path)
        captions.setdefault(image_id, []).extend(_captions_of(record, columns, where))
        split = record.get("split")
        if split is not None and split_of.setdefault(image_id, str(split)) != str(split):
            raise DatasetFormatError(
                f"{where}: {image_id} is in split {split_of[image_id]!r} on an earlier row"
            )


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
    return splits


def _load_imagefolder(
    root: Path, image_column: str, caption_column: str, seed: int, on_bad_image: str
) -> datasets.DatasetDict:
    split_dirs = {
        p.name: SPLIT_ALIASES[p.name] for p in root.iterdir() if p.is_dir() and p.name in SPLIT_ALIASES
    }
    rows: dict[str, dict] = {"paths": {}, "captions": {}, "split_of": {}}
    for folder in [root, *(root / name for name in split_dirs)]:
        for metadata in metadata_files(folder):
            _read_metadata(metadata, root, image_column, caption_column, rows)
    lists = None
    if split_dirs:
        how = f"the split folders ({', '.join(sorted(split_dirs))})"
        lists = how, _folder_splits(rows["paths"], split_dirs, root)
    elif rows["split_of"]:
        lists = SPLIT_COLUMN, splits_from_column(rows["split_of"], str(root))
    return _from_files(root, rows["paths"], rows["captions"], lists, seed, on_bad_image)


def _has_metadata(root: Path) -> bool:
    return any(metadata_files(folder) for folder in [root, *(root / name for name in SPLIT_ALIASES)])


# --------------------------------------------------------------------------------------
# Folders that `datasets` itself loads: a Hub download (README.md + data/*.parquet), save_to_disk
# --------------------------------------------------------------------------------------


def _is_saved_to_disk(root: Path) -> bool:
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def _is_hub_download(root: Path) -> bool:
    """A dataset repo's files: data files under data/ or beside a README.md dataset card."""
    data_files = ("*.parquet", "*.arrow", "*.csv", "*.json", "*.jsonl")
    folders = [root / "data", root] if (root / "README.md").is_file() else [root / "data"]
    return any(next(folder.glob(f"**/{pattern}"), None) for folder in folders for pattern in data_files)


def _load_with_datasets(root: Path) -> datasets.Dataset | datasets.DatasetDict:
    """`load_from_disk` or `load_dataset` on a local folder, their errors made one line naming it."""
    try:
        if _is_saved_to_disk(root):
            return datasets.load_from_disk(str(root))
        return datasets.load_dataset(str(root))
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetsError) as error:
        raise DatasetFormatError(
            f"{root}: datasets could not load this folder ({first_line(error)})"
        ) from None


def _load_local_folder(
    root: Path, image_column: str, caption_column: str, seed: int, on_bad_image: str
) -> datasets.DatasetDict:
    """Recognise the layout of `root` (in this order) and load it."""
    if (root / "captions.txt").is_file():
        return _load_kaggle_folder(root, seed, on_bad_image)
    if token_file := uiuc_token_file(root):
        return _load_uiuc(root, token_file, seed, on_bad_image)
    if coco_files := coco_annotation_files(root):
        return _load_coco(root, coco_files, seed, on_bad_image)
    if _has_metadata(root):
        return _load_imagefolder(root, image_column, caption_column, seed, on_bad_image)
    if karpathy := karpathy_json(root):
        return _load_karpathy(root, karpathy, seed, on_bad_image)
    if _is_saved_to_disk(root) or _is_hub_download(root):
        rows = _load_with_datasets(root)
        return _from_rows(rows, image_column, caption_column, seed, on_bad_image, str(root))
    raise DatasetFormatError(f"{root}: not a caption dataset folder; {LAYOUTS_HINT}")


# --------------------------------------------------------------------------------------
# Hub datasets (and already-loaded Dataset / DatasetDict objects)
# --------------------------------------------------------------------------------------


def _unavailable(source: str, reason: str) -> DatasetUnavailableError:
    cache = datasets.config.HF_DATASETS_CACHE
    cache_hint = (
        f"offline mode found no copy in the Hugging Face datasets cache {cache}"
        if datasets.config.HF_HUB_OFFLINE
        else f"with HF_HUB_OFFLINE=1 a copy already in the Hugging Face datasets cache {cache} is used"
    )
    return DatasetUnavailableError(
        f"cannot load {source!r} from the Hugging Face Hub ({reason}), and there is no local folder of that name; "
        f"{_OFFLINE_ALTERNATIVES}; {cache_hint}"
    )


def _download_hub_dataset(source: str) -> datasets.DatasetDict:
    """`datasets.load_dataset(source)`, failing in seconds (not after ~25 s of retries) when offline.

    Hub data stays in the Hugging Face cache (HF_DATASETS_CACHE / HF_HOME), never in
    --data_cache_dir: a copy already there is found offline and not downloaded again online.
    """
    reason = None if datasets.config.HF_HUB_OFFLINE else hub_unreachable(source, "dataset")
    if reason:
        raise _unavailable(source, reason)
    try:
        return datasets.load_dataset(source)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise _unavailable(source, first_line(error)) from None


def _convert_batch(
    batch: dict, indices: list[int], *, split: str, image_column: str, caption_columns: list[str]
) -> dict:
    """Map function: our columns, `problem` (why an image is unreadable, or None) and the `split` column's value."""
    image_ids, captions, problems = [], [], []
    for row, (image, index) in enumerate(zip(batch[image_column], indices, strict=True)):
        name = Path(image["path"]).name if image.get("path") else f"{split}-{index:06d}"
        values = [batch[c][row] for c in caption_columns]
        values = [v for value in values for v in ([value] if isinstance(value, str) else value or [])]
        source = image["bytes"] if image.get("bytes") else Path(image["path"])
        image_ids.append(name)
        captions.append([v.strip() for v in values if v and v.strip()])
        problems.append(image_problem(source, f"{split}[{index}] {name}"))
    split_values = batch.get("split") or [None] * len(image_ids)
    return {
        "image": batch[image_column],
        "image_id": image_ids,
        "captions": captions,
        "problem": problems,
        "source_split": [None if v is None else str(v) for v in split_values],
    }


def _convert_split(
    dataset: datasets.Dataset, split: str, image_column: str, caption_columns: list[str]
) -> tuple[datasets.Dataset, list]:
    features = datasets.Features(
        {
            **CAPTION_FEATURES,
            "image": datasets.Image(decode=False),
            "problem": datasets.Value("string"),
            "source_split": datasets.Value("string"),
        }
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


def _resplit_rows(converted: dict[str, datasets.Dataset], seed: int, source: str) -> datasets.DatasetDict:
    """The source's train/validation/test splits when it has all three, else its `split` column, else seeded."""
    named = {SPLIT_ALIASES.get(name): ds for name, ds in converted.items()}
    if set(named) >= set(SPLITS):
        log_split_source(source, "the source's own splits", {s: named[s]["image_id"] for s in SPLITS})
        return datasets.DatasetDict({split: named[split] for split in SPLITS})
    pooled = datasets.concatenate_datasets(list(converted.values()))
    row_of = {image_id: row for row, image_id in enumerate(pooled["image_id"])}
    split_of = {
        i: v for i, v in zip(pooled["image_id"], pooled["source_split"], strict=True) if v is not None
    }
    if split_of:
        how, lists = SPLIT_COLUMN, splits_from_column(split_of, source)
        splits = apply_split_lists(lists, row_of, source)
    else:
        how, splits = f"a seeded split by image (seed {seed})", seeded_split(row_of, seed)
    log_split_source(source, how, splits)
    return datasets.DatasetDict(
        {split: pooled.select([row_of[i] for i in ids]) for split, ids in splits.items()}
    )


def _from_rows(
    raw: datasets.Dataset | datasets.DatasetDict,
    image_column: str,
    caption_column: str,
    seed: int,
    on_bad_image: str,
    source: str = "dataset",
) -> datasets.DatasetDict:
    """Convert a Hub-style dataset (one row per image) to our columns and splits; `source` names it in logs."""
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
    splits = _resplit_rows(converted, seed, source)
    return splits.remove_columns(["problem", "source_split"]).cast(CAPTION_FEATURES)


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
    folder in one of the public layouts (`LAYOUTS_HINT`; README, "Training data"), a Hub
    dataset id such as `DEFAULT_DATASET` (kept in the Hugging Face cache, not `cache_dir`), or
    a loaded `Dataset` / `DatasetDict` with one row per image. `image_column`/`caption_column`
    name the columns of Hub datasets and metadata files (`caption` may hold a string or a list,
    or be split into `caption_0`, `caption_1`, ...; `text` is used when neither exists). The
    split comes from official lists, a Karpathy JSON, split folders, a `split` column or the
    source's own splits, else it is seeded by image with `seed`; the log says which.
    `on_bad_image="skip"` leaves unreadable images out with a logged count; "error" stops at
    the first with an `ImageLoadError` naming it.

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
    if str(source) == "shapes":  # generated under cache_dir; the only data that goes there
        return _load_kaggle_folder(make_shapes_dataset(shapes_root(cache_dir)), seed, on_bad_image)
    folder = Path(source).expanduser()
    if folder.is_dir():
        return _load_local_folder(folder, image_column, caption_column, seed, on_bad_image)
    if is_hub_id(str(source)):
        raw = _download_hub_dataset(str(source))
        return _from_rows(raw, image_column, caption_column, seed, on_bad_image, str(source))
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
        help=f"Hub dataset id (default {DEFAULT_DATASET}, needs the network or a copy in the HF "
        "cache), a local folder (Kaggle Images/ + captions.txt, UIUC Flickr8k_text/, COCO "
        "annotations/ + train2014/ val2014/, a Karpathy dataset_*.json + images, an imagefolder "
        "with metadata.jsonl/.csv/.parquet, a Hub download or save_to_disk folder), or 'shapes': "
        "the built-in synthetic set, for offline use.",
    )
    group.add_argument(
        "--image_column",
        default="image",
        help="Column holding the image in a Hub dataset, or the file column of a metadata file "
        "when it has no 'file_name' (default: image).",
    )
    group.add_argument(
        "--caption_column",
        default="caption",
        help="Column holding the caption(s): a string or list column, or the prefix of "
        "caption_0, caption_1, ... columns; 'text' is used when neither exists (default: caption).",
    )
    group.add_argument(
        "--split_seed",
        type=int,
        default=0,
        help="Seed of the by-image train/validation/test split for sources without their own "
        "split (lists, Karpathy JSON, split folders or column), and of COCO's val2014 halving (default: 0).",
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
        help="Folder for generated data (the shapes set) and the embedding cache (default: "
        "$CLIP_LSTM_CACHE or ~/.cache/clip_lstm_captioner). Hub datasets stay in the HF cache "
        "(set HF_DATASETS_CACHE or HF_HOME to move it).",
    )
    return parser


def dataset_from_args(args: argparse.Namespace) -> datasets.DatasetDict:
    """Load the dataset chosen by the flags of `add_data_args`.

    Example:
        parser = add_data_args(argparse.ArgumentParser())
        dataset_from_args(parser.parse_args(["--dataset", "shapes"]))["test"].num_rows
        # -> 250
    """
    _show_data_log()
    return load_caption_dataset(
        args.dataset,
        image_column=args.image_column,
        caption_column=args.caption_column,
        seed=args.split_seed,
        on_bad_image=args.on_bad_image,
        cache_dir=args.data_cache_dir,
    )


def _show_data_log() -> None:
    """Print the package's INFO lines (the split source, generated sets) on stderr in the scripts.

    The scripts configure no logging, and these lines must reach the user; the root logger's
    own handlers (when an application set some) still get them too.
    """
    package = logging.getLogger("clip_lstm_captioner")
    if not any(getattr(h, "_clip_lstm_data", False) for h in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("data: %(message)s"))
        handler._clip_lstm_data = True
        package.addHandler(handler)
    package.setLevel(min(package.getEffectiveLevel(), logging.INFO))
