"""Tests for clip_lstm_captioner.data, splits, images and shapes: every source, by-image splits, error messages and the shapes set.

All data is generated in tmp_path; nothing needs the network.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import re
import time
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pytest
from PIL import Image

from clip_lstm_captioner import data
from clip_lstm_captioner import shapes as shapes_set
from clip_lstm_captioner import splits as splitting
from clip_lstm_captioner.images import image_problem
from processing import ImageLoadError

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def write_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 12), (index * 5 % 256, 100, 200)).save(folder / name, format="JPEG")


def captions_for(name: str) -> list[str]:
    # Commas inside captions are the usual trap: the file is split on the FIRST comma only.
    return [f"caption {k} of {name}, with a comma" if k == 0 else f"caption {k} of {name}" for k in range(5)]


def kaggle_folder(root: Path, num_images: int = 40) -> Path:
    """A Kaggle-layout folder: Images/ + captions.txt, five rows per image, no split lists."""
    names = [f"img_{i:03d}.jpg" for i in range(num_images)]
    write_images(root / "Images", names)
    lines = ["image,caption"] + [f"{n},{c}" for n in names for c in captions_for(n)]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def assert_by_image(splits: datasets.DatasetDict) -> None:
    """Three non-empty splits, our columns, no image in two splits."""
    assert list(splits) == ["train", "validation", "test"]
    seen: set[str] = set()
    for rows in splits.values():
        assert rows.num_rows > 0
        assert rows.features == data.CAPTION_FEATURES
        ids = set(rows["image_id"])
        assert len(ids) == rows.num_rows and not ids & seen
        seen |= ids


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------
# Kaggle Flickr8k layout
# --------------------------------------------------------------------------------------


def test_kaggle_folder_is_split_by_image_with_all_captions(tmp_path):
    splits = data.load_caption_dataset(kaggle_folder(tmp_path))
    assert_by_image(splits)
    assert {name: rows.num_rows for name, rows in splits.items()} == {"train": 30, "validation": 5, "test": 5}
    for rows in splits.values():
        for row in rows:
            assert row["captions"] == captions_for(row["image_id"])
    assert splits["test"][0]["image"].size == (16, 12)


def test_quoted_captions_bom_and_crlf(tmp_path):
    kaggle_folder(tmp_path, num_images=3)
    rows = [
        ["image", "caption"],
        ["img_000.jpg", 'a dog, "Rex", runs'],
        ["img_001.jpg", "plain caption"],
        ["img_002.jpg", "two, commas, here"],
    ]
    with open(tmp_path / "captions.txt", "w", newline="", encoding="utf-8-sig") as file:
        csv.writer(file, lineterminator="\r\n").writerows(rows)  # quotes fields with commas or quotes
    splits = data.load_caption_dataset(tmp_path)
    captions = {
        i: c for rows in splits.values() for i, c in zip(rows["image_id"], rows["captions"], strict=True)
    }
    assert captions == {
        "img_000.jpg": ['a dog, "Rex", runs'],
        "img_001.jpg": ["plain caption"],
        "img_002.jpg": ["two, commas, here"],
    }


def test_seeded_split_is_deterministic_and_ignores_file_order(tmp_path):
    first = data.load_caption_dataset(kaggle_folder(tmp_path / "a"), seed=3)
    reordered = kaggle_folder(tmp_path / "b")
    lines = (reordered / "captions.txt").read_text().splitlines()
    (reordered / "captions.txt").write_text("\n".join([lines[0], *reversed(lines[1:])]) + "\n")
    second = data.load_caption_dataset(reordered, seed=3)
    other_seed = data.load_caption_dataset(reordered, seed=4)
    for split in splitting.SPLITS:
        assert first[split]["image_id"] == second[split]["image_id"]
    assert first["test"]["image_id"] != other_seed["test"]["image_id"]


@pytest.mark.parametrize("num_images", [3, 4, 5, 9, 17, 8091])
def test_seeded_split_never_empty(num_images):
    splits = splitting.seeded_split([f"{i}.jpg" for i in range(num_images)], seed=0)
    sizes = [len(splits[s]) for s in splitting.SPLITS]
    assert min(sizes) >= 1 and sum(sizes) == num_images
    assert sizes[1] == sizes[2] == (1000 if num_images >= 8000 else max(1, round(num_images / 8)))


def test_fewer_than_three_images_is_an_error(tmp_path):
    with pytest.raises(data.DatasetFormatError, match="at least 3") as error:
        data.load_caption_dataset(kaggle_folder(tmp_path, num_images=2))
    one_line(error)


def test_official_split_lists_are_used(tmp_path):
    root = kaggle_folder(tmp_path, num_images=12)
    names = [f"img_{i:03d}.jpg" for i in range(12)]
    lists = {"train": names[:6], "validation": names[6:8], "test": names[8:11]}  # img_011 is in no list
    for split, file_name in splitting.FLICKR8K_SPLIT_FILES.items():
        (root / file_name).write_text("\n".join(lists[split]) + "\n")
    splits = data.load_caption_dataset(root)
    assert {split: splits[split]["image_id"] for split in splitting.SPLITS} == lists


def test_image_in_two_lists_is_an_error(tmp_path):
    root = kaggle_folder(tmp_path, num_images=6)
    for split, file_name in splitting.FLICKR8K_SPLIT_FILES.items():
        (root / file_name).write_text(
            {
                "train": "img_000.jpg\nimg_001.jpg\n",
                "validation": "img_002.jpg\n",
                "test": "img_003.jpg\nimg_001.jpg\n",
            }[split]
        )
    with pytest.raises(data.DatasetFormatError, match="img_001.jpg is listed in both train and test"):
        data.load_caption_dataset(root)


def test_karpathy_json_is_used_and_restval_goes_to_train(tmp_path):
    root = kaggle_folder(tmp_path, num_images=6)
    split_of = ["train", "restval", "val", "test", "train", "test"]
    images = [{"filename": f"img_{i:03d}.jpg", "split": s, "sentences": []} for i, s in enumerate(split_of)]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    splits = data.load_caption_dataset(root)
    assert splits["train"]["image_id"] == ["img_000.jpg", "img_001.jpg", "img_004.jpg"]
    assert splits["validation"]["image_id"] == ["img_002.jpg"]
    assert splits["test"]["image_id"] == ["img_003.jpg", "img_005.jpg"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["image;caption", "img_000.jpg,a dog"], "captions.txt line 1: expected the header 'image,caption'"),
        (
            ["image,caption", "img_000.jpg,a dog", "img_001.jpg,a cat", "img_002.jpg a bird"],
            "captions.txt line 4: no comma",
        ),
        (["image,caption", "img_000.jpg,a dog", "img_001.jpg,  "], "captions.txt line 3: empty caption"),
        (
            ["image,caption", "img_000.jpg,a dog", "", "missing.jpg,a cat"],
            "captions.txt line 4: image 'missing.jpg' not found",
        ),
    ],
)
def test_malformed_captions_rows_name_the_line(tmp_path, lines, expected):
    root = kaggle_folder(tmp_path, num_images=3)
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DatasetFormatError) as error:
        data.load_caption_dataset(root)
    assert expected in one_line(error)


# --------------------------------------------------------------------------------------
# Unreadable images
# --------------------------------------------------------------------------------------


def make_bad_images(images: Path) -> list[Path]:
    """Turn three of the folder's images into a zero-byte file, a truncated JPEG and a text file."""
    empty, truncated, text = images / "img_001.jpg", images / "img_004.jpg", images / "img_007.jpg"
    empty.write_bytes(b"")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    text.write_text("this is not an image\n")
    return [empty, truncated, text]


