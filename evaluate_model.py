"""Caption metrics of a trained captioner, side by side with BLIP and a most-frequent-caption baseline.

    python evaluate_model.py --model outputs/demo/model --dataset shapes                # offline demo
    python evaluate_model.py --model outputs/flickr8k/model --dataset jxie/flickr8k --compare_blip

Every image of the split is captioned once, in batches, with the model's own `generate()`
(from the cached CLIP embeddings unless `--no_cache`), and the captions are scored against ALL
reference captions of each image by the project's metric module (`metrics/caption_metrics`,
loaded offline through `evaluate.load`): BLEU-1..4, METEOR, ROUGE-L and CIDEr-D as coco-caption
computes them. `--compare_blip` captions the same images with BLIP, same beam width and length
limit. A third row gives every image the most frequent training caption: a model that does not
beat it has not learnt to look at the image.

Writes to `--output_dir`: `report.json` (the numbers; `publishing.model_index` turns it into the
Hub model-index), `report.md` (the table), `captions.jsonl` (every caption), `gallery.html` and
`gallery.png` (a few images with their captions; for a model trained with
`image_feature="patches"`, the first few also show where it looked for each word, pictures in
`gallery-heatmaps/`). `train_accelerate.py` calls `evaluate_captioner` at the end of training with
the objects it already holds.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import datasets
import evaluate
import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import BlipForConditionalGeneration, BlipProcessor

from clip_lstm_captioner import data
from clip_lstm_captioner.cli import (
    beam_width,
    default_device,
    default_num_workers,
    load_captioner,
    load_pretrained,
    run_cli,
)
from clip_lstm_captioner.distributed import gather_in_order, process_state, share_of
from clip_lstm_captioner.embedding_cache import cache_image_embeds, image_embeds_of
from clip_lstm_captioner.errors import UsageError
from clip_lstm_captioner.images import pixel_batches
from clip_lstm_captioner.reports import (
    BASELINE,
    BLIP,
    METRIC_LABELS,
    OURS,
    gallery_rows,
    package_versions,
    render_markdown,
    write_report,
)
from clip_lstm_captioner.shapes import read_scenes, score_shapes_captions, shapes_root
from clip_lstm_captioner.splits import SPLIT_ALIASES
from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import ClipLstmProcessor, first_line, is_hub_id, load_image, word_heatmaps

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics" / "caption_metrics"
NUM_HEATMAP_IMAGES = 4  # gallery images that also show per-word heatmaps (patches models)
DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-base"
_BLIP_HINT = "pass --blip_model a local folder holding a saved BlipForConditionalGeneration and BlipProcessor"


# ----------------------------------------------------------------------------- loading


def load_blip(source: str = DEFAULT_BLIP_MODEL) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """BLIP for unconditional captioning and its processor, from a Hub id or a local folder.

    Example:
        blip_model, blip_processor = load_blip("Salesforce/blip-image-captioning-base")  # needs the Hub
    """

    def loader(path):
        return BlipForConditionalGeneration.from_pretrained(path).eval(), BlipProcessor.from_pretrained(path)

    return load_pretrained(loader, source, "BLIP", _BLIP_HINT)


def load_blip_or_reason(source: str) -> tuple[tuple | None, str | None]:
    """(BLIP model and processor, None), or (None, one line saying why BLIP cannot be compared).

    BLIP is the comparison, not the subject: without it the evaluation of our model still runs, and
    the reason is printed now and written into the report.
    """
    try:
        return load_blip(source), None
    except UsageError as error:
        reason = f"cannot compare with BLIP: {error}"
        print(f"evaluate_model.py: warning: {reason}", file=sys.stderr)
        return None, reason


def select_split(splits: datasets.DatasetDict, name: str) -> tuple[datasets.Dataset, str]:
    """The split called `name` (aliases such as 'val' allowed) and its canonical name.

    Example:
        select_split(data.load_caption_dataset("shapes"), "val")[1]
        # -> 'validation'
    """
    canonical = SPLIT_ALIASES.get(name, name)
    if canonical not in splits:
        raise UsageError(f"--split {name!r}: unknown split; this dataset has {', '.join(splits)}")
    return splits[canonical], canonical


def check_references(split: datasets.Dataset, split_name: str) -> None:
    """Raise `UsageError` unless every image of `split` has at least one reference caption."""
    if split.num_rows == 0:
        raise UsageError(f"split {split_name!r} has no images to evaluate")
    missing = [
        image_id
        for image_id, references in zip(split["image_id"], split["captions"], strict=True)
        if not any(reference.strip() for reference in references)
    ]
    if missing:
        raise UsageError(
            f"split {split_name!r}: {len(missing)} of {split.num_rows} images have no reference captions "
            f"(first: {missing[0]}); the metrics compare captions with references, so evaluate a split that has them"
        )


# ----------------------------------------------------------------------------- captioning


def decoding_settings(model, num_beams: int | None = None, max_new_tokens: int | None = None) -> dict:
    """Beam width and length limit: the arguments, else the model's saved generation config.

    Example:
        decoding_settings(model, num_beams=3)
        # -> {'num_beams': 3, 'max_new_tokens': 30}
    """
    saved = model.generation_config
    settings = {
        "num_beams": num_beams or saved.num_beams or 1,
        "max_new_tokens": max_new_tokens or saved.max_new_tokens or max((saved.max_length or 20) - 1, 1),
    }
    for name, value in settings.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    return settings


def _embeds_batches(split: datasets.Dataset, batch_size: int):
    """Yield ({"image_embeds": (B, D) or (B, P, D) patch tokens}, row indices) from the split's cached CLIP features."""
    image_embeds = image_embeds_of(split)  # (N, D) float32 or (N, P, D) float16, memory-mapped
    for start in range(0, len(image_embeds), batch_size):
        batch = image_embeds[start : start + batch_size]
        yield {"image_embeds": batch}, list(range(start, start + len(batch)))


