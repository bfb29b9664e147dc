"""Evaluation reports: the metric table (one source of labels), report.json/.md, captions.jsonl, galleries.

Nothing here touches a model: `write_report` takes the numbers and captions that
evaluate_model.py produced and writes them; publishing.py reads the same `METRICS` table to
build the model card. Every file is written atomically.

    >>> [label for label, _ in METRICS.values()][:4]
    ['BLEU-1', 'BLEU-2', 'BLEU-3', 'BLEU-4']
"""

from __future__ import annotations

import base64
import contextlib
import html
import importlib.metadata
import io
import json
import math
import platform
import textwrap
from pathlib import Path

import datasets
from matplotlib.figure import Figure

from processing import load_image

from .files import atomic_write, write_text_atomic

# report.json metric keys, in the order of published caption tables: (column name, Hub metric type)
METRICS = {
    "bleu_1": ("BLEU-1", "bleu"),
    "bleu_2": ("BLEU-2", "bleu"),
    "bleu_3": ("BLEU-3", "bleu"),
    "bleu_4": ("BLEU-4", "bleu"),
    "meteor": ("METEOR", "meteor"),
    "rouge_l": ("ROUGE-L", "rouge"),
    "cider": ("CIDEr", "cider"),
}
METRIC_LABELS = {key: label for key, (label, _) in METRICS.items()}
# report["shapes"] keys (score_shapes_captions) shown in report.md, x100; a missing key shows as "–"
SHAPES_COLUMNS = {
    "colour_accuracy": "colour of the largest object",
    "shape_accuracy": "its shape",
    "colour_and_shape_accuracy": "colour and shape",
    "count_accuracy": "stated counts right",
    "hallucination_rate": "names an object not drawn",
    "second_object_accuracy": "second object named",
}
SHAPES_NOTE = (
    "Shapes set, x100: colour and shape over all captions; stated counts over the captions that "
    "state one; an object not drawn is a colour + shape pair that matches no object in the picture; "
    "second object over the images with two or more objects."
)
OURS, BLIP, BASELINE = "ours", "blip", "most_frequent_caption"
VERSIONED_PACKAGES = ("torch", "transformers", "datasets", "evaluate", "accelerate", "pycocoevalcap")
THUMBNAIL_PIXELS = 256  # longest side of a gallery thumbnail
REPORT_FILES = ("report.json", "report.md", "captions.jsonl", "gallery.html", "gallery.png")
HEATMAPS_DIR = "gallery-heatmaps"  # beside gallery.html: the per-word pictures it links to


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages behind the numbers (absent packages left out).

    Example:
        >>> sorted(package_versions())[:3]
        ['accelerate', 'datasets', 'evaluate']
    """
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


# ----------------------------------------------------------------------------- writing the results


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def display_name(key: str) -> str:
    """How a `report["models"]` key is shown in report.md and the gallery."""
    return {OURS: "ours", BLIP: "BLIP", BASELINE: "most frequent training caption"}.get(key, key)


def _row_label(key: str, row: dict) -> str:
    return f"{display_name(key)}: {row['model']}".replace("|", "\\|")


def render_markdown(report: dict) -> str:
    """report.md: facts, then the side-by-side table with metrics x100 as caption papers print them."""
    generation = report["generation"]
    lines = [
        f"# Caption metrics: {report['dataset']}, {report['split']} split ({report['num_images']} images)",
        "",
        f"Decoding: beam {generation['num_beams']}, at most {generation['max_new_tokens']} new tokens; "
        f"images captioned from {report['captioned_from']}. Metrics: coco-caption BLEU-1..4, METEOR, "
        f"ROUGE-L and CIDEr-D, x100, each image scored once against all its references "
        f"(tokenize={report['metric']['tokenize']}).",
        "",
        "| model | " + " | ".join(METRIC_LABELS.values()) + " | images/s | seconds |",
        "|---|" + "---:|" * (len(METRIC_LABELS) + 2),
    ]
    for key, row in report["models"].items():
        speed = "–" if row.get("images_per_s") is None else f"{row['images_per_s']:.1f}"
        seconds = "–" if row.get("seconds") is None else f"{row['seconds']:.2f}"
        metrics = " | ".join(_percent(row.get(name)) for name in METRIC_LABELS)
        lines.append(f"| {_row_label(key, row)} | {metrics} | {speed} | {seconds} |")
    reasons = {
        row["meteor_unavailable"] for row in report["models"].values() if row.get("meteor_unavailable")
    }
    if reasons:
        lines += ["", f"METEOR not computed: {'; '.join(sorted(reasons))}."]
    if report.get("blip_unavailable"):
        lines += ["", f"BLIP not compared: {report['blip_unavailable']}."]
    if report.get("shapes"):
        lines += ["", "| shapes set | " + " | ".join(SHAPES_COLUMNS.values()) + " |"]
        lines += ["|---|" + "---:|" * len(SHAPES_COLUMNS)]
        lines += [
            f"| {display_name(key)} | " + " | ".join(_percent(s.get(name)) for name in SHAPES_COLUMNS) + " |"
            for key, s in report["shapes"].items()
        ]
        lines += ["", SHAPES_NOTE]
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    return "\n".join(lines + ["", f"Versions: {versions}.", ""])


def write_captions_jsonl(
    path: Path, image_ids: list[str], references: list[list[str]], captions: dict
) -> None:
    """One line per image: image id, all references, each model's caption."""
    with atomic_write(path, encoding="utf-8") as file:
        for row, (image_id, refs) in enumerate(zip(image_ids, references, strict=True)):
            line = {
                "image_id": image_id,
                "references": refs,
                **{key: caps[row] for key, caps in captions.items()},
            }
            file.write(json.dumps(line, ensure_ascii=False) + "\n")