def test_bad_images_are_skipped_with_a_count(tmp_path, caplog):
    root = kaggle_folder(tmp_path, num_images=12)
    bad = make_bad_images(root / "Images")
    with caplog.at_level(logging.WARNING, logger="data"):
        splits = data.load_caption_dataset(root, on_bad_image="skip")
    kept = {i for rows in splits.values() for i in rows["image_id"]}
    assert kept == {f"img_{i:03d}.jpg" for i in range(12)} - {p.name for p in bad}
    assert "skipped 3 unreadable images, e.g. " in caplog.text and str(bad[0]) in caplog.text


@pytest.mark.parametrize("which", [0, 1, 2], ids=["zero-bytes", "truncated-jpeg", "text-file"])
def test_bad_image_error_names_the_path(tmp_path, which):
    root = kaggle_folder(tmp_path, num_images=12)
    bad = make_bad_images(root / "Images")
    for other in set(range(3)) - {which}:  # leave only the bad file under test
        write_images(root / "Images", [bad[other].name])
    with pytest.raises(ImageLoadError) as error:
        data.load_caption_dataset(root, on_bad_image="error")
    assert str(bad[which]) in one_line(error) and "--on_bad_image skip" in str(error.value)


def test_image_check_accepts_jpeg_with_trailing_bytes_and_png(tmp_path):
    write_images(tmp_path, ["padded.jpg"])
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(padded.read_bytes() + b"camera trailer")  # legal data after the EOI marker
    Image.new("RGBA", (8, 8)).save(tmp_path / "ok.png")
    assert image_problem(padded) is None
    assert image_problem(tmp_path / "ok.png") is None
    broken_png = tmp_path / "broken.png"
    broken_png.write_bytes((tmp_path / "ok.png").read_bytes()[:-20])
    assert str(broken_png) in image_problem(broken_png)


def test_on_bad_image_value_is_checked(tmp_path):
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        data.load_caption_dataset(kaggle_folder(tmp_path, num_images=3), on_bad_image="ignore")


# --------------------------------------------------------------------------------------
# imagefolder with metadata.jsonl
# --------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_imagefolder_groups_rows_and_accepts_string_and_list_captions(tmp_path):
    names = [f"photo_{i}.jpg" for i in range(8)]
    write_images(tmp_path, names)
    records = [{"file_name": n, "text": f"first {n}"} for n in names]
    records += [{"file_name": n, "text": [f"second {n}", f"third {n}"]} for n in names[:4]]
    write_jsonl(tmp_path / "metadata.jsonl", records)
    splits = data.load_caption_dataset(tmp_path, caption_column="text")
    assert_by_image(splits)
    rows = {r["image_id"]: r["captions"] for split in splits.values() for r in split}
    assert set(rows) == set(names)
    assert rows["photo_0.jpg"] == ["first photo_0.jpg", "second photo_0.jpg", "third photo_0.jpg"]
    assert rows["photo_7.jpg"] == ["first photo_7.jpg"]


def test_imagefolder_split_folders_are_used(tmp_path):
    for split in ("train", "val", "test"):
        write_images(tmp_path / split, [f"{split}_{i}.jpg" for i in range(2)])
        write_jsonl(
            tmp_path / split / "metadata.jsonl",
            [{"file_name": f"{split}_{i}.jpg", "caption": f"a {split} photo"} for i in range(2)],
        )
    splits = data.load_caption_dataset(tmp_path)
    assert splits["validation"]["image_id"] == ["val/val_0.jpg", "val/val_1.jpg"]
    assert splits["train"]["captions"] == [["a train photo"], ["a train photo"]]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"file_name": "p_1.jpg", "text": "x"},
            "metadata.jsonl line 2: no 'caption' key (keys: file_name, text)",
        ),
        ({"file_name": "gone.jpg", "caption": "x"}, "metadata.jsonl line 2: image 'gone.jpg' not found"),
        ({"file_name": "p_1.jpg", "caption": [1, 2]}, "metadata.jsonl line 2: 'caption' must be"),
    ],
)
def test_imagefolder_errors_name_the_line(tmp_path, record, expected):
    write_images(tmp_path, ["p_0.jpg", "p_1.jpg", "p_2.jpg"])
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "p_0.jpg", "caption": "ok"}, record])
    with pytest.raises(data.DatasetFormatError) as error:
        data.load_caption_dataset(tmp_path)
    assert expected in one_line(error)


# --------------------------------------------------------------------------------------
# Hub ids and Hub-style datasets
# --------------------------------------------------------------------------------------


def assert_fails_fast_naming_alternatives(source: str, **kwargs) -> None:
    start = time.monotonic()
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load_caption_dataset(source, **kwargs)
    assert time.monotonic() - start < 10  # datasets alone retries for ~25 s
    message = one_line(error)
    assert source in message and "captions.txt" in message and "'shapes'" in message


