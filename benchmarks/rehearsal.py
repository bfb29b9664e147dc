"""The whole pipeline at Flickr8k's real size on synthetic data: seconds and peak memory per stage, as JSON.

    python benchmarks/rehearsal.py --output rehearsal.json            # 8,091 images: for a GPU machine
    python benchmarks/rehearsal.py --num_images 300                   # a small rehearsal on a CPU
    python benchmarks/rehearsal.py --num_images 24 --tiny_tower       # seconds: checks the script runs

Writes `--num_images` (default 8,091) photo-like JPEGs of 500x375 in Flickr8k's Kaggle layout
(`Images/` + `captions.txt`, five synthetic captions per image), then runs the real training
script, `train_accelerate.main`, once: the dataset loaded and split by image (1,000 test images
at full size), the word-level tokenizer built from the training captions, a random full-size
ViT-B/32 tower (`--tiny_tower`: a 2-layer, 32-wide one), the CLIP embedding cache filled for
all three splits, one epoch, and the evaluation of the best model on the test split with beam 5
(METEOR aside unless `--meteor`). Each stage is timed by wrapping the function the script calls
for it; peak memory is the process's and its largest child's (the decoding workers) resident
set, plus CUDA's peak allocation on a GPU. The training runs in this one process; for several,
use `accelerate launch train_accelerate.py` with the same flags (the JSON lists them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import train_accelerate  # noqa: E402
from benchmarks.bench_cache import write_jpeg  # noqa: E402
from benchmarks.bench_eval import TINY_TOWER, synthetic_caption  # noqa: E402
from benchmarks.common import device_info, emit  # noqa: E402
from clip_lstm_captioner.distributed import workers_per_process  # noqa: E402
from clip_lstm_captioner.reports import package_versions  # noqa: E402

FLICKR8K_IMAGES = 8091
CAPTIONS_PER_IMAGE = 5
STAGES = ("write_jpegs", "load_dataset", "cache_embeddings", "train_epoch", "validation", "evaluate_test")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--num_images", type=int, default=FLICKR8K_IMAGES, help="JPEGs to write (default 8,091)."
    )
    parser.add_argument(
        "--tiny_tower", action="store_true", help="A tiny random CLIP tower instead of ViT-B/32."
    )
    parser.add_argument(
        "--batch_size", type=int, default=256, help="Training captions per batch (default 256)."
    )
    parser.add_argument(
        "--embed_batch_size", type=int, default=256, help="Images per CLIP batch (default 256)."
    )
    parser.add_argument(
        "--num_workers", type=int, default=None, help="Decoding workers (default: cores, up to 8)."
    )
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                        help="Training precision (default: the script's, i.e. no).")  # fmt: skip
    parser.add_argument(
        "--meteor", action="store_true", help="Include METEOR (a Java process) in the evaluation."
    )
    parser.add_argument(
        "--workdir", default=None, help="Keep the JPEGs, cache and run here (default: a temp folder)."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the images and captions.")
    parser.add_argument("--output", default=None, help="Also write the JSON to this file.")
    args = parser.parse_args(argv)
    if args.num_images < 3:
        raise SystemExit(
            f"rehearsal.py: error: --num_images must be >= 3 (one per split), got {args.num_images}"
        )
    return args


# ----------------------------------------------------------------------------- data


def write_flickr8k_layout(root: Path, num_images: int, seed: int, workers: int) -> Path:
    """Images/ of 500x375 photo-like JPEGs and captions.txt (header image,caption; five rows per image)."""
    images = root / "Images"
    images.mkdir(parents=True, exist_ok=True)
    todo = [(images, i) for i in range(num_images) if not (images / f"photo_{i:05d}.jpg").exists()]
    with ProcessPoolExecutor(max(workers, 1)) as pool:
        list(pool.map(write_jpeg, todo, chunksize=32))
    rng = np.random.default_rng(seed)
    rows = ["image,caption"] + [
        f"photo_{i:05d}.jpg,{synthetic_caption(rng)}"
        for i in range(num_images)
        for _ in range(CAPTIONS_PER_IMAGE)
    ]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root


def training_argv(args, folder: Path, work: Path) -> list[str]:
    """The flags of the one training run: real-size decoder, word-level tokenizer, one epoch, beam 5."""
    tower = TINY_TOWER if args.tiny_tower else {}  # {}: CLIPVisionConfig's defaults, ViT-B/32
    argv = [
        "--dataset", str(folder), "--data_cache_dir", str(work / "cache"), "--output_dir", str(work / "run"),
        "--vision_model", "random", "--vision_config", json.dumps(tower), "--tokenizer", "captions",
        "--num_epochs", "1", "--batch_size", str(args.batch_size), "--embed_batch_size", str(args.embed_batch_size),
        "--num_beams", "5", "--max_new_tokens", "30",
    ]  # fmt: skip
    if args.num_workers is not None:
        argv += ["--num_workers", str(args.num_workers)]
    if args.mixed_precision:
        argv += ["--mixed_precision", args.mixed_precision]
    return argv + ([] if args.meteor else ["--no_meteor"])


# ----------------------------------------------------------------------------- timing


class Stages:
    """Seconds per stage, from wrappers around the functions train_accelerate.py calls for each."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.first_step_at = None
        self.reports = []

    def time(self, stage: str, function):
        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                self.seconds[stage] += time.perf_counter() - start

        return timed

    def wrap_training_script(self) -> None:
        """Patch the script's own names: loading, caching, the epoch (first step to validation), evaluation."""
        module = train_accelerate
        module.dataset_from_args = self.time("load_dataset", module.dataset_from_args)
        module.cache_image_embeds = self.time("cache_embeddings", module.cache_image_embeds)
        step, validation, evaluate = module.training_step, module.validation_loss, module.evaluate_captioner

        def first_step(*args, **kwargs):
            if self.first_step_at is None:
                sync()
                self.first_step_at = time.perf_counter()
            return step(*args, **kwargs)

        def end_of_epoch(*args, **kwargs):
            sync()
            self.seconds["train_epoch"] += time.perf_counter() - self.first_step_at
            return self.time("validation", validation)(*args, **kwargs)

        def evaluation(*args, **kwargs):
            report = self.time("evaluate_test", evaluate)(*args, **kwargs)
            self.reports.append(report)
            return report

        module.training_step, module.validation_loss, module.evaluate_captioner = (
            first_step,
            end_of_epoch,
            evaluation,
        )


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict:
    """Peak resident sets in MiB (Linux reports ru_maxrss in KiB), and CUDA's peak allocation."""
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    peak = {
        "process_rss_mib": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        "largest_child_rss_mib": mib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss),
    }
    if torch.cuda.is_available():
        peak["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device_facts = device_info(device)  # before the run: the load average says how busy the machine was
    stages = Stages()
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as temporary:
        work = Path(args.workdir or temporary)
        start = time.perf_counter()
        folder = write_flickr8k_layout(
            work / "flickr8k", args.num_images, args.seed, workers_per_process(None, 1)
        )
        stages.seconds["write_jpegs"] = time.perf_counter() - start
        argv = training_argv(args, folder, work)
        stages.wrap_training_script()
        print(f"[rehearsal] train_accelerate.py {' '.join(argv)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
            state = train_accelerate.main(argv)
        total = time.perf_counter() - start
    report = stages.reports[0] if stages.reports else {}
    ours = report.get("models", {}).get("ours", {})
    results = {
        "benchmark": "rehearsal: Flickr8k-size pipeline on synthetic data",
        "device": device_facts,
        "settings": {
            "num_images": args.num_images,
            "captions_per_image": CAPTIONS_PER_IMAGE,
            "vision_tower": "tiny random (--tiny_tower)"
            if args.tiny_tower
            else "random ViT-B/32 (CLIPVisionConfig())",
            "training_flags": argv,
            "meteor": args.meteor,
        },  # fmt: skip
        "stages_seconds": {name: round(seconds, 3) for name, seconds in stages.seconds.items()},
        "training_script_seconds": round(total, 3),
        "cache_images_per_s": round(args.num_images / stages.seconds["cache_embeddings"], 1),
        "epochs_run": len(state.get("history", [])),
        "evaluation": {
            "num_images": report.get("num_images"),
            "generation": report.get("generation"),
            "captioning_seconds": ours.get("seconds"),
            "metric_seconds": ours.get("metric_seconds"),
            "bleu_4": ours.get("bleu_4"),
        },
        "peak_memory": peak_memory(),
        "torch": torch.__version__,
        "versions": package_versions(),
    }
    return emit(results, args.output)


if __name__ == "__main__":
    main()