def gallery_rows(num_images: int, num_gallery: int) -> list[int]:
    """`num_gallery` row indices spread evenly over the split (not just its first images).

    Example:
        >>> gallery_rows(250, 4)
        [0, 62, 125, 187]
    """
    count = min(num_gallery, num_images)
    return sorted({i * num_images // count for i in range(count)}) if count > 0 else []


def _thumbnail_base64(image) -> str:
    thumbnail = load_image(image).copy()
    thumbnail.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _heatmaps_html(heatmaps: list[tuple[str, str]]) -> str:
    """The 'where it looked' strip of one gallery image: each (relative picture path, word)."""
    if not heatmaps:
        return ""
    words = "".join(
        f'<span class="word"><img src="{html.escape(src)}" alt="{html.escape(word)}">{html.escape(word)}</span>'
        for src, word in heatmaps
    )
    return f'<dt>where ours looked, word by word</dt><dd class="words">{words}</dd>'


def write_gallery_html(path: Path, title: str, items: list[dict]) -> None:
    """One page: each image as a base64 JPEG with each model's caption and the references, and the
    per-word heatmaps (`item["heatmaps"]`: picture paths relative to the page) where there are some."""
    figures = []
    for item in items:
        captions = "".join(
            f"<dt>{html.escape(name)}</dt><dd>{html.escape(caption)}</dd>"
            for name, caption in item["captions"].items()
        )
        references = "".join(f"<li>{html.escape(ref)}</li>" for ref in item["references"])
        figures.append(
            f'<figure><img src="data:image/jpeg;base64,{_thumbnail_base64(item["image"])}" '
            f'alt="{html.escape(item["image_id"])}"><figcaption><b>{html.escape(item["image_id"])}</b>'
            f"<dl>{captions}{_heatmaps_html(item.get('heatmaps', []))}"
            f"<dt>references</dt><dd><ul>{references}</ul></dd></dl></figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;margin:1.5em}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:1em}"
        "figure{margin:0;padding:.5em;border:1px solid #ddd;border-radius:6px}img{max-width:100%}"
        "dt{font-weight:bold;margin-top:.4em}dd{margin-left:.8em}ul{padding-left:1.1em;margin:0}"
        ".words{display:flex;flex-wrap:wrap;gap:.3em}.word{display:flex;flex-direction:column;"
        "align-items:center;font-size:.85em}.word img{width:64px}"
    )
    write_text_atomic(
        path,
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
        f'<div class="grid">\n' + "\n".join(figures) + "\n</div></body></html>\n",
    )


def _gallery_text(item: dict) -> str:
    """Each model's caption and the first reference, wrapped to the cell width, at most 3 lines each."""
    lines = [f"{name}: {caption}" for name, caption in item["captions"].items()]
    lines.append(f"reference: {item['references'][0]}")
    return "\n".join(textwrap.fill(textwrap.shorten(line, 130), 46) for line in lines)


def write_gallery_png(path: Path, title: str, items: list[dict]) -> None:
    """A matplotlib grid (up to 4 columns) of the gallery images, each with its captions below it."""
    columns = min(4, max(len(items), 1))
    rows = max(math.ceil(len(items) / columns), 1)
    figure = Figure(figsize=(4.0 * columns, 5.2 * rows + 0.4))  # no pyplot: no global state, no GUI backend
    # two grid rows per gallery row: the image, then a text panel that the captions cannot overflow
    axes = figure.subplots(2 * rows, columns, squeeze=False, gridspec_kw={"height_ratios": [3.6, 1.6] * rows})
    for axis in axes.flat:
        axis.axis("off")
    for index, item in enumerate(items):
        row, column = divmod(index, columns)
        axes[2 * row, column].imshow(load_image(item["image"]))
        axes[2 * row + 1, column].text(0.0, 1.0, _gallery_text(item), va="top", ha="left", fontsize=8)
    figure.suptitle(title)
    figure.subplots_adjust(
        left=0.02, right=0.98, top=1 - 0.4 / figure.get_figheight(), bottom=0.01, hspace=0.05, wspace=0.08
    )
    with atomic_write(path, "wb") as file:
        figure.savefig(file, format="png", dpi=90)


def write_heatmaps(folder: Path, index: int, pictures: list) -> list[tuple[str, str]]:
    """Save one gallery image's per-word heatmaps [(PIL picture, word)] as `HEATMAPS_DIR`/II-WW.png
    (gallery position, word position); returns [(path relative to `folder`, word)]."""
    saved = []
    for position, (picture, word) in enumerate(pictures):
        relative = f"{HEATMAPS_DIR}/{index:02d}-{position:02d}.png"
        with atomic_write(folder / relative, "wb") as file:
            picture.save(file, format="PNG")
        saved.append((relative, word))
    return saved


def _remove_old_heatmaps(folder: Path) -> None:
    """An earlier run's pictures in `HEATMAPS_DIR` (ours by their name), so no stale one lingers."""
    old = folder / HEATMAPS_DIR
    for picture in old.glob("[0-9][0-9]-[0-9][0-9].png") if old.is_dir() else ():
        picture.unlink()
    with contextlib.suppress(OSError):  # absent, or holding someone else's files: left alone
        old.rmdir()


def write_gallery(
    folder: Path,
    title: str,
    split: datasets.Dataset,
    captions: dict,
    num_gallery: int,
    heatmaps: dict | None = None,
) -> None:
    """gallery.html and gallery.png for `num_gallery` images spread over the split; `heatmaps`
    ({row: [(picture, word), ...]}, from a patches model) are saved in `HEATMAPS_DIR` and shown in
    gallery.html under their image's captions."""
    heatmaps = heatmaps or {}
    _remove_old_heatmaps(folder)
    items = [
        {
            "image": split[row]["image"],
            "image_id": split[row]["image_id"],
            "references": split[row]["captions"],
            "captions": {display_name(key): caps[row] for key, caps in captions.items()},
            "heatmaps": write_heatmaps(folder, index, heatmaps.get(row, [])),
        }
        for index, row in enumerate(gallery_rows(split.num_rows, num_gallery))
    ]
    write_gallery_html(folder / "gallery.html", title, items)
    write_gallery_png(folder / "gallery.png", title, items)


def write_report(
    folder: Path,
    report: dict,
    split: datasets.Dataset,
    captions: dict,
    num_gallery: int,
    heatmaps: dict | None = None,
) -> None:
    """Write every file of `REPORT_FILES` into `folder`: the numbers, every caption, the gallery
    (with `heatmaps`, {row: [(picture, word), ...]}, in gallery.html and `HEATMAPS_DIR`)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(folder / "report.md", render_markdown(report))
    write_captions_jsonl(folder / "captions.jsonl", split["image_id"], split["captions"], captions)
    title = f"{report['dataset']} {report['split']}: captions and references"
    write_gallery(folder, title, split, captions, num_gallery, heatmaps)