def test_hub_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    # A closed local port stands in for "no network", whether or not this machine has one.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert_fails_fast_naming_alternatives(data.DEFAULT_DATASET)


def test_hub_id_fails_fast_in_offline_mode(monkeypatch, tmp_path):
    # datasets and huggingface_hub read HF_HUB_OFFLINE at import; set their copies too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_fails_fast_naming_alternatives(data.DEFAULT_DATASET, cache_dir=tmp_path)


def hub_style_rows(folder: Path, names: list[str]) -> datasets.Dataset:
    """Rows like jxie/flickr8k: an image column and caption_0..caption_4."""
    write_images(folder, names)
    columns = {"image": [str(folder / n) for n in names]}
    columns.update({f"caption_{k}": [f"caption {k} of {n}" for n in names] for k in range(5)})
    return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())


def test_hub_style_dataset_dict_is_converted(tmp_path):
    raw = datasets.DatasetDict(
        {
            "train": hub_style_rows(tmp_path / "train", ["a.jpg", "b.jpg", "c.jpg"]),
            "validation": hub_style_rows(tmp_path / "validation", ["d.jpg"]),
            "test": hub_style_rows(tmp_path / "test", ["e.jpg", "f.jpg"]),
        }
    )
    splits = data.load_caption_dataset(raw)
    assert_by_image(splits)
    assert splits["train"]["image_id"] == ["a.jpg", "b.jpg", "c.jpg"]
    assert splits["test"][1]["captions"] == [f"caption {k} of f.jpg" for k in range(5)]
    assert splits["validation"][0]["image"].size == (16, 12)


def test_hub_style_single_split_gets_seeded_split_and_bad_images_skipped(tmp_path, caplog):
    rows = hub_style_rows(tmp_path, [f"{i}.jpg" for i in range(10)])
    (tmp_path / "3.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="data"):
        splits = data.load_caption_dataset(rows, on_bad_image="skip")
    assert_by_image(splits)
    assert sum(r.num_rows for r in splits.values()) == 9 and "skipped 1 unreadable image" in caplog.text


def test_unknown_caption_column_names_the_columns(tmp_path):
    with pytest.raises(data.DatasetFormatError, match="columns: image, caption_0"):
        data.load_caption_dataset(
            hub_style_rows(tmp_path, ["a.jpg", "b.jpg", "c.jpg"]), caption_column="text"
        )


# --------------------------------------------------------------------------------------
# The shapes set
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return shapes_set.make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "set", num_images=60, seed=0)