def _pixel_batches(split, image_processor, batch_size: int, num_workers: int, on_bad_image: str):
    """Yield ({"pixel_values": (B, 3, H, W)}, row indices), images decoded in DataLoader workers.

    An unreadable image stops with its name (on_bad_image="error") or is left out ("skip").
    """
    sources = split.cast_column("image", datasets.Image(decode=False))["image"]
    batches = pixel_batches(
        sources, image_processor, batch_size=batch_size, num_workers=num_workers, on_bad_image=on_bad_image
    )
    for pixel_values, rows in batches:
        yield {"pixel_values": pixel_values}, rows


@torch.no_grad()
def caption_split(
    model,
    processor,
    split: datasets.Dataset,
    *,
    num_beams: int,
    max_new_tokens: int,
    batch_size: int = 64,
    use_image_embeds: bool = True,
    num_workers: int = 0,
    on_bad_image: str = "error",
    desc: str = "captioning",
    processes: PartialState | None = None,
) -> list[str | None]:
    """One caption per image of `split`, in batches; None for an unreadable image that was skipped.

    Uses the split's cached `image_embeds` when it has them and `use_image_embeds` is set (our
    model); otherwise decodes the images and passes `pixel_values`, which any captioner with a
    transformers-style `generate()` takes (our model, BLIP). Under `accelerate launch` pass
    `processes` (a PartialState): each process captions whole batches of its share and every
    process gets all captions back, in order.

    Example:
        caption_split(model, processor, test, num_beams=5, max_new_tokens=30)[:2]
        # -> ['a blue square at the top', 'a red circle on the left']
    """
    model.eval()
    if processes is not None and processes.num_processes > 1:
        share = split.select(share_of(split.num_rows, processes, block=batch_size))
        kwargs = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
        kwargs.update(use_image_embeds=use_image_embeds, num_workers=num_workers, on_bad_image=on_bad_image)
        return gather_in_order(caption_split(model, processor, share, **kwargs), processes)
    if use_image_embeds and "image_embeds" in split.column_names:
        batches = _embeds_batches(split, batch_size)
    else:
        batches = _pixel_batches(split, processor.image_processor, batch_size, num_workers, on_bad_image)
    captions: list[str | None] = [None] * split.num_rows
    with tqdm(total=split.num_rows, desc=desc, unit="image") as progress:
        for inputs, rows in batches:
            inputs = {
                name: value.to(device=model.device, dtype=model.dtype) for name, value in inputs.items()
            }
            ids = model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens)
            for row, caption in zip(rows, processor.batch_decode(ids, skip_special_tokens=True), strict=True):
                captions[row] = caption.strip()
            progress.update(len(rows))
    return captions


