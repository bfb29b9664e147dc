"""Speed of a full caption evaluation (evaluate_model.evaluate_captioner) at Flickr8k test size, as JSON.

Writes `--num_images` (default 1,000) synthetic JPEGs the size of Flickr8k's photos (500x375,
some portrait), gives each 5 synthetic reference captions, and times, with beam 5:
  1. from cached CLIP embeddings: captioning, metrics, report files (re-evaluating a model);
  2. from the JPEG files (`--no_cache`): decoding, CLIP, captioning, metrics, report files;
  3. filling the embedding cache from the files (what the first cached run adds);
  4. METEOR apart: it starts a Java process, seconds whatever the corpus size.
Both runs score our model and the most-frequent-training-caption row, as `evaluate_model.py` does.

The model is a real-size random captioner: a ViT-B/32 tower (`ClipLstmConfig()` defaults), decoder
embed/hidden 512 and an 8,000-word vocabulary. Random weights never write EOS, so every caption
runs to `--max_new_tokens`: the worst case for search and metrics (the JSON gives the mean length).
`--tiny_tower` swaps in a 2-layer, 32-wide random tower on 32-pixel images, for smoke tests.

    python benchmarks/bench_eval.py --output bench_eval.json      # 1,000 images (minutes on a CPU)
    python benchmarks/bench_eval.py --quick                       # 50 images, no METEOR: under a minute
    python benchmarks/bench_eval.py --num_images 4 --tiny_tower   # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
import evaluate_model  # noqa: E402
from benchmarks.common import device_info, emit  # noqa: E402
from clip_lstm_captioner import data  # noqa: E402
from clip_lstm_captioner.cli import default_device, default_num_workers  # noqa: E402
from clip_lstm_captioner.embedding_cache import cache_image_embeds  # noqa: E402
from clip_lstm_captioner.reports import package_versions  # noqa: E402
from configuration_clip_lstm import ClipLstmConfig  # noqa: E402
from modeling_clip_lstm import ClipLstmForImageCaptioning  # noqa: E402
from processing import ClipLstmProcessor, build_caption_tokenizer, image_processor_for  # noqa: E402

VOCAB_WORDS = 7996  # + <pad>, <bos>, <eos>, <unk> = an 8,000-token vocabulary
REFERENCES_PER_IMAGE = 5
FLICKR8K_SIZES = ((500, 375), (375, 500))  # most Flickr8k photos are 500 px on the long side
TARGET_GPUS = ("H100", "H200")
TARGET_IMAGES = 1000
ORIGINAL_PROJECT_S = 1200  # "BLEU evaluation up to 20 minutes" (DESIGN.md)
TARGETS_S = {"cached": 10.0, "files": 30.0}
# --tiny_tower: a random CLIP tower small enough for a test (the test suite's tiny tower).
TINY_TOWER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
    projection_dim=16,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=TARGET_IMAGES, help="test images (default 1000)")
    parser.add_argument("--num_beams", type=int, default=5, help="beam width (default 5)")
    parser.add_argument("--max_new_tokens", type=int, default=30, help="caption length limit (default 30)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per generate() call (default 64)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="image-decoding workers (default: up to 8)"
    )
    parser.add_argument(
        "--no_meteor", action="store_true", help="skip the METEOR timing (a Java start per row)"
    )
    parser.add_argument("--quick", action="store_true", help="fast run: 50 images and no METEOR")
    parser.add_argument(
        "--tiny_tower", action="store_true",
        help="a tiny random CLIP tower (2 layers, 32 wide, 32-pixel images) instead of ViT-B/32: a smoke test",
    )  # fmt: skip
    parser.add_argument(
        "--work_dir", default=None, help="keep the JPEGs, cache and reports here (default: a temp folder)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the images, captions and weights")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.no_meteor = 50, True
    for name in ("num_images", "num_beams", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.device = default_device(args.device)
    args.num_workers = default_num_workers(args.num_workers)
    return args


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON."""
    print(f"[bench_eval] {message}", file=sys.stderr, flush=True)


def timed(fn):
    """(seconds, fn()) with CUDA synchronised on both sides."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


# ----------------------------------------------------------------------------- synthetic data


def write_jpeg(path: Path, rng: np.random.Generator) -> None:
    """A photo-like JPEG: smooth random colour fields plus grain, about Flickr8k's file size."""
    width, height = FLICKR8K_SIZES[int(rng.random() < 0.25)]
    coarse = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0.0, 16.0, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def synthetic_caption(rng: np.random.Generator) -> str:
    """8-15 words drawn Zipf-like from the vocabulary, as caption words are."""
    ranks = np.minimum(rng.zipf(1.3, size=int(rng.integers(8, 16))), VOCAB_WORDS) - 1
    return " ".join(f"w{rank}" for rank in ranks)