def test_shapes_is_byte_identical_for_a_seed(shapes, tmp_path):
    again = shapes_set.make_shapes_dataset(tmp_path / "again", num_images=60, seed=0)
    other = shapes_set.make_shapes_dataset(tmp_path / "other", num_images=60, seed=1)
    files = sorted(p.relative_to(shapes) for p in shapes.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((shapes / f).read_bytes() == (again / f).read_bytes() for f in files)
    assert (shapes / "captions.txt").read_text() != (other / "captions.txt").read_text()


def test_shapes_loads_through_the_official_lists(shapes):
    splits = data.load_caption_dataset(shapes)
    assert_by_image(splits)
    for split, file_name in splitting.FLICKR8K_SPLIT_FILES.items():
        assert splits[split]["image_id"] == (shapes / file_name).read_text().split()


def words_of(caption: str, vocabulary) -> list[str]:
    return [w for w in caption.split() if w in vocabulary]


def test_shapes_captions_match_the_scenes(shapes):
    scenes = shapes_set.read_scenes(shapes)
    splits = data.load_caption_dataset(shapes)
    rows = {r["image_id"]: r["captions"] for split in splits.values() for r in split}
    assert set(rows) == set(scenes) and len(rows) == 60
    counts = {1: set(), 2: set(), 3: set()}
    for image_id, captions in rows.items():
        objects = scenes[image_id]["objects"]
        counts[len(objects)].add(image_id)
        assert len(captions) == len(set(captions)) == 5
        assert all(objects[0]["area"] >= 1.6 * o["area"] for o in objects[1:])
        for caption in captions:
            # The first colour word is the largest object's colour; every colour and shape word is drawn.
            assert words_of(caption, shapes_set.SHAPES_COLOURS)[0] == objects[0]["colour"], caption
            assert set(words_of(caption, shapes_set.SHAPES_COLOURS)) <= {o["colour"] for o in objects}, (
                caption
            )
            assert set(words_of(caption, shapes_set.SHAPES_KINDS)) <= {o["shape"] for o in objects}, caption
            # Counts are true: "three shapes" for all objects, "two small shapes" for the others.
            number = {"one": 1, "two": 2, "three": 3}
            for count, small in re.findall(r"\b(one|two|three) (small )?shapes?\b", caption):
                assert number[count] == len(objects) - (1 if small else 0), caption
            check_sizes_positions_relations(caption, {(o["colour"], o["shape"]): o for o in objects})
    assert all(counts.values()), "every object count (1, 2, 3) should occur in 60 scenes"
    big = [o["area"] for s in scenes.values() for o in s["objects"] if o["size"] == "big"]
    small = [o["area"] for s in scenes.values() for o in s["objects"] if o["size"] == "small"]
    assert min(big) >= 1.6 * max(small), "'big' and 'small' must mean the same thing in every image"


PHRASE = (
    "("
    + "|".join(
        ["in the top left", "at the top", "in the top right", "on the left", "in the middle", "on the right"]
        + ["in the bottom left", "at the bottom", "in the bottom right"]
    )
    + ")"
)


def expected_phrase(obj: dict, image_size: int = 96) -> str:
    """The position phrase of an object's bbox centre, on a 3x3 grid (worked out independently)."""
    x0, y0, x1, y1 = obj["bbox"]
    column = ["left", "", "right"][min(2, int(3 * (x0 + x1) / 2 / image_size))]
    row = ["top", "", "bottom"][min(2, int(3 * (y0 + y1) / 2 / image_size))]
    if row and column:
        return f"in the {row} {column}"
    return {
        "top": "at the top",
        "bottom": "at the bottom",
        "left": "on the left",
        "right": "on the right",
    }.get(row or column, "in the middle")


def check_sizes_positions_relations(caption: str, objects: dict) -> None:
    for size, colour, shape in re.findall(r"\b(big|small)? ?(\w+) (circle|square|triangle|diamond)", caption):
        obj = objects[(colour, shape)]
        assert not size or size == obj["size"], caption
        match = re.search(rf"{colour} {shape} {PHRASE}", caption)
        assert not match or match.group(1) == expected_phrase(obj), caption
    relation = re.search(
        r"(?:big |small )?(\w+) (\w+) (above|below|to the left of|to the right of) an? "
        r"(?:big |small )?(\w+) (\w+)",
        caption,
    )
    if relation:
        a, b = objects[relation.group(1, 2)]["bbox"], objects[relation.group(4, 5)]["bbox"]
        apart = {
            "above": a[3] < b[1],
            "below": a[1] > b[3],
            "to the left of": a[2] < b[0],
            "to the right of": a[0] > b[2],
        }
        assert apart[relation.group(3)], caption


def test_shapes_pixels_match_the_scenes(shapes):
    colours = {name: np.array(rgb) for name, rgb in shapes_set.SHAPES_COLOURS.items()}
    for image_id, scene in list(shapes_set.read_scenes(shapes).items())[:20]:
        pixels = np.asarray(Image.open(shapes / "Images" / image_id), dtype=np.int64)
        for obj in scene["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            nearest = min(colours, key=lambda name: np.abs(colours[name] - centre).sum())
            assert nearest == obj["colour"] and np.abs(colours[nearest] - centre).max() < 40, (image_id, obj)
        covered = [o["bbox"] for o in scene["objects"]]
        for x, y in [(0, 0), (95, 0), (0, 95), (95, 95)]:
            if not any(b[0] - 3 <= x <= b[2] + 3 and b[1] - 3 <= y <= b[3] + 3 for b in covered):
                assert pixels[y, x].min() >= 190, (image_id, "background must stay light")


def test_shapes_generation_is_atomic(tmp_path, monkeypatch):
    real_write = shapes_set._write_shapes

    def interrupted(folder, *args):
        real_write(folder, *args)
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C just before the rename

    monkeypatch.setattr(shapes_set, "_write_shapes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shapes_set.make_shapes_dataset(tmp_path / "set", num_images=5)
    assert list(tmp_path.iterdir()) == []  # neither the set nor its temporary folder is left
    monkeypatch.setattr(shapes_set, "_write_shapes", real_write)
    root = shapes_set.make_shapes_dataset(tmp_path / "set", num_images=5)
    assert len(list((root / "Images").iterdir())) == 5
    with pytest.raises(ValueError, match="holds a shapes set made with"):
        shapes_set.make_shapes_dataset(root, num_images=6)


def test_shapes_source_uses_the_cache_dir(tmp_path):
    splits = data.load_caption_dataset("shapes", cache_dir=tmp_path)
    assert {name: rows.num_rows for name, rows in splits.items()} == {
        "train": 1500,
        "validation": 250,
        "test": 250,
    }
    assert (shapes_set.shapes_root(tmp_path) / "scenes.jsonl").is_file()


def score_one(caption: str, scene: dict) -> dict:
    return shapes_set.score_shapes_captions({"image.jpg": caption}, {"image.jpg": scene})


def test_shapes_scorer_counts_every_true_caption_as_right():
    seen = {"counts": set(), "second_object_hits": 0, "second_object_misses": 0}
    for index in range(200):
        _, scene, captions = shapes_set.draw_scene(seed=3, index=index, size=96)
        objects = scene["objects"]
        for caption in captions:
            scores = score_one(caption, scene)
            assert scores["colour_and_shape_accuracy"] == 1.0, caption
            assert scores["hallucination_rate"] == 0.0 and scores["objects_named_correctly"] == 1.0, caption
            states_count = re.search(r"\b(one|two|three)\b", caption) is not None
            assert scores["count_stated"] == float(states_count), caption
            assert scores["count_accuracy"] == (1.0 if states_count else None), caption
            if states_count:
                seen["counts"].add(len(objects))
            if len(objects) == 1:
                assert scores["second_object_accuracy"] is None and scores["second_object_scenes"] == 0
                continue
            names_another = any(f"{o['colour']} {o['shape']}" in caption for o in objects[1:])
            assert scores["second_object_accuracy"] == float(names_another), caption
            assert scores["second_object_scenes"] == 1
            seen["second_object_hits" if names_another else "second_object_misses"] += 1
    # the templates that state counts and name other objects all came up, so the checks above bit
    assert seen["counts"] == {1, 2, 3} and seen["second_object_hits"] and seen["second_object_misses"]


def three_objects_to_swap() -> tuple[dict, list[tuple[str, str]]]:
    """A drawn 3-object scene in which the first two objects' shapes swapped name no drawn object."""
    for index in range(100):
        scene = shapes_set.draw_scene(seed=3, index=index, size=96)[1]
        pairs = [(o["colour"], o["shape"]) for o in scene["objects"]]
        if len(pairs) == 3 and {(pairs[0][0], pairs[1][1]), (pairs[1][0], pairs[0][1])}.isdisjoint(pairs):
            return scene, pairs
    raise AssertionError("no such scene among the first 100")


def test_shapes_scorer_counts_wrong_captions_as_misses():
    scene, [(c0, s0), (c1, s1), (c2, _)] = three_objects_to_swap()
    unused = next(colour for colour in shapes_set.SHAPES_COLOURS if colour not in {c0, c1, c2})
    right_count = score_one(f"three shapes and the biggest is a {c0} {s0}", scene)
    assert right_count["count_accuracy"] == 1.0 and right_count["second_object_accuracy"] == 0.0
    for wrong_count in (f"two shapes and the biggest is a {c0} {s0}", f"a {c0} {s0} and one small shape"):
        scores = score_one(wrong_count, scene)
        assert scores["count_stated"] == 1.0 and scores["count_accuracy"] == 0.0, wrong_count
        assert scores["hallucination_rate"] == 0.0 and scores["colour_and_shape_accuracy"] == 1.0
    made_up = score_one(f"a big {c0} {s0} and a small {unused} {s1}", scene)
    assert made_up["hallucination_rate"] == 1.0 and made_up["objects_named_correctly"] == 0.5
    assert made_up["second_object_accuracy"] == 0.0 and made_up["colour_and_shape_accuracy"] == 1.0
    swapped = score_one(f"a big {c0} {s1} and a small {c1} {s0}", scene)
    assert swapped["hallucination_rate"] == 1.0 and swapped["objects_named_correctly"] == 0.0
    assert swapped["colour_accuracy"] == 1.0 and swapped["colour_and_shape_accuracy"] == 0.0
    assert swapped["second_object_accuracy"] == 0.0
    # a size word between colour and shape still names the pair; a dangling colour word names none
    slipped = score_one(f"a {c0} big {s0} and a {c1} small {s0}", scene)
    assert slipped["objects_named_correctly"] == 0.5 and slipped["hallucination_rate"] == 1.0
    dangling = score_one(f"the biggest is a {c0}", scene)
    assert dangling["objects_named_correctly"] is None and dangling["hallucination_rate"] == 0.0
    assert dangling["count_accuracy"] is None and dangling["count_stated"] == 0.0


def test_shapes_scores_pool_over_images_and_survive_json():
    scenes = {f"{index}.jpg": shapes_set.draw_scene(seed=3, index=index, size=96)[1] for index in range(30)}
    captions = {image_id: "two shapes and the biggest is a red circle" for image_id in scenes}
    scores = shapes_set.score_shapes_captions(captions, scenes)
    two = sum(len(scene["objects"]) == 2 for scene in scenes.values())
    assert scores["count_stated"] == 1.0 and scores["count_accuracy"] == two / 30
    assert scores["second_object_scenes"] == sum(len(s["objects"]) > 1 for s in scenes.values())
    assert json.loads(json.dumps(scores)) == scores and type(scores["second_object_scenes"]) is int


# --------------------------------------------------------------------------------------
# Command-line flags
# --------------------------------------------------------------------------------------


def test_data_args_have_help_and_load_the_dataset(tmp_path):
    parser = data.add_data_args(argparse.ArgumentParser())
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} == {
        "dataset",
        "image_column",
        "caption_column",
        "split_seed",
        "on_bad_image",
        "data_cache_dir",
    }
    assert all(a.help for a in flags)
    assert parser.parse_args([]).dataset == data.DEFAULT_DATASET
    args = parser.parse_args(["--dataset", str(kaggle_folder(tmp_path, 9)), "--split_seed", "5"])
    assert (
        data.dataset_from_args(args)["test"]["image_id"]
        == data.load_caption_dataset(tmp_path, seed=5)["test"]["image_id"]
    )


def test_unknown_source_is_a_clear_error():
    with pytest.raises(data.DatasetFormatError, match="no such folder and not a Hub dataset id") as error:
        data.load_caption_dataset("./no/such/folder")
    assert "'shapes'" in one_line(error)


# --------------------------------------------------------------------------------------
# Public layouts, each fixture in exactly the format its users hold (issue 10 items 1-7)
# --------------------------------------------------------------------------------------

FLICKR_NAMES = [
    "1000268201_693b08cb0e.jpg",
    "1001773457_577c3a7d70.jpg",
    "1002674143_1b742ab4b8.jpg",
    "1003163366_44323f5815.jpg",
    "1007129816_e794419615.jpg",
    "1007320043_627395c3d8.jpg",
    "1009434119_febe49276a.jpg",
    "1012212859_01547e3f17.jpg",
    "1015118661_980735411b.jpg",
    "1015584366_dfcec3c85a.jpg",
    "101654506_8eb26cfb60.jpg",
    "101669240_b2d3e7f17b.jpg",
]
# The UIUC token file's caption group whose "image" does not exist.
UIUC_GHOST = "2258277193_586949ec62.jpg.1"


def flickr_captions(name: str) -> list[str]:
    """Five captions in Flickr8k's style (space before the full stop), one with a comma and quotes."""
    stem = name.split("_")[0]
    return [
        f"A child {stem} in a pink dress is climbing up a set of stairs in an entry way .",
        f'A girl {stem} going into a wooden building , "the cabin" .',
        f"A little girl {stem} climbing into a wooden playhouse .",
        f"A little girl {stem} climbing the stairs to her playhouse .",
        f"A little girl {stem} in a pink dress going into a wooden cabin .",
    ]


def all_captions(splits: datasets.DatasetDict) -> dict[str, list[str]]:
    return {
        r["image_id"]: r["captions"]
        for rows in splits.values()
        for r in rows.select_columns(["image_id", "captions"])
    }


def split_ids(splits: datasets.DatasetDict) -> dict[str, list[str]]:
    return {split: sorted(rows["image_id"]) for split, rows in splits.items()}


def assert_split_source(caplog, expected: str) -> None:
    lines = [r.getMessage() for r in caplog.records if "splits from" in r.getMessage()]
    assert len(lines) == 1 and expected in lines[0], lines


FLICKR_LISTS = {"train": FLICKR_NAMES[:8], "validation": FLICKR_NAMES[8:10], "test": FLICKR_NAMES[10:]}


def uiuc_folder(root: Path, nested: bool) -> Path:
    """The original UIUC distribution: Flicker8k_Dataset/ (sic) + the text files, nested or flattened."""
    write_images(root / "Flicker8k_Dataset", FLICKR_NAMES)
    text = root / "Flickr8k_text" if nested else root
    text.mkdir(parents=True, exist_ok=True)
    groups = [*FLICKR_NAMES[:5], UIUC_GHOST, *FLICKR_NAMES[5:]]  # the ghost group sits mid-file
    lines = [f"{name}#{k}\t{c}" for name in groups for k, c in enumerate(flickr_captions(name))]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr8k.lemma.token.txt").write_text("\n".join(line.lower() for line in lines) + "\n")
    for split, file_name in splitting.FLICKR8K_SPLIT_FILES.items():  # CRLF, as in some copies
        (text / file_name).write_bytes("".join(f"{n}\r\n" for n in FLICKR_LISTS[split]).encode())
    return root


@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flattened"])
def test_uiuc_distribution_loads_with_official_splits(tmp_path, caplog, nested):
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(uiuc_folder(tmp_path, nested))
    assert_by_image(splits)
    assert split_ids(splits) == {split: sorted(names) for split, names in FLICKR_LISTS.items()}
    assert all_captions(splits) == {name: flickr_captions(name) for name in FLICKR_NAMES}
    ghost = [r.getMessage() for r in caplog.records if UIUC_GHOST in r.getMessage()]
    assert len(ghost) == 1 and "1 caption group" in ghost[0]
    assert_split_source(caplog, "official split lists")


def karpathy_entry(index: int, name: str, split: str, **extra) -> dict:
    sentences = [
        {"tokens": c.lower().rstrip(" .").split(), "raw": c, "imgid": index, "sentid": 5 * index + k}
        for k, c in enumerate(flickr_captions(name))
    ]
    return {"sentids": [s["sentid"] for s in sentences], "imgid": index, "sentences": sentences,
            "split": split, "filename": name, **extra}  # fmt: skip


def test_karpathy_json_with_image_folder_and_no_captions_txt(tmp_path, caplog):
    write_images(tmp_path / "Flicker8k_Dataset", FLICKR_NAMES)
    split_of = ["train", "restval", "val", "test"] * 3
    images = [karpathy_entry(i, n, s) for i, (n, s) in enumerate(zip(FLICKR_NAMES, split_of, strict=True))]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(tmp_path)
    expected = {"train": [], "validation": [], "test": []}
    for name, split in zip(FLICKR_NAMES, split_of, strict=True):
        expected[splitting.KARPATHY_SPLITS[split]].append(name)
    assert split_ids(splits) == {split: sorted(names) for split, names in expected.items()}
    assert all_captions(splits) == {name: flickr_captions(name) for name in FLICKR_NAMES}
    assert_split_source(caplog, "dataset_flickr8k.json")


COCO_IMAGES = {
    "train2014": [57870, 384029, 222016, 520950, 69675, 547471],
    "val2014": [391895, 522418, 184613, 318219, 554625, 397133],
}


def coco_name(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def coco_caption(image_id: int, k: int) -> str:
    return f"A man {image_id} with a red helmet on a small moped on a dirt road, view {k}. "


def coco_folder(root: Path) -> Path:
    """COCO 2014 as downloaded: annotations/captions_{train,val}2014.json + train2014/, val2014/."""
    (root / "annotations").mkdir(parents=True)
    annotation_id = 1
    for folder, ids in COCO_IMAGES.items():
        write_images(root / folder, [coco_name(folder, i) for i in ids])
        images = [
            {"license": 3, "file_name": coco_name(folder, i), "coco_url": f"http://images.cocodataset.org/{folder}/"
             f"{coco_name(folder, i)}", "height": 12, "width": 16, "date_captured": "2013-11-14 11:18:45",
             "flickr_url": "http://farm4.staticflickr.com/1/1.jpg", "id": i}
            for i in ids
        ]  # fmt: skip
        annotations = []
        for k in range(5):
            for i in ids:
                annotations.append({"image_id": i, "id": annotation_id, "caption": coco_caption(i, k)})
                annotation_id += 1
        content = {"info": {"description": "COCO 2014 Dataset", "year": 2014}, "images": images,
                   "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 3,
                                 "name": "Attribution-NonCommercial-ShareAlike License"}],
                   "annotations": annotations}  # fmt: skip
        (root / "annotations" / f"captions_{folder}.json").write_text(json.dumps(content))
    return root


def coco_captions() -> dict[str, list[str]]:
    return {
        f"{folder}/{coco_name(folder, i)}": [coco_caption(i, k).strip() for k in range(5)]
        for folder, ids in COCO_IMAGES.items()
        for i in ids
    }


def test_coco_annotations_load_with_val2014_halved_by_image(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(coco_folder(tmp_path), seed=1)
    assert_by_image(splits)
    assert all_captions(splits) == coco_captions()
    ids = split_ids(splits)
    assert ids["train"] == sorted(f"train2014/{coco_name('train2014', i)}" for i in COCO_IMAGES["train2014"])
    val = sorted(f"val2014/{coco_name('val2014', i)}" for i in COCO_IMAGES["val2014"])
    assert len(ids["validation"]) == len(ids["test"]) == 3 and sorted(ids["validation"] + ids["test"]) == val
    assert_split_source(caplog, "val2014 halved by image with seed 1")
    assert split_ids(data.load_caption_dataset(tmp_path, seed=1)) == ids


def test_coco_with_karpathy_json_uses_the_karpathy_split(tmp_path, caplog):
    root = coco_folder(tmp_path)
    split_of = {57870: "train", 384029: "restval", 391895: "val", 522418: "test", 184613: "restval"}
    images = [
        {**karpathy_entry(n, coco_name(folder, i), split_of.get(i, "train")), "filepath": folder, "cocoid": i}
        for n, (folder, i) in enumerate((f, i) for f, ids in COCO_IMAGES.items() for i in ids)
    ]
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(root)
    assert split_ids(splits)["validation"] == [f"val2014/{coco_name('val2014', 391895)}"]
    assert split_ids(splits)["test"] == [f"val2014/{coco_name('val2014', 522418)}"]
    assert f"val2014/{coco_name('val2014', 184613)}" in split_ids(splits)["train"]
    assert all_captions(splits) == coco_captions()  # captions from the annotations
    assert_split_source(caplog, "dataset_coco.json")


def hub_rows(names: list[str]) -> datasets.Dataset:
    """Rows exactly like jxie/flickr8k: an embedded `image` and caption_0..caption_4."""
    features = datasets.Features(
        {"image": datasets.Image(), **{f"caption_{k}": datasets.Value("string") for k in range(5)}}
    )
    rows = {"image": [], **{f"caption_{k}": [] for k in range(5)}}
    for index, name in enumerate(names):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 12), (index * 20, 90, 10)).save(buffer, format="JPEG")
        rows["image"].append({"bytes": buffer.getvalue(), "path": name})
        for k, caption in enumerate(flickr_captions(name)):
            rows[f"caption_{k}"].append(caption)
    return datasets.Dataset.from_dict(rows, features=features)


