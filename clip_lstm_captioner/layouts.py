"""Readers of the public caption-set layouts on disk, each to ({image_id: path}, {image_id: captions}).

One job: turn the files a user downloaded into image paths and reference captions, with errors
that name the file and line. Which split each image lands in is `splits.py`'s job; building the
`DatasetDict` and checking images is `data.py`'s. The layouts (see README, "Training data"):

    Kaggle Flickr8k      Images/ + captions.txt (CSV, header image,caption, pandas quoting)
    UIUC Flickr8k        Flicker8k_Dataset/ + Flickr8k_text/Flickr8k.token.txt (name.jpg#0<TAB>caption)
    Karpathy JSON        dataset_{flickr8k,flickr30k,coco}.json + the image folder
    COCO                 annotations/captions_{train,val}2014.json + train2014/, val2014/
    imagefolder          metadata.jsonl / .csv / .parquet with file_name and caption column(s)
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .errors import DatasetFormatError

logger = logging.getLogger(__name__)

Captions = dict[str, list[str]]
Paths = dict[str, Path]

UIUC_TOKEN_FILE = "Flickr8k.token.txt"
UIUC_TEXT_FOLDER = "Flickr8k_text"
# Where the images of a Flickr set usually sit beside its caption files ("." is the folder itself).
IMAGE_FOLDERS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", ".")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Files of a `save_to_disk` folder whose names look like Karpathy's dataset_*.json.
DATASETS_FILES = ("dataset_dict.json", "dataset_info.json")
# A line that starts like a captions.txt row: seen inside a quoted field, a quote was left open.
_ROW_START = re.compile(r"\n[^,\n]+\.(jpe?g|png|gif|bmp|webp)\s*,", re.IGNORECASE)

# ----------------------------------------------------------------------------- text files


def _line_of(raw: bytes, offset: int) -> int:
    return raw[:offset].count(b"\n") + 1


def read_text_file(path: Path) -> str:
    """The text of `path`: UTF-8 (BOM or not) or UTF-16 with a BOM; anything else names the line.

    A UTF-16 byte-order mark is unambiguous, so such files are decoded; Latin-1 and UTF-16
    without a BOM cannot be told apart from other encodings reliably, so they are refused.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "captions.txt"
    >>> _ = path.write_bytes("image,caption\\na.jpg,un café\\n".encode("utf-16"))
    >>> read_text_file(path).splitlines()[1]
    'a.jpg,un café'
    >>> _ = path.write_bytes("image,caption\\na.jpg,un café\\n".encode("latin-1"))
    >>> read_text_file(path)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    clip_lstm_captioner.errors.DatasetFormatError: .../captions.txt line 2: not UTF-8 text (byte 0xe9)...
    >>> import shutil; shutil.rmtree(path.parent)
    """
    raw = path.read_bytes()
    try:
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return raw.decode("utf-16")  # the BOM gives the byte order
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise DatasetFormatError(
                f"{path} line {_line_of(raw, nul)}: NUL bytes (UTF-16 without a byte-order mark?); "
                "save the file as UTF-8"
            )
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetFormatError(
            f"{path} line {_line_of(raw, error.start)}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
            "Latin-1 or another encoding? save the file as UTF-8"
        ) from None


# ----------------------------------------------------------------------------- Kaggle captions.txt


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (line where the record starts, fields) of a CSV file; quoted fields may span lines."""
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""), strict=True)
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as error:
        raise DatasetFormatError(f"{path} line {start}: not valid CSV ({error})") from None


def iter_caption_rows(path: Path) -> Iterator[tuple[int, str, str]]:
    """Yield (line number, image name, caption) from a Kaggle captions.txt, checking each row.

    The file is CSV as pandas writes it (a field with a comma or quote is quoted, inner quotes
    doubled); an unquoted caption with commas, as hand-made files have, is kept whole.
    """
    rows = _csv_rows(path)
    _, header = next(rows, (1, []))
    if [field.strip().lower() for field in header] != ["image", "caption"]:
        raise DatasetFormatError(
            f"{path} line 1: expected the header 'image,caption', got {','.join(header)[:60]!r}"
        )
    for number, row in rows:
        if not row:
            continue
        if len(row) < 2:
            raise DatasetFormatError(
                f"{path} line {number}: no comma between image and caption: {row[0].strip()[:60]!r}"
            )
        name, caption = row[0].strip(), ",".join(row[1:]).strip()
        if _ROW_START.search(caption):
            raise DatasetFormatError(
                f"{path} line {number}: a quoted caption runs over the following rows; check its quotes"
            )
        if not name or not caption:
            raise DatasetFormatError(f"{path} line {number}: empty {'image name' if not name else 'caption'}")
        yield number, name, caption