@torch.no_grad()
def gallery_heatmaps(model, processor, split: datasets.Dataset, rows: list[int], **settings) -> dict:
    """Where a patches model looked for each word: {row: [(picture, word), ...]} for `rows` of `split`
    (`word_heatmaps`); {} for a pooled or projected model, which has no attention to show.

    A second, small `generate(..., output_attentions=True)` on these rows alone, from the same inputs
    as their captions (the cached `image_embeds` when the split has them) and with the same
    `settings`, so it writes the same captions while the captioning of the split stays as fast as
    without heatmaps.

    Example:
        heatmaps = gallery_heatmaps(model, processor, test, [0, 62], num_beams=5, max_new_tokens=30)
        [word for _, word in heatmaps[0]]
        # -> ['a', 'red', 'circle', 'on', 'the', 'left']
    """
    if model.config.image_feature != "patches" or not rows:
        return {}
    subset = split.select(rows)
    images = [load_image(image) for image in subset["image"]]
    if "image_embeds" in subset.column_names:
        inputs = {"image_embeds": image_embeds_of(subset)}  # (n, P, D)
    else:
        inputs = {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"]}
    inputs = {name: value.to(device=model.device, dtype=model.dtype) for name, value in inputs.items()}
    out = model.generate(**inputs, **settings, return_dict_in_generate=True, output_attentions=True)
    return {
        row: word_heatmaps(image, attentions, processor.token_labels(sequence), processor.image_processor)
        for row, image, sequence, attentions in zip(rows, images, out.sequences, out.attentions, strict=True)
    }


def _timed_captions(model, processor, split, desc: str, **kwargs) -> tuple[list[str | None], float]:
    start = time.perf_counter()
    captions = caption_split(model, processor, split, desc=desc, **kwargs)
    return captions, time.perf_counter() - start


def most_frequent_caption(captions) -> str | None:
    """The most frequent caption (lower-cased, spacing and final period normalised; ties: first seen).

    `captions` is a list of caption lists (a split's `captions` column) or of strings.

    Example:
        >>> most_frequent_caption([["A dog runs.", "a cat"], ["a dog  runs"]])
        'a dog runs'
    """
    flat = [c for item in captions for c in ([item] if isinstance(item, str) else item)]
    counts = Counter(" ".join(caption.lower().strip().rstrip(".").split()) for caption in flat)
    counts.pop("", None)
    return counts.most_common(1)[0][0] if counts else None


# ----------------------------------------------------------------------------- scoring


def score_captions(
    metric, predictions: list[str], references: list[list[str]], *, tokenize: str, meteor: bool
) -> dict:
    """The metric module's numbers, plus `metric_seconds` and `meteor_seconds` timed apart.

    METEOR starts a Java process (seconds, whatever the corpus size), so it gets its own call: its
    time is what that call took beyond the Python metrics, which it recomputes.

    Example:
        score_captions(evaluate.load(str(METRICS_DIR)), ["a dog"], [["a dog runs"]], tokenize="python", meteor=False)
        # -> {'bleu_1': 0.36..., ..., 'meteor': None, 'meteor_unavailable': 'skipped (meteor=False)', ...}
    """
    start = time.perf_counter()
    scores = metric.compute(predictions=predictions, references=references, tokenize=tokenize, meteor=False)
    scores.update(metric_seconds=time.perf_counter() - start, meteor_seconds=None)
    if meteor:
        start = time.perf_counter()
        with_meteor = metric.compute(
            predictions=predictions, references=references, tokenize=tokenize, meteor=True
        )
        scores["meteor"] = with_meteor["meteor"]
        scores.pop("meteor_unavailable", None)
        if with_meteor["meteor"] is None:
            scores["meteor_unavailable"] = with_meteor.get("meteor_unavailable")
        else:
            scores["meteor_seconds"] = max(time.perf_counter() - start - scores["metric_seconds"], 0.0)
    return scores


def _model_row(name: str, captions: list[str], scores: dict, seconds: float | None) -> dict:
    """One `report["models"]` entry: name, metrics in table order, speed, timings, caption length."""
    row = {"model": name, **{key: scores.get(key) for key in METRIC_LABELS}}
    row["images_per_s"] = len(captions) / seconds if seconds else None
    row["seconds"] = seconds
    row["meteor_seconds"] = scores.get("meteor_seconds")
    row["metric_seconds"] = scores.get("metric_seconds")
    row["mean_caption_words"] = sum(len(c.split()) for c in captions) / max(len(captions), 1)
    if scores.get("meteor_unavailable"):
        row["meteor_unavailable"] = scores["meteor_unavailable"]
    return row


# ----------------------------------------------------------------------------- the evaluation


def evaluate_captioner(
    model: ClipLstmForImageCaptioning,
    processor: ClipLstmProcessor,
    split: datasets.Dataset,
    *,
    output_dir: str | Path,
    dataset_name: str,
    split_name: str = "test",
    model_name: str | None = None,
    train_captions=None,
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    blip: tuple | None = None,
    tokenize: str = "python",
    meteor: bool = True,
    num_gallery: int = 8,
    shapes_scenes: dict | None = None,
    num_workers: int = 0,
    on_bad_image: str = "error",
    blip_unavailable: str | None = None,
    processes: PartialState | None = None,
) -> dict | None:
    """Caption every image of `split` once, score against all references, write the report files.

    `split` has rows `image`, `image_id`, `captions`, and ideally `image_embeds` (from
    `cache_image_embeds`), which are then used instead of running CLIP. `blip` is a
    (BlipForConditionalGeneration, BlipProcessor) pair captioning the same images with the same
    settings (`blip_unavailable`, when it could not be loaded, says why in the report);
    `train_captions` (the train split's `captions` column) adds the most-frequent-
    training-caption baseline; `shapes_scenes` (`read_scenes`) adds the shapes scores (`score_shapes_captions`).
    `num_beams` / `max_new_tokens` default to the model's generation config. Writes report.json,
    report.md, captions.jsonl, gallery.html and gallery.png to `output_dir` (for a patches model,
    with per-word heatmaps of the first `NUM_HEATMAP_IMAGES` gallery images); returns the report.
    Under `accelerate launch`, call it on every process with `processes` (a PartialState): the
    images are shared out, and the main process alone scores, writes and returns the report
    (the others return None).

    Example:
        report = evaluate_captioner(model, processor, splits["test"], output_dir="outputs/demo/eval",
                                    dataset_name="shapes", train_captions=splits["train"]["captions"])
        report["models"]["ours"]["bleu_4"] > report["models"]["most_frequent_caption"]["bleu_4"]
        # -> True
    """
    settings = decoding_settings(model, num_beams, max_new_tokens)
    check_references(split, split_name)
    from_embeds = "image_embeds" in split.column_names
    options = dict(settings, batch_size=batch_size, num_workers=num_workers, on_bad_image=on_bad_image)
    options["processes"] = processes
    split, captions, seconds = _caption_with_each_model(model, processor, split, blip, options)
    if processes is not None and not processes.is_main_process:
        return None  # scores are computed once, by the main process
    names = {OURS: model_name or model.name_or_path or OURS}
    if blip is not None:
        names[BLIP] = blip[0].name_or_path or BLIP
    baseline = most_frequent_caption(train_captions) if train_captions is not None else None
    if baseline is not None:  # scored like a model, but left out of captions.jsonl and the gallery
        names[BASELINE] = repr(baseline)
    scored = {**captions, BASELINE: [baseline] * split.num_rows} if baseline is not None else captions
    rows = _score_rows(scored, names, seconds, split["captions"], tokenize=tokenize, meteor=meteor)
    report = {
        "dataset": str(dataset_name),
        "split": split_name,
        "num_images": split.num_rows,
        "generation": settings,
        "models": rows,
        "captioned_from": "cached CLIP image_embeds" if from_embeds else "image files (pixel_values)",
        "metric": {
            "module": "metrics/caption_metrics",
            "tokenize": tokenize,
            "meteor": meteor,
            "scale": "0..1, CIDEr-D 0..10 (report.md shows x100)",
        },
        "device": str(model.device),
        "versions": package_versions(),
    }
    if blip_unavailable:
        report["blip_unavailable"] = blip_unavailable
    if shapes_scenes is not None:
        ids = split["image_id"]
        report["shapes"] = {
            key: score_shapes_captions(dict(zip(ids, caps, strict=True)), shapes_scenes)
            for key, caps in scored.items()
        }
    heatmap_rows = gallery_rows(split.num_rows, num_gallery)[:NUM_HEATMAP_IMAGES]
    heatmaps = gallery_heatmaps(model, processor, split, heatmap_rows, **settings)
    write_report(Path(output_dir), report, split, captions, num_gallery, heatmaps=heatmaps)
    return report


def _caption_with_each_model(model, processor, split, blip, options: dict):
    """(split, {key: captions}, {key: seconds}); images unreadable for our model leave every row."""
    captions, seconds = {}, {}
    captions[OURS], seconds[OURS] = _timed_captions(model, processor, split, "captioning (ours)", **options)
    kept = [row for row, caption in enumerate(captions[OURS]) if caption is not None]
    if len(kept) < split.num_rows:  # skipped unreadable images: every model is scored on the rest
        split, captions[OURS] = split.select(kept), [captions[OURS][row] for row in kept]
    if blip is not None:
        captions[BLIP], seconds[BLIP] = _timed_captions(
            *blip, split, "captioning (BLIP)", use_image_embeds=False, **options
        )
    return split, captions, seconds


def _score_rows(
    captions: dict, names: dict, seconds: dict, references, *, tokenize: str, meteor: bool
) -> dict:
    """`report["models"]`: each model's row, scored by the metric module (loaded once, offline, from its folder)."""
    metric = evaluate.load(str(METRICS_DIR))
    return {
        key: _model_row(
            names[key],
            caps,
            score_captions(metric, caps, references, tokenize=tokenize, meteor=meteor),
            seconds.get(key),
        )
        for key, caps in captions.items()
    }


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    # fmt: off
    # Left as written: the formatter would spread each flag over five lines.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Our captioner: a folder saved by train_accelerate.py (run folder's model/) or a Hub repo id.")
    data.add_data_args(parser)
    parser.add_argument("--split", default="test",
                        help="Split to caption and score: train, validation or test (default: test).")
    parser.add_argument("--max_images", type=int, default=None,
                        help="Evaluate only the first N images of the split, for a quick look (default: all).")
    parser.add_argument("--output_dir", default=None,
                        help="Where the report, captions and gallery go (default: eval_<split> beside a local "
                        "model folder, else outputs/eval/<repo name>).")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--num_beams", type=beam_width, default=None,
                          help="Beam width, 1 to 64 (default: the model's saved generation config).")
    decoding.add_argument("--max_new_tokens", type=int, default=None,
                          help="Caption length limit in tokens (default: the model's saved generation config).")
    decoding.add_argument("--batch_size", type=int, default=64, help="Images per generate() call.")
    decoding.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    decoding.add_argument("--no_cache", action="store_true",
                          help="Caption from the image files (pixel_values through CLIP) instead of cached CLIP embeddings.")
    decoding.add_argument("--embed_batch_size", type=int, default=256,
                          help="Images per CLIP batch when filling the embedding cache.")
    decoding.add_argument("--num_workers", type=int, default=None,
                          help="Image-decoding worker processes (default: up to 8, one per CPU core).")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--tokenize", choices=("python", "ptb"), default="python",
                         help="Caption tokenizer before scoring: 'python' (coco-caption's PTB rules, no Java) or 'ptb' "
                         "(coco-caption's Java tokenizer, needs pycocoevalcap and java).")
    scoring.add_argument("--no_meteor", action="store_true",
                         help="Skip METEOR (it starts a Java process: about 10 s per model on 2 CPU cores).")
    scoring.add_argument("--compare_blip", action="store_true", help="Also caption and score the same images with BLIP.")
    scoring.add_argument("--blip_model", default=DEFAULT_BLIP_MODEL,
                         help=f"BLIP Hub id or local folder for --compare_blip (default {DEFAULT_BLIP_MODEL}, "
                         "needs the network).")
    scoring.add_argument("--num_gallery", type=int, default=8, help="Images shown in gallery.html and gallery.png.")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true",
                     help="Publish the evaluated model with this report as its model card's model-index "
                     "(clip_lstm_captioner.publishing.publish).")
    hub.add_argument("--hub_model_id", default=None,
                     help="Hub repo for --push_to_hub (default: --model when that is a Hub id; required for a "
                     "local folder).")
    # fmt: on
    return parser.parse_args(argv)