FLICKR8K_CARD = """---
dataset_info:
  features:
  - name: image
    dtype: image
{captions}  splits:
  - name: train
    num_examples: 8
  - name: validation
    num_examples: 2
  - name: test
    num_examples: 2
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: validation
    path: data/validation-*
  - split: test
    path: data/test-*
---
# Dataset Card for "flickr8k"
"""


def hub_download_folder(root: Path) -> Path:
    """What `hf download jxie/flickr8k --repo-type dataset --local-dir root` leaves."""
    (root / "data").mkdir(parents=True)
    card = FLICKR8K_CARD.format(
        captions="".join(f"  - name: caption_{k}\n    dtype: string\n" for k in range(5))
    )
    (root / "README.md").write_text(card)
    for split, names in FLICKR_LISTS.items():
        hub_rows(names).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """A fresh HF datasets cache, so loading a folder with `datasets` writes nothing outside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))
    return tmp_path / "hf_datasets_cache"


def test_hub_dataset_downloaded_to_a_folder_loads(tmp_path, caplog, datasets_cache):
    root = hub_download_folder(tmp_path / "flickr8k")
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(root)
    assert split_ids(splits) == {split: sorted(names) for split, names in FLICKR_LISTS.items()}
    assert all_captions(splits) == {name: flickr_captions(name) for name in FLICKR_NAMES}
    assert splits["test"][0]["image"].size == (16, 12)
    assert_split_source(caplog, "the source's own splits")


def test_save_to_disk_folder_loads(tmp_path, caplog):
    saved = tmp_path / "saved"
    datasets.DatasetDict({split: hub_rows(names) for split, names in FLICKR_LISTS.items()}).save_to_disk(
        saved
    )
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(saved)
    assert split_ids(splits) == {split: sorted(names) for split, names in FLICKR_LISTS.items()}
    assert all_captions(splits) == {name: flickr_captions(name) for name in FLICKR_NAMES}
    assert_split_source(caplog, "the source's own splits")


def test_single_split_with_a_split_column_uses_it(tmp_path, caplog):
    # Like the Flickr30k copies on the Hub: one split, a list column of captions and a `split` column.
    split_of = {name: split for split, names in FLICKR_LISTS.items() for name in names}
    rows = hub_rows(FLICKR_NAMES)
    rows = rows.add_column("caption", [flickr_captions(n) for n in FLICKR_NAMES])
    rows = rows.remove_columns([f"caption_{k}" for k in range(5)])
    rows = rows.add_column(
        "split", [{"validation": "val"}.get(split_of[n], split_of[n]) for n in FLICKR_NAMES]
    )
    datasets.DatasetDict({"test": rows}).save_to_disk(tmp_path / "flickr30k")
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(tmp_path / "flickr30k")
    assert split_ids(splits) == {split: sorted(names) for split, names in FLICKR_LISTS.items()}
    assert all_captions(splits) == {name: flickr_captions(name) for name in FLICKR_NAMES}
    assert_split_source(caplog, "'split' column")


def write_metadata(path: Path, records: list[dict]) -> None:
    if path.suffix == ".jsonl":
        write_jsonl(path, records)
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as file:  # csv quotes the captions with commas and quotes
            writer = csv.DictWriter(file, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("columns", ["caption_0..4", "list", "text"])
def test_imagefolder_metadata_formats_keep_every_caption(tmp_path, suffix, columns, caplog):
    if columns == "list" and suffix == ".csv":
        pytest.skip("CSV has no list columns")
    write_images(tmp_path, FLICKR_NAMES)
    records = []
    for name in FLICKR_NAMES:
        captions = flickr_captions(name)
        if columns == "caption_0..4":
            records.append({"file_name": name, **{f"caption_{k}": c for k, c in enumerate(captions)}})
        elif columns == "list":
            records.append({"file_name": name, "caption": captions})
        else:
            records += [{"file_name": name, "text": c} for c in captions]  # one row per caption
    write_metadata(tmp_path / f"metadata{suffix}", records)
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(tmp_path)
    assert_by_image(splits)
    assert all_captions(splits) == {name: flickr_captions(name) for name in FLICKR_NAMES}
    assert_split_source(caplog, "a seeded split by image (seed 0)")


def test_imagefolder_split_column_is_used(tmp_path, caplog):
    write_images(tmp_path, FLICKR_NAMES)
    split_of = {name: split for split, names in FLICKR_LISTS.items() for name in names}
    records = [
        {"file_name": n, "split": {"validation": "val"}.get(split_of[n], split_of[n]), "caption": c}
        for n in FLICKR_NAMES
        for c in flickr_captions(n)
    ]
    write_metadata(tmp_path / "metadata.csv", records)
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        splits = data.load_caption_dataset(tmp_path)
    assert split_ids(splits) == {split: sorted(names) for split, names in FLICKR_LISTS.items()}
    assert_split_source(caplog, "'split' column")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda root: kaggle_folder(root, 9), "a seeded split by image (seed 0)"),
        (lambda root: shapes_set.make_shapes_dataset(root, num_images=9), "official split lists"),
    ],
    ids=["kaggle-seeded", "kaggle-lists"],
)
def test_split_source_is_always_logged(tmp_path, caplog, make, expected):
    with caplog.at_level(logging.INFO, logger="clip_lstm_captioner"):
        data.load_caption_dataset(make(tmp_path / "set"))
    assert_split_source(caplog, expected)


def offline_hub_cache(cache: Path, source: Path) -> None:
    """Leave in `cache` what an online `load_dataset("jxie/flickr8k")` leaves in the HF datasets cache."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = DataFilesDict.from_patterns({s: [str(source / "data" / f"{s}-*.parquet")] for s in FLICKR_LISTS})
    Parquet(
        cache_dir=str(cache),
        dataset_name="flickr8k",
        config_name="default",
        hash="4d8ca8b0",
        data_files=files,
    ).download_and_prepare()
    # The Hub's builder names its folders jxie___flickr8k/default/0.0.0/<commit>; a local builder
    # adds a data-files hash to the config name, so rename to the Hub's names.
    (cache / "flickr8k").rename(cache / "jxie___flickr8k")
    config = next((cache / "jxie___flickr8k").iterdir())
    config.rename(config.parent / "default")


