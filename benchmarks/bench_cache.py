"""Throughput of the CLIP embedding cache from JPEG files on disk; prints JSON.

    python benchmarks/bench_cache.py                         # 2,000 Flickr8k-like JPEGs, real-size ViT-B/32
    python benchmarks/bench_cache.py --num_images 200        # on a 2-core CPU
    python benchmarks/bench_cache.py --quick                 # smoke test: tiny tower, 40 images

Writes ~500x375 JPEGs like Flickr8k's (smooth colour fields with shapes and noise, so they
compress like photos rather than like noise), then times `data.cache_image_embeds` end to end
(decode + CLIP preprocessing in DataLoader workers, the frozen tower in bf16 on CUDA, the
datasets cache write) with a fresh cache, and, to show the bottleneck, the decoding pipeline
alone and the tower alone. A second call that reads the cache back is timed too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_info, emit  # noqa: E402
from clip_lstm_captioner.data import load_caption_dataset  # noqa: E402
from clip_lstm_captioner.embedding_cache import cache_image_embeds  # noqa: E402
from clip_lstm_captioner.images import ImageFiles  # noqa: E402
from configuration_clip_lstm import ClipLstmConfig  # noqa: E402
from modeling_clip_lstm import ClipLstmForImageCaptioning  # noqa: E402
from processing import image_processor_for  # noqa: E402

TARGET = "on an H100/H200: at least 2,000 images/s end to end (the original project: 174 images/s on an H200)"
QUICK_TOWER = dict(
    image_size=64,
    patch_size=16,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=32,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_images", type=int, default=2000, help="JPEG files to generate and embed.")
    parser.add_argument("--batch_size", type=int, default=256, help="Images per CLIP batch.")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="Decoding workers (default: all cores, at most 16)."
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where CLIP runs."
    )
    parser.add_argument(
        "--workdir", default=None, help="Where to write the JPEGs and cache (default: a temp folder)."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny tower and 40 images, for a smoke test.")
    parser.add_argument("--output", default=None, help="Also write the JSON to this file.")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images = min(args.num_images, 40)
    if args.num_workers is None:
        args.num_workers = min(16, os.cpu_count() or 1)
    return args


def photo_like(index: int) -> Image.Image:
    """A 500x375 image with smooth colour gradients, a few blurred shapes and mild noise."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:375, 0:500] / 500.0
    base = (
        rng.uniform(40, 220, 3)[None, None, :]
        + rng.uniform(-80, 80, 3)[None, None, :] * (x + y)[:, :, None] / 2
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        x0, y0 = rng.integers(0, 450), rng.integers(0, 330)
        box = (x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 150))
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noisy = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.int16) + rng.integers(
        -6, 7, (375, 500, 3)
    )
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_jpeg(job: tuple[Path, int]) -> None:
    folder, index = job
    photo_like(index).save(folder / f"photo_{index:05d}.jpg", quality=90)


def write_folder(root: Path, num_images: int, workers: int) -> Path:
    """A Kaggle-layout folder (Images/ + captions.txt) of Flickr8k-like JPEGs."""
    images = root / "Images"
    images.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_jpeg, [(images, i) for i in range(num_images)], chunksize=32))
    lines = ["image,caption"] + [
        f"photo_{i:05d}.jpg,a picture number {i % 5}" for i in range(num_images) for _ in range(5)
    ]
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    return root


def build_model(args) -> ClipLstmForImageCaptioning:
    vision = QUICK_TOWER if args.quick else None  # None: the ViT-B/32 default
    config = ClipLstmConfig(
        vision_config=vision, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    return ClipLstmForImageCaptioning(config).to(args.device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_decoding(split, image_processor, args) -> float:
    """Images/s of decode + CLIP preprocessing in the DataLoader workers alone (no model)."""
    import datasets

    sources = split.cast_column("image", datasets.Image(decode=False))["image"]
    loader = torch.utils.data.DataLoader(
        ImageFiles(sources, image_processor),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=lambda items: len(items),
    )
    start = time.perf_counter()
    count = sum(loader)
    return count / (time.perf_counter() - start)


@torch.no_grad()
def time_tower(model, args, image_size: int) -> float:
    """Images/s of the frozen tower alone on random pixels already on the device."""
    pixels = torch.randn(args.batch_size, 3, image_size, image_size, device=args.device)
    model.get_image_features(pixels)  # warm-up
    sync(args.device)
    repeats = 3 if args.device == "cpu" else 20
    start = time.perf_counter()
    for _ in range(repeats):
        model.get_image_features(pixels)
    sync(args.device)
    return repeats * args.batch_size / (time.perf_counter() - start)


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_cache_"))
    start = time.perf_counter()
    folder = write_folder(workdir / "photos", args.num_images, args.num_workers)
    write_seconds = time.perf_counter() - start
    splits = load_caption_dataset(folder, cache_dir=workdir / "cache")
    from datasets import concatenate_datasets

    everything = concatenate_datasets([splits[name] for name in ("train", "validation", "test")])
    model = build_model(args)
    image_processor = image_processor_for(model.config.vision_config)
    shutil.rmtree(workdir / "cache" / "embeddings", ignore_errors=True)

    start = time.perf_counter()
    cached = cache_image_embeds(
        everything,
        model,
        image_processor,
        cache_dir=workdir / "cache",
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    sync(args.device)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cache_image_embeds(
        everything,
        model,
        image_processor,
        cache_dir=workdir / "cache",
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    reread_seconds = time.perf_counter() - start

    report = {
        "benchmark": "clip_embedding_cache_from_jpeg_files",
        "device": device_info(torch.device(args.device)),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "workdir")},
        "tower": "tiny (quick)" if args.quick else "ViT-B/32 shape, random weights",
        "num_images": cached.num_rows,
        "jpeg_mean_kb": round(
            sum(p.stat().st_size for p in (folder / "Images").iterdir()) / args.num_images / 1024, 1
        ),
        "seconds_writing_jpegs": round(write_seconds, 2),
        "end_to_end_seconds": round(first_seconds, 2),
        "end_to_end_images_per_s": round(cached.num_rows / first_seconds, 1),
        "cache_reread_seconds": round(reread_seconds, 3),
        "decode_and_preprocess_images_per_s": round(time_decoding(everything, image_processor, args), 1),
        "tower_only_images_per_s": round(time_tower(model, args, model.config.vision_config.image_size), 1),
        "target": TARGET,
    }
    on_gpu = args.device.startswith("cuda") and not args.quick
    report["target_met"] = report["end_to_end_images_per_s"] >= 2000 if on_gpu else None
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return emit(report, args.output)


if __name__ == "__main__":
    main()