def _output_dir(args) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    model = Path(args.model).expanduser()
    return (
        model.parent / f"eval_{args.split}"
        if model.is_dir()
        else Path("outputs/eval") / args.model.split("/")[-1]
    )


def _hub_repo_id(args) -> str | None:
    """The repo --push_to_hub publishes to, checked before any long work."""
    if not args.push_to_hub:
        return None
    if args.hub_model_id:
        return args.hub_model_id
    if not Path(args.model).expanduser().is_dir() and is_hub_id(args.model):
        return args.model
    raise UsageError(
        "--push_to_hub with a local --model needs --hub_model_id (e.g. your-name/clip-lstm-flickr8k)"
    )


def _check_args(args) -> None:
    for name in ("max_images", "num_beams", "max_new_tokens", "batch_size", "embed_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be >= 1, got {value}")
    if args.num_gallery < 0:
        raise UsageError(f"--num_gallery must be >= 0, got {args.num_gallery}")


def push(model_source: str, model, processor, repo_id: str, report: dict) -> None:
    """Publish the evaluated model with `report` (its metrics become the card's model-index)."""
    from clip_lstm_captioner import publishing  # only --push_to_hub needs it (and its yaml dependency)

    source = model_source if Path(model_source).expanduser().is_dir() else (model, processor)
    try:
        commit = publishing.publish(source, repo_id, report=report)
    except Exception as error:  # offline, no token, HTTP errors: the report is written already
        raise UsageError(f"--push_to_hub {repo_id}: {first_line(error)} (the report is written)") from None
    print(f"published {repo_id}: {commit}")