def read_captions_txt(root: Path) -> tuple[Paths, Captions]:
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
    paths: Paths = {}
    captions: Captions = {}
    for number, name, caption in iter_caption_rows(captions_file):
        if name not in paths:
            if name not in on_disk and not (images_dir / name).is_file():
                raise DatasetFormatError(
                    f"{captions_file} line {number}: image {name!r} not found in {images_dir}"
                )
            paths[name], captions[name] = images_dir / name, []
        captions[name].append(caption)
    return paths, captions


# ----------------------------------------------------------------------------- helpers for Flickr sets


def find_image_folder(root: Path, names: list[str], source: Path) -> Path:
    """The first of `IMAGE_FOLDERS` under `root` holding any of `names`."""
    wanted = set(names)
    for name in IMAGE_FOLDERS:
        folder = root / name
        if folder.is_dir() and not wanted.isdisjoint(os.listdir(folder)):
            return folder
    raise DatasetFormatError(
        f"{source}: none of its images (e.g. {names[0] if names else '?'}) is in {root} or its "
        f"folders {', '.join(IMAGE_FOLDERS[:-1])}"
    )


def drop_missing(paths: Paths, captions: Captions, source: Path) -> tuple[Paths, Captions]:
    """Leave out caption groups whose image is not on disk, reported in one counted line.

    The UIUC Flickr8k.token.txt has one such group, `2258277193_586949ec62.jpg.1`.
    """
    missing = [image_id for image_id, path in paths.items() if not path.is_file()]
    if missing:
        logger.warning(
            "%s: %d caption group%s without an image on disk left out, e.g. %s",
            source,
            len(missing),
            "s" * (len(missing) > 1),
            missing[0],
        )
    gone = set(missing)
    keep = [image_id for image_id in paths if image_id not in gone]
    if not keep:
        raise DatasetFormatError(
            f"{source}: none of its images is on disk (e.g. {missing[0] if missing else '?'})"
        )
    return {i: paths[i] for i in keep}, {i: captions[i] for i in keep}


# ----------------------------------------------------------------------------- UIUC Flickr8k


def uiuc_token_file(root: Path) -> Path | None:
    """`Flickr8k.token.txt` in `root` or `root/Flickr8k_text`, or None."""
    for folder in (root, root / UIUC_TEXT_FOLDER):
        if (folder / UIUC_TOKEN_FILE).is_file():
            return folder / UIUC_TOKEN_FILE
    return None