def test_data_cache_dir_does_not_redirect_hub_datasets(tmp_path, monkeypatch, datasets_cache):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    offline_hub_cache(datasets_cache, hub_download_folder(tmp_path / "download"))
    parser = data.add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--dataset", "jxie/flickr8k", "--data_cache_dir", str(tmp_path / "ours")])
    splits = data.dataset_from_args(args)
    assert split_ids(splits) == {split: sorted(names) for split, names in FLICKR_LISTS.items()}
    assert all_captions(splits) == {name: flickr_captions(name) for name in FLICKR_NAMES}


def test_offline_error_names_the_cache_it_searched(datasets_cache, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.DatasetUnavailableError) as error:
        data.load_caption_dataset("jxie/flickr8k", cache_dir="/tmp/elsewhere")
    assert str(datasets_cache) in one_line(error)


# --------------------------------------------------------------------------------------
# captions.txt as real CSV, in the encodings users have (issue 9 item 10)
# --------------------------------------------------------------------------------------


def test_captions_txt_multiline_caption_and_quoted_name_with_comma(tmp_path):
    kaggle_folder(tmp_path, num_images=3)
    write_images(tmp_path / "Images", ["my photo, 2.jpg"])
    text = (
        "image,caption\n"
        'img_000.jpg,"a dog\nruns on the beach"\n'
        '"my photo, 2.jpg",a cat\n'
        '"my photo, 2.jpg","a cat, ""Tom"" , sleeps"\n'
        "img_001.jpg,plain caption\n"
        "img_002.jpg,another caption\n"
    )
    (tmp_path / "captions.txt").write_text(text)
    assert all_captions(data.load_caption_dataset(tmp_path)) == {
        "img_000.jpg": ["a dog\nruns on the beach"],
        "my photo, 2.jpg": ["a cat", 'a cat, "Tom" , sleeps'],
        "img_001.jpg": ["plain caption"],
        "img_002.jpg": ["another caption"],
    }


