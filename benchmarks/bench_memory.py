"""Peak resident memory of training and evaluation reading the embedding cache, vs the number of images.

    python benchmarks/bench_memory.py                          # 2k, 8k and 32k images of 768-d features
    python benchmarks/bench_memory.py --sizes 500 2000 --copy  # also the old way: the column copied out

For each size, synthetic rows (image paths, five captions, a random 768-d feature) are written
straight as an embedding-cache file (no CLIP, no JPEGs). A fresh process then does what training
and evaluation do with it: `image_embeds_of`, `fit_image_statistics`, `CaptionPairs.from_split`,
one epoch of training batches (no forward pass: the point is reading the features), and every
evaluation batch. It reports the peak of anonymous memory (the process's own allocations, sampled
every 5 ms) and the peak resident set (which also counts pages of the memory-mapped cache file
that were read: the system drops and rereads those under pressure), and each one's slope in bytes
per image between consecutive sizes. Prints JSON.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_info, emit  # noqa: E402
from clip_lstm_captioner import embedding_cache  # noqa: E402
from configuration_clip_lstm import ClipLstmConfig  # noqa: E402
from evaluate_model import _embeds_batches  # noqa: E402
from modeling_clip_lstm import ClipLstmForImageCaptioning  # noqa: E402
from processing import build_caption_tokenizer  # noqa: E402
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
    parser.add_argument("--copy", action="store_true", help="Also measure the column copied into a tensor.")
    parser.add_argument("--workdir", default=None, help="Where the cache files go (default: a temp folder).")
    parser.add_argument("--output", default=None, help="Also write the JSON to this file.")
    parser.add_argument("--child", nargs=2, metavar=("CACHE_FILE", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_cache(folder: Path, num_images: int, dim: int) -> Path:
    """A cache file of `num_images` synthetic rows, written the way `cache_image_embeds` writes one."""
    rng = np.random.default_rng(num_images)
    rows = {
        "image": [{"path": f"/nowhere/{i}.jpg", "bytes": None} for i in range(num_images)],
        "image_id": [f"{i}.jpg" for i in range(num_images)],
        "captions": [[" ".join(rng.choice(WORDS, 11)) for _ in range(5)] for _ in range(num_images)],
    }
    features = datasets.Features(
        image=datasets.Image(decode=False),
        image_id=datasets.Value("string"),
        captions=[datasets.Value("string")],
    )
    split = datasets.Dataset.from_dict(rows, features=features)
    image_embeds = rng.standard_normal((num_images, dim), dtype=np.float32)
    key = f"bench-memory-{num_images}-{dim}"
    embedding_cache._write_cache(split, image_embeds, folder, key, dim)
    return folder / f"{key}.arrow"


def small_model(tokenizer, dim: int) -> ClipLstmForImageCaptioning:
    """A one-layer random tower whose pooled feature is `dim` wide, and a small decoder."""
    vision = dict(hidden_size=dim, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=16)  # fmt: skip
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return ClipLstmForImageCaptioning(ClipLstmConfig(vision_config=vision, vocab_size=len(tokenizer), embed_dim=32,
                                                     hidden_size=32, **ids))  # fmt: skip


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def child(cache_file: str, mode: str) -> dict:
    """Train-and-evaluate reads of one cache file; the memory figures in bytes."""
    peak = {"anon": 0}
    running = True

    def sample():
        while running:
            peak["anon"] = max(peak["anon"], memory_kib("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    split = datasets.Dataset.from_file(cache_file)
    if mode == "copy":  # the old image_embeds_of: the column materialised as a tensor
        embeds = split.with_format("torch", columns=["image_embeds"])[:]["image_embeds"].float()
        embedding_cache.image_embeds_of = lambda _: embeds
    start_anon = memory_kib("RssAnon")
    tokenizer = build_caption_tokenizer([c for caps in split["captions"][:2000] for c in caps], 1, 16)
    model = small_model(tokenizer, split.features["image_embeds"].length)
    model.fit_image_statistics(embedding_cache.image_embeds_of(split))
    pairs = CaptionPairs.from_split(split, tokenizer, 16)
    for batch in caption_loader(pairs, 512, shuffle=True):
        batch["image_embeds"].sum()
    for inputs, _ in _embeds_batches(split, 64):
        inputs["image_embeds"].sum()
    running = False
    sampler.join()
    return {
        "peak_anon_bytes": peak["anon"] * 1024,
        "anon_at_start_bytes": start_anon * 1024,
        "peak_rss_bytes": memory_kib("VmHWM") * 1024,
        "captions": len(pairs),
    }


def measure(cache_file: Path, mode: str) -> dict:
    command = [sys.executable, __file__, "--child", str(cache_file), mode]
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
        print(json.dumps(child(*args.child)))
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
            rows.append({"num_images": size, **measure(write_cache(workdir, size, args.dim), mode)})
        results[mode] = {"runs": rows, "bytes_per_image": slopes(rows)}
    return emit(results, args.output)


if __name__ == "__main__":
    main()