def _shapes_scenes(args) -> dict | None:
    """The drawn scenes of a shapes set (by name or by folder), for `score_shapes_captions`; else None."""
    root = shapes_root(args.data_cache_dir) if args.dataset == "shapes" else Path(args.dataset)
    return read_scenes(root) if (root / "scenes.jsonl").is_file() else None


def run(args: argparse.Namespace) -> dict | None:
    """The CLI's work, after argument parsing: load, cache, evaluate, print, publish.

    Under `accelerate launch` every process caches and captions its share; the main process
    scores, writes, prints and publishes (and returns the report; the others return None).
    """
    _check_args(args)
    processes = process_state()  # one process unless started by `accelerate launch`
    repo_id = _hub_repo_id(args)
    model, processor = load_captioner(args.model)
    # BLIP fails in seconds, before the long work; without it our model is still evaluated.
    blip, blip_unavailable = load_blip_or_reason(args.blip_model) if args.compare_blip else (None, None)
    with processes.main_process_first():  # the shapes set is generated once
        splits = data.dataset_from_args(args)
    split, split_name = select_split(splits, args.split)
    if args.max_images:
        split = split.select(range(min(args.max_images, split.num_rows)))
    check_references(split, split_name)
    device = default_device(args.device) if processes.num_processes == 1 else processes.device
    model.to(device)
    if blip is not None:
        blip[0].to(device)
    if not args.no_cache:
        split = cache_image_embeds(
            split,
            model,
            processor.image_processor,
            cache_dir=args.data_cache_dir,
            batch_size=args.embed_batch_size,
            num_workers=args.num_workers,
            on_bad_image=args.on_bad_image,
            accelerator=processes,
        )
    train = splits.get("train")
    report = evaluate_captioner(
        model,
        processor,
        split,
        output_dir=_output_dir(args),
        dataset_name=args.dataset,
        split_name=split_name,
        model_name=args.model,
        train_captions=train["captions"] if train is not None else None,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        blip=blip,
        tokenize=args.tokenize,
        meteor=not args.no_meteor,
        num_gallery=args.num_gallery,
        shapes_scenes=_shapes_scenes(args),
        num_workers=default_num_workers(args.num_workers),
        on_bad_image=args.on_bad_image,
        blip_unavailable=blip_unavailable,
        processes=processes,
    )
    if report is None:
        return None  # not the main process
    print(render_markdown(report))
    print(
        f"written to {_output_dir(args)}: report.json, report.md, captions.jsonl, gallery.html, gallery.png"
    )
    if repo_id:
        push(args.model, model, processor, repo_id, report)
    return report


def main(argv=None) -> dict:
    """Evaluate from the command line (`run_cli` turns a user error into one line and exit status 2).

    report = main(["--model", "outputs/demo/model", "--dataset", "shapes", "--no_meteor"])
    """
    return run_cli(run, "evaluate_model.py", parse_args(argv))


if __name__ == "__main__":
    main()
