"""Peak resident memory of reading the embedding cache (and of writing a patch-token one), vs the number of images.

    python benchmarks/bench_memory.py                          # 2k, 8k and 32k images of 768-d features
    python benchmarks/bench_memory.py --sizes 500 2000 --copy  # also the old way: the column copied out
    python benchmarks/bench_memory.py --sizes 2000 --patch_sizes 1000 2000 4000  # patch tokens

For each size, synthetic rows (image paths, five captions, a random 768-d feature) are written
straight as an embedding-cache file (no CLIP, no JPEGs). A fresh process then does what training
and evaluation do with it: `image_embeds_of`, `fit_image_statistics`, `CaptionPairs.from_split`,
one epoch of training batches (no forward pass: the point is reading the features), and every
evaluation batch. It reports the peak of anonymous memory (the process's own allocations, sampled
every 5 ms) and the peak resident set (which also counts pages of the memory-mapped cache file
that were read: the system drops and rereads those under pressure), and each one's slope in bytes
per image between consecutive sizes. Prints JSON.

Patch tokens (`--patch_sizes`; ViT-B/32's 50 x 768 per image, float16: 77 kB, 0.3 GB at 4,000
images) are also measured while being written: a fresh process runs `cache_image_embeds` on
synthetic rows (one tiny PNG each, decoded and preprocessed as usual) with a tower that returns
random tokens at once (no forward pass: the point is writing the features), then the reads above
run on the file it wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_info, emit  # noqa: E402
from clip_lstm_captioner import embedding_cache  # noqa: E402
from configuration_clip_lstm import ClipLstmConfig  # noqa: E402
from evaluate_model import _embeds_batches  # noqa: E402
from modeling_clip_lstm import ClipLstmForImageCaptioning  # noqa: E402
from processing import build_caption_tokenizer, image_processor_for  # noqa: E402
from train_accelerate import CaptionPairs, caption_loader  # noqa: E402

WORDS = [f"w{i}" for i in range(2000)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2000, 8000, 32000], help="Numbers of images."
    )
    parser.add_argument("--dim", type=int, default=768, help="Feature width (ViT-B/32 pooled: 768).")
    parser.add_argument(
        "--patch_sizes",
        type=int,
        nargs="*",
        default=[1000, 2000, 4000],
        help="Numbers of images for the patch-token cache, written then read (none: skip).",
    )
    parser.add_argument(
        "--patch_grid",
        type=int,
        default=7,
        help="Patches per side of the patch-token feature: 1 + grid^2 tokens (ViT-B/32: 7, 50 tokens).",
    )
    parser.add_argument("--copy", action="store_true", help="Also measure the column copied into a tensor.")
    parser.add_argument("--workdir", default=None, help="Where the cache files go (default: a temp folder).")
    parser.add_argument("--output", default=None, help="Also write the JSON to this file.")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # MODE and its arguments
    return parser.parse_args(argv)


def synthetic_rows(num_images: int, image: dict | None = None) -> datasets.Dataset:
    """`num_images` rows as a loaded split has them: an image (a path nowhere, or `image`), an id, five captions."""
    rng = np.random.default_rng(num_images)
    rows = {
        "image": [image or {"path": f"/nowhere/{i}.jpg", "bytes": None} for i in range(num_images)],
        "image_id": [f"{i}.jpg" for i in range(num_images)],
        "captions": [[" ".join(rng.choice(WORDS, 11)) for _ in range(5)] for _ in range(num_images)],
    }
    features = datasets.Features(
        image=datasets.Image(decode=False),
        image_id=datasets.Value("string"),
        captions=[datasets.Value("string")],
    )
    return datasets.Dataset.from_dict(rows, features=features)


def write_cache(folder: Path, num_images: int, dim: int) -> Path:
    """A cache file of `num_images` synthetic rows, written the way `cache_image_embeds` writes one."""
    image_embeds = np.random.default_rng(num_images).standard_normal((num_images, dim), dtype=np.float32)
    key = f"bench-memory-{num_images}-{dim}"
    embedding_cache._write_cache(
        synthetic_rows(num_images), image_embeds, folder, key, ((dim,), image_embeds.dtype)
    )
    return folder / f"{key}.arrow"


def write_patch_rows(folder: Path, num_images: int) -> Path:
    """Synthetic rows with one tiny PNG each, saved to disk, so that the writing process maps them."""
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(png, format="PNG")
    path = folder / f"rows-{num_images}"
    synthetic_rows(num_images, {"path": None, "bytes": png.getvalue()}).save_to_disk(str(path))
    return path


def feature_shape(feature) -> tuple[int, ...]:
    """(D,) or (P, D): the lengths of the nested fixed-size lists of the `image_embeds` feature."""
    shape = []
    while isinstance(feature, datasets.List):
        shape.append(feature.length)
        feature = feature.feature
    return tuple(shape)


def small_model(tokenizer, shape: tuple[int, ...]) -> ClipLstmForImageCaptioning:
    """A one-layer random tower whose feature has `shape`, (D,) pooled or (1 + grid^2, D) patches; a small decoder."""
    grid = round((shape[0] - 1) ** 0.5) if len(shape) == 2 else 2
    vision = dict(hidden_size=shape[-1], intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16 * grid, patch_size=16)  # fmt: skip
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = ClipLstmConfig(vision_config=vision, vocab_size=len(tokenizer), embed_dim=32, hidden_size=32,
                            image_feature="patches" if len(shape) == 2 else "pooled", **ids)  # fmt: skip
    assert config.image_feature_shape == shape, (config.image_feature_shape, shape)
    return ClipLstmForImageCaptioning(config)


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


@contextlib.contextmanager
def peak_memory():
    """Yields a dict that ends with the peak of anonymous memory (sampled every 5 ms) and the
    peak resident set (the kernel's high-water mark, file pages included), in bytes."""
    figures, running = {"peak_anon_bytes": 0}, [True]

    def sample():
        while running[0]:
            figures["peak_anon_bytes"] = max(figures["peak_anon_bytes"], memory_kib("RssAnon") * 1024)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield figures
    finally:
        running[0] = False
        sampler.join()
        figures["peak_rss_bytes"] = memory_kib("VmHWM") * 1024


def child_read(cache_file: str, mode: str) -> dict:
    """Train-and-evaluate reads of one cache file; the memory figures in bytes."""
    with peak_memory() as figures:
        split = datasets.Dataset.from_file(cache_file)
        if mode == "copy":  # the old image_embeds_of: the column materialised as a tensor
            embeds = split.with_format("torch", columns=["image_embeds"])[:]["image_embeds"].float()
            embedding_cache.image_embeds_of = lambda _: embeds
        start_anon = memory_kib("RssAnon")
        tokenizer = build_caption_tokenizer([c for caps in split["captions"][:2000] for c in caps], 1, 16)
        model = small_model(tokenizer, feature_shape(split.features["image_embeds"]))
        model.fit_image_statistics(embedding_cache.image_embeds_of(split))
        pairs = CaptionPairs.from_split(split, tokenizer, 16)
        for batch in caption_loader(pairs, 512, shuffle=True):
            batch["image_embeds"].sum()
        for inputs, _ in _embeds_batches(split, 64):
            inputs["image_embeds"].sum()
    return {**figures, "anon_at_start_bytes": start_anon * 1024, "captions": len(pairs)}


def child_write(rows_dir: str, grid: str, dim: str) -> dict:
    """`cache_image_embeds` of patch tokens for the saved rows, with a tower that returns random
    (B, 1 + grid^2, dim) tokens; the memory figures in bytes and the cache file written."""
    split = datasets.load_from_disk(rows_dir)
    model = small_model(build_caption_tokenizer(WORDS, 1, 16), (1 + int(grid) ** 2, int(dim)))
    generator = torch.Generator().manual_seed(0)
    model.get_image_features = lambda pixels: torch.randn(len(pixels), *model.config.image_feature_shape,
                                                          generator=generator)  # fmt: skip
    image_processor = image_processor_for(model.config.vision_config)  # 16 * grid pixels
    cache_dir = Path(rows_dir).with_name(Path(rows_dir).name + "-cache")
    with peak_memory() as figures:
        start_anon = memory_kib("RssAnon")
        cached = embedding_cache.cache_image_embeds(split, model, image_processor, cache_dir=cache_dir,
                                                    num_workers=0)  # fmt: skip
        assert embedding_cache.image_embeds_of(cached).shape == (
            split.num_rows,
            *model.config.image_feature_shape,
        )
    return {
        **figures,
        "anon_at_start_bytes": start_anon * 1024,
        "cache_file": cached.cache_files[0]["filename"],
    }


def measure(*child_args) -> dict:
    command = [sys.executable, __file__, "--child", *map(str, child_args)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def slopes(rows: list[dict]) -> dict:
    """Bytes per added image between consecutive sizes (the last pair is the large-size slope)."""
    return {
        f"{low['num_images']}_to_{high['num_images']}": {
            name: (high[name] - low[name]) / (high["num_images"] - low["num_images"])
            for name in ("peak_anon_bytes", "peak_rss_bytes")
        }
        for low, high in zip(rows, rows[1:], strict=False)
        if high["num_images"] > low["num_images"]
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        mode, *child_args = args.child
        print(json.dumps(child_write(*child_args) if mode == "write" else child_read(*child_args, mode)))
        return {}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_memory_"))
    modes = ["mmap", "copy"] if args.copy else ["mmap"]
    results = {
        "device": device_info(torch.device("cpu")),
        "settings": vars(args),
        "feature_bytes": 4 * args.dim,
    }
    for mode in modes:
        rows = []
        for size in sorted(args.sizes):
            print(f"[bench_memory] {mode}: {size} images", file=sys.stderr, flush=True)
            rows.append({"num_images": size, **measure(mode, write_cache(workdir, size, args.dim))})
        results[mode] = {"runs": rows, "bytes_per_image": slopes(rows)}
    if args.patch_sizes:
        results["patches"] = measure_patches(workdir, sorted(args.patch_sizes), args.patch_grid, args.dim)
    return emit(results, args.output)


def measure_patches(workdir: Path, sizes: list[int], grid: int, dim: int) -> dict:
    """Writing then reading a patch-token cache of each size (each in a fresh process)."""
    writes, reads = [], []
    for size in sizes:
        print(f"[bench_memory] patches: {size} images", file=sys.stderr, flush=True)
        written = measure("write", write_patch_rows(workdir, size), grid, dim)
        writes.append({"num_images": size, **written})
        reads.append({"num_images": size, **measure("mmap", written["cache_file"])})
    return {
        "feature_shape": [1 + grid**2, dim],
        "feature_bytes": 2 * (1 + grid**2) * dim,  # float16
        "write": {"runs": writes, "bytes_per_image": slopes(writes)},
        "read": {"runs": reads, "bytes_per_image": slopes(reads)},
    }


if __name__ == "__main__":
    main()