def make_split(folder: Path, num_images: int, seed: int):
    """The test split (JPEGs on disk, 5 references each) and training captions for the baseline row."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = [folder / "images" / f"{index:05d}.jpg" for index in range(num_images)]
    for path in paths:
        if not path.exists():  # --work_dir reuses the images of an earlier run
            write_jpeg(path, rng)
    references = [[synthetic_caption(rng) for _ in range(REFERENCES_PER_IMAGE)] for _ in paths]
    rows = {"image": [str(p) for p in paths], "image_id": [p.name for p in paths], "captions": references}
    split = datasets.Dataset.from_dict(rows, features=data.CAPTION_FEATURES)
    train_captions = [
        [synthetic_caption(rng) for _ in range(REFERENCES_PER_IMAGE)] for _ in range(num_images)
    ]
    return split, train_captions


def build_captioner(args, device: torch.device):
    """Random real-size model (ViT-B/32 tower or `--tiny_tower`, LSTM 512, 8k words) and its processor."""
    vocabulary = [f"w{rank}" for rank in range(VOCAB_WORDS)]
    lines = [" ".join(vocabulary[start : start + 50]) for start in range(0, VOCAB_WORDS, 50)]
    tokenizer = build_caption_tokenizer(lines, min_frequency=1)
    config = ClipLstmConfig(
        vision_config=TINY_TOWER if args.tiny_tower else None,  # None: the ViT-B/32 default
        embed_dim=512, hidden_size=512, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = ClipLstmForImageCaptioning(config).eval().to(device)
    model.generation_config.update(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    return model, ClipLstmProcessor(image_processor_for(config.vision_config), tokenizer)


# ----------------------------------------------------------------------------- the runs


def run_case(model, processor, split, train_captions, folder: Path, args, meteor: bool) -> dict:
    """One evaluate_captioner call; its total, the share of each part, METEOR apart."""
    seconds, report = timed(
        lambda: evaluate_model.evaluate_captioner(
            model, processor, split, output_dir=folder, dataset_name="synthetic", train_captions=train_captions,
            batch_size=args.batch_size, meteor=meteor, num_workers=args.num_workers,
        )
    )  # fmt: skip
    rows = report["models"].values()
    meteor_seconds = sum(row["meteor_seconds"] or 0.0 for row in rows)
    ours = report["models"]["ours"]
    return {
        "seconds_without_meteor": seconds - meteor_seconds,
        "images_per_s_without_meteor": split.num_rows / (seconds - meteor_seconds),
        "captioning_seconds": ours["seconds"],
        "metric_seconds": sum(row["metric_seconds"] for row in rows),
        "meteor_seconds": meteor_seconds if meteor else None,
        "meteor_per_row_seconds": {key: row["meteor_seconds"] for key, row in report["models"].items()},
        "meteor_unavailable": ours.get("meteor_unavailable"),
        "mean_caption_words": ours["mean_caption_words"],
        "bleu_4": ours["bleu_4"],
    }


def vision_tower_name(args) -> str:
    if args.tiny_tower:
        return "tiny random CLIP tower (--tiny_tower: 2 layers, hidden 32, 32x32 images, patch 8)"
    return "random CLIP ViT-B/32 (ClipLstmConfig() defaults)"


def evaluate_targets(results: dict) -> list[dict]:
    """The speed targets; `met` is judged only on an H100/H200 with 1,000 images and beam 5, else null."""
    device, settings = results["device"], results["settings"]
    judged = (
        device["type"] == "cuda" and any(gpu in device["name"] for gpu in TARGET_GPUS)
        and settings["num_images"] == TARGET_IMAGES and settings["num_beams"] == 5
    )  # fmt: skip
    return [
        {
            "target": f"on an H100/H200, {TARGET_IMAGES:,} images, beam 5, from {case}, METEOR aside: under {limit:g} s "
            f"(the original project: up to {ORIGINAL_PROJECT_S // 60} minutes)",
            "measured_s": results[case]["seconds_without_meteor"],
            "met": results[case]["seconds_without_meteor"] < limit if judged else None,
        }
        for case, limit in (("cached", TARGETS_S["cached"]), ("files", TARGETS_S["files"]))
    ]


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = args.device
    device_facts = device_info(device)  # before the runs: the load average says how busy the machine was
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as temporary:
        work = Path(args.work_dir or temporary)
        log(f"writing {args.num_images} JPEGs and references in {work}")
        split, train_captions = make_split(work, args.num_images, args.seed)
        model, processor = build_captioner(args, device)
        log("filling the CLIP embedding cache from the files")
        cache_seconds, cached = timed(
            lambda: cache_image_embeds(
                split, model, processor.image_processor, cache_dir=work / f"cache-{time.time_ns()}",
                num_workers=args.num_workers,
            )
        )  # fmt: skip
        log("evaluating from cached embeddings")
        from_cache = run_case(
            model, processor, cached, train_captions, work / "eval_cached", args, not args.no_meteor
        )
        log("evaluating from the JPEG files")
        from_files = run_case(model, processor, split, train_captions, work / "eval_files", args, False)
        jpeg_kb = np.mean([os.path.getsize(p) for p in (work / "images").glob("*.jpg")]) / 1024
    results = {
        "device": device_facts,
        "settings": {
            "num_images": args.num_images, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "num_workers": args.num_workers, "references_per_image": REFERENCES_PER_IMAGE,
            "vocab_size": model.config.vocab_size, "vision_tower": vision_tower_name(args),
            "decoder": "LSTM, 1 layer, embed 512, hidden 512", "jpeg_mean_kb": round(float(jpeg_kb), 1),
            "note": "random weights never write EOS: every caption runs to max_new_tokens (worst case)",
        },
        "cached": from_cache,
        "files": from_files,
        "cache_fill_seconds": cache_seconds,
        "first_cached_run_seconds_without_meteor": cache_seconds + from_cache["seconds_without_meteor"],
        "versions": package_versions(),
    }  # fmt: skip
    results["targets"] = evaluate_targets(results)
    return emit(results, args.output)


if __name__ == "__main__":
    main()
