"""The built-in synthetic captioning set `shapes`, and its scorer.

2,000 scenes of one to three coloured shapes on light backgrounds, five different true captions
each, written in the Kaggle Flickr8k layout (`Images/` + `captions.txt`, official-style split
lists) with `scenes.jsonl` recording what was drawn, so that a new user can run the whole
pipeline offline and a test can check every caption against the picture.

    >>> image, scene, captions = draw_scene(seed=0, index=0, size=96)
    >>> image.size, len(set(captions))
    ((96, 96), 5)
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .files import default_cache_dir, write_text_atomic
from .splits import FLICKR8K_SPLIT_FILES, seeded_split

logger = logging.getLogger(__name__)

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
# A named object: a colour word, then a shape word, with at most one size word between them.
_NAMED_OBJECT = re.compile(rf"\b({'|'.join(SHAPES_COLOURS)}) (?:(?:big|small) )?({'|'.join(SHAPES_KINDS)})\b")
_NUMBER_WORDS = {word: number for number, word in _NUMBERS.items()}


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


def draw_scene(seed: int, index: int, size: int) -> tuple[Image.Image, dict, list[str]]:
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
            image, scene, captions = draw_scene(seed, index, size)
            # subsampling=0 (4:4:4 chroma) keeps small shapes' colours crisp.
            image.save(folder / "Images" / name, format="JPEG", quality=95, subsampling=0)
            writer.writerows([name, caption] for caption in captions)
            scenes_file.write(json.dumps({"image": name, **scene}) + "\n")
    for split, ids in seeded_split(names, seed).items():
        write_text_atomic(folder / FLICKR8K_SPLIT_FILES[split], "".join(f"{i}\n" for i in ids))
    params = {"version": SHAPES_VERSION, "num_images": num_images, "seed": seed, "image_size": size}
    write_text_atomic(folder / "shapes.json", json.dumps(params) + "\n")


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
        >>> import tempfile
        >>> root = make_shapes_dataset(Path(tempfile.mkdtemp()) / "shapes", num_images=12)
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
        read_scenes(shapes_root())["shapes_00000.jpg"]["objects"][0]["colour"]
        # -> 'blue'
    """
    lines = (Path(root) / "scenes.jsonl").read_text().splitlines()
    return {scene["image"]: scene for scene in map(json.loads, lines)}


def _first_word_of(caption: str, words) -> str | None:
    return next((word for word in caption.lower().split() if word in words), None)


def _stated_totals(words: list[str]) -> list[int]:
    """The object count each number word states: "two shapes" -> 2, "two small shapes" (the others) -> 3."""
    pairs = itertools.pairwise([*words, ""])
    return [_NUMBER_WORDS[word] + (after == "small") for word, after in pairs if word in _NUMBER_WORDS]


def _caption_tallies(caption: str, objects: list[dict]) -> dict[str, int]:
    """What one caption gets right about its scene, as counts that the scorer sums over images."""
    largest = max(objects, key=lambda obj: obj["area"])
    words = caption.lower().split()
    named = _NAMED_OBJECT.findall(" ".join(words))  # [(colour, shape), ...]
    drawn = {(obj["colour"], obj["shape"]) for obj in objects}
    others = drawn - {(largest["colour"], largest["shape"])}
    totals = _stated_totals(words)
    colour_hit = _first_word_of(caption, SHAPES_COLOURS) == largest["colour"]
    shape_hit = _first_word_of(caption, SHAPES_KINDS) == largest["shape"]
    return dict(
        colour=colour_hit,
        shape=shape_hit,
        colour_and_shape=colour_hit and shape_hit,
        count_stated=bool(totals),
        count=bool(totals) and all(total == len(objects) for total in totals),
        hallucinating=any(pair not in drawn for pair in named),
        named=len(named),
        named_drawn=sum(pair in drawn for pair in named),
        second_object_scene=len(objects) > 1,
        second_object=any(pair in others for pair in named),
    )


def score_shapes_captions(captions: dict[str, str], scenes: dict[str, dict]) -> dict[str, float | None]:
    """How well captions (one per image id) describe the scenes drawn (`read_scenes`).

    Words are the caption's lower-cased, space-separated words. Over all captions:
    - colour_accuracy / shape_accuracy: the first colour word / first shape word names the
      largest object; colour_and_shape_accuracy: both do.
    - count_stated: the caption has a number word ("one", "two", "three"). Each states a total:
      the number itself ("one red circle", "two shapes", "of three shapes"), or the number plus
      one when "small" follows, since "and two small shapes" counts the objects besides the
      largest. count_accuracy: among captions that state a count, every stated total equals
      the number of objects drawn (None when no caption states one).
    - A named object is a colour word then a shape word, with at most one size word between
      ("red circle", "big red circle"); a colour or shape word outside such a pair is ignored,
      and sizes are not checked. hallucination_rate: some named object matches no drawn
      (colour, shape); objects_named_correctly: the share of all named objects that match one
      (None when none is named).
    - second_object_accuracy: over the second_object_scenes images with two or more objects,
      the caption names one of the objects other than the largest (naming none is a miss;
      None when there are no such images).
    A model that ignores the image gets about 1 / len(SHAPES_COLOURS) on colour.

    Example:
        >>> scenes = {
        ...     "a.jpg": {"objects": [{"colour": "red", "shape": "circle", "area": 900},
        ...                           {"colour": "blue", "shape": "square", "area": 200}]},
        ...     "b.jpg": {"objects": [{"colour": "green", "shape": "diamond", "area": 800}]},
        ... }
        >>> captions = {"a.jpg": "a big red circle and a small blue square",
        ...             "b.jpg": "two shapes and the biggest is a green square"}
        >>> scores = score_shapes_captions(captions, scenes)
        >>> [scores[key] for key in ("colour_and_shape_accuracy", "count_stated", "count_accuracy")]
        [0.5, 0.5, 0.0]
        >>> [scores[key] for key in ("hallucination_rate", "second_object_accuracy", "second_object_scenes")]
        [0.5, 1.0, 1]
    """
    tallies = Counter()
    for image_id, caption in captions.items():
        # += rather than update(): an empty Counter's update() would keep the bools themselves
        for name, value in _caption_tallies(caption, scenes[image_id]["objects"]).items():
            tallies[name] += value

    def share(hits: str, of: str) -> float | None:
        return tallies[hits] / tallies[of] if tallies[of] else None

    count = max(len(captions), 1)
    return {
        "colour_accuracy": tallies["colour"] / count,
        "shape_accuracy": tallies["shape"] / count,
        "colour_and_shape_accuracy": tallies["colour_and_shape"] / count,
        "count_stated": tallies["count_stated"] / count,
        "count_accuracy": share("count", "count_stated"),
        "hallucination_rate": tallies["hallucinating"] / count,
        "objects_named_correctly": share("named_drawn", "named"),
        "second_object_accuracy": share("second_object", "second_object_scene"),
        "second_object_scenes": tallies["second_object_scene"],
        "num_images": len(captions),
    }