def read_uiuc(root: Path, token_file: Path) -> tuple[Paths, Captions]:
    """Read the original distribution's `name.jpg#N<TAB>caption` lines; images found beside it."""
    captions: Captions = {}
    for number, line in enumerate(read_text_file(token_file).splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, index = key.strip().rpartition("#")
        if not tab or not hash_sign or not name or not index.isdigit() or not caption.strip():
            raise DatasetFormatError(
                f"{token_file} line {number}: expected 'name.jpg#N<TAB>caption', got {line[:60]!r}"
            )
        captions.setdefault(name, []).append(caption.strip())
    folder = find_image_folder(root, list(captions), token_file)
    return drop_missing({name: folder / name for name in captions}, captions, token_file)


# ----------------------------------------------------------------------------- Karpathy JSON


def karpathy_json(root: Path) -> Path | None:
    """The one Karpathy `dataset_*.json` in `root`, or None; several are an error."""
    found = sorted(p for p in root.glob("dataset_*.json") if p.name not in DATASETS_FILES)
    if len(found) > 1:
        raise DatasetFormatError(
            f"{root}: several Karpathy split files ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0] if found else None


def karpathy_entries(path: Path) -> list[dict]:
    """The `images` entries of a Karpathy JSON; each has `filename`, `split`, `sentences`."""
    try:
        entries = json.loads(read_text_file(path))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetFormatError(f"{path}: not a Karpathy split file ({error})") from None
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str) or "split" not in entry:
            raise DatasetFormatError(f"{path}: images[{number}] has no 'filename' and 'split'")
    return entries


def karpathy_id(entry: dict) -> str:
    """COCO entries carry their folder (`filepath`: train2014/val2014); Flickr ones do not."""
    return f"{entry['filepath']}/{entry['filename']}" if entry.get("filepath") else entry["filename"]


def read_karpathy(root: Path, path: Path) -> tuple[Paths, Captions]:
    """Captions from `sentences[].raw`; images in `root/filepath/` (COCO) or a Flickr image folder."""
    entries = karpathy_entries(path)
    captions: Captions = {}
    for number, entry in enumerate(entries):
        raws = [s.get("raw", "").strip() for s in entry.get("sentences", []) if isinstance(s, dict)]
        if not any(raws):
            raise DatasetFormatError(f"{path}: images[{number}] ({entry['filename']}) has no sentences[].raw")
        captions[karpathy_id(entry)] = [raw for raw in raws if raw]
    if any(entry.get("filepath") for entry in entries):
        paths = {image_id: root / image_id for image_id in captions}
    else:
        folder = find_image_folder(root, list(captions), path)
        paths = {image_id: folder / image_id for image_id in captions}
    return drop_missing(paths, captions, path)


# ----------------------------------------------------------------------------- COCO


def coco_annotation_files(root: Path) -> list[Path]:
    """`annotations/captions_<folder>.json` files (captions_train2014.json, captions_val2017.json, ...)."""
    return sorted((root / "annotations").glob("captions_*.json"))


def read_coco(files: list[Path]) -> tuple[Paths, Captions, dict[str, list[str]]]:
    """Paths, captions and the image ids of each image folder (train2014, val2014, ...)."""
    paths: Paths = {}
    captions: Captions = {}
    folders: dict[str, list[str]] = {}
    for path in files:
        folder_name = path.stem.removeprefix("captions_")  # captions_val2014.json -> val2014
        folder = path.parent.parent / folder_name
        if not folder.is_dir():
            raise DatasetFormatError(f"{path}: its image folder {folder} is missing")
        try:
            content = json.loads(read_text_file(path))
            file_of = {image["id"]: image["file_name"] for image in content["images"]}
            annotations = [(a["image_id"], a["caption"]) for a in content["annotations"]]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise DatasetFormatError(f"{path}: not a COCO captions file ({error!r})") from None
        for image_id, caption in annotations:
            if image_id not in file_of:
                raise DatasetFormatError(
                    f"{path}: an annotation names image_id {image_id}, absent from images[]"
                )
            key = f"{folder_name}/{file_of[image_id]}"
            paths.setdefault(key, folder / file_of[image_id])
            captions.setdefault(key, []).append(caption.strip())
        folders[folder_name] = [f"{folder_name}/{name}" for name in file_of.values()]
    paths, captions = drop_missing(paths, captions, files[0].parent)
    return paths, captions, {name: [i for i in ids if i in paths] for name, ids in folders.items()}


# ----------------------------------------------------------------------------- imagefolder metadata


def metadata_files(folder: Path) -> list[Path]:
    return [folder / name for name in METADATA_FILES if (folder / name).is_file()]


def metadata_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) for each row of a metadata.jsonl / .csv / .parquet; `where` names the line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet  # datasets depends on pyarrow

        for number, record in enumerate(pyarrow.parquet.read_table(path).to_pylist()):
            yield f"{path} row {number}", record
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
        start = 2
        try:
            for record in reader:
                yield f"{path} line {start}", record
                start = reader.line_num + 1
        except csv.Error as error:
            raise DatasetFormatError(f"{path} line {start}: not valid CSV ({error})") from None
    else:
        for number, line in enumerate(read_text_file(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetFormatError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DatasetFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