def test_captions_txt_line_numbers_count_multiline_records(tmp_path):
    kaggle_folder(tmp_path, num_images=3)
    text = 'image,caption\nimg_000.jpg,"a dog\nruns"\nimg_001.jpg,a cat\nmissing.jpg,a bird\n'
    (tmp_path / "captions.txt").write_text(text)
    with pytest.raises(data.DatasetFormatError) as error:
        data.load_caption_dataset(tmp_path)
    assert "captions.txt line 5: image 'missing.jpg' not found" in one_line(error)


def test_captions_txt_unclosed_quote_is_named(tmp_path):
    kaggle_folder(tmp_path, num_images=3)
    text = 'image,caption\nimg_000.jpg,a dog\nimg_001.jpg,"a cat\nimg_002.jpg,a bird\nimg_000.jpg,"x"\n'
    (tmp_path / "captions.txt").write_text(text)
    with pytest.raises(data.DatasetFormatError) as error:
        data.load_caption_dataset(tmp_path)
    assert "captions.txt line 3:" in one_line(error)


def test_captions_txt_in_utf16_with_a_bom_is_decoded(tmp_path):
    kaggle_folder(tmp_path, num_images=3)
    rows = "image,caption\n" + "".join(f"img_{i:03d}.jpg,un café {i}\n" for i in range(3))
    (tmp_path / "captions.txt").write_bytes(rows.encode("utf-16"))  # what Notepad's "Unicode" writes
    assert all_captions(data.load_caption_dataset(tmp_path)) == {
        f"img_{i:03d}.jpg": [f"un café {i}"] for i in range(3)
    }


@pytest.mark.parametrize(
    ("encoding", "line"), [("latin-1", 3), ("utf-16-le", 1)], ids=["latin-1", "utf-16-no-bom"]
)
def test_captions_txt_in_another_encoding_names_file_and_line(tmp_path, encoding, line):
    kaggle_folder(tmp_path, num_images=3)
    rows = "image,caption\nimg_000.jpg,a dog\nimg_001.jpg,un café\nimg_002.jpg,a bird\n"
    (tmp_path / "captions.txt").write_bytes(rows.encode(encoding))
    with pytest.raises(data.DatasetFormatError) as error:
        data.load_caption_dataset(tmp_path)
    assert f"{tmp_path / 'captions.txt'} line {line}:" in one_line(error) and "UTF-8" in str(error.value)


# --------------------------------------------------------------------------------------
# A decompression bomb in a dataset (issue 9 item 5, dataset side)
# --------------------------------------------------------------------------------------


def write_bomb_png(path: Path, side: int = 20000) -> None:
    """What `Image.new('L', (20000, 20000)).save(path)` writes (~400 KB), streamed instead of allocated."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor, row, parts = zlib.compressobj(9), b"\x00" * (side + 1), []  # filter byte + grey pixels
    for _ in range(side):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    write_bomb_png(path)
    return path.read_bytes()


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_decompression_bomb_in_a_folder_is_reported(tmp_path, bomb_png, caplog, policy):
    root = kaggle_folder(tmp_path, num_images=8)
    bomb = root / "Images" / "img_003.jpg"
    bomb.write_bytes(bomb_png)
    if policy == "error":
        with pytest.raises(ImageLoadError) as error:
            data.load_caption_dataset(root, on_bad_image="error")
        assert str(bomb) in one_line(error)
        return
    splits = data.load_caption_dataset(root, on_bad_image="skip")
    assert "img_003.jpg" not in all_captions(splits) and "skipped 1 unreadable image" in caplog.text


@pytest.mark.parametrize("policy", ["skip", "error"])
def test_decompression_bomb_in_hub_rows_is_reported(tmp_path, bomb_png, caplog, policy):
    rows = hub_rows(FLICKR_NAMES).cast_column("image", datasets.Image(decode=False))
    rows = rows.map(
        lambda row, i: {"image": {"bytes": bomb_png, "path": "bomb.png"}} if i == 4 else row,
        with_indices=True,
    )
    if policy == "error":
        with pytest.raises(ImageLoadError) as error:
            data.load_caption_dataset(rows, on_bad_image="error")
        assert "bomb.png" in one_line(error)
        return
    splits = data.load_caption_dataset(rows, on_bad_image="skip")
    assert "bomb.png" not in all_captions(splits) and "skipped 1 unreadable image" in caplog.text
