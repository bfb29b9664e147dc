"""Caption folders, files or globs of images into JSONL or CSV rows: image path, caption, score.

    python caption_images.py photos/ "more/*.jpg" --model outputs/flickr8k --output captions.jsonl
    python caption_images.py photos/ --model me/clip-lstm-flickr8k --output captions.csv --num_beams 3

Folders are searched recursively for common image extensions. Images are decoded in DataLoader
workers and captioned in batches; files that cannot be read are reported on stderr, one line each,
and skipped. The output file appears only when complete (written to a temporary file, then renamed).
`score` is the caption's `sequences_scores`: its summed log-probability / length ** length_penalty.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from clip_lstm_captioner.cli import (
    default_device,
    default_num_workers,
    load_captioner,
    non_negative_int,
    positive_int,
    run_cli,
)
from clip_lstm_captioner.distributed import gather_in_order, process_state, share_of
from clip_lstm_captioner.errors import UsageError
from clip_lstm_captioner.files import atomic_write
from clip_lstm_captioner.images import pixel_batches

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
FIELDS = ("image", "caption", "score")


# ----------------------------------------------------------------------------- inputs


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def find_images(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Files named as given, image files under folders (recursively) and glob matches, without repeats;
    and the patterns that matched no image.

    Example:
        find_images(["photos/", "extra/*.png", "typo/"])
        # -> ([PosixPath('photos/a.jpg'), PosixPath('photos/trip/b.png'), PosixPath('extra/c.png')], ['typo/'])
    """
    found: dict[Path, None] = {}  # an ordered set
    unmatched = []
    for pattern in patterns:
        matches = (
            [Path(pattern)]
            if Path(pattern).exists()
            else [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        )
        images = [path for match in matches for path in (_images_in(match) if match.is_dir() else [match])]
        if not images:
            unmatched.append(pattern)
        found.update(dict.fromkeys(images))
    return list(found), unmatched


# ----------------------------------------------------------------------------- model and output


class CaptionRows:
    """Rows as JSONL or CSV into an open (atomically written) text file."""

    def __init__(self, file, file_format: str):
        self.file = file
        self.csv = csv.DictWriter(file, fieldnames=FIELDS) if file_format == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv:
            self.csv.writerow(row)
        else:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- arguments and main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="PATH_OR_GLOB",
        help="image files, folders (searched recursively) or globs (quote them)",
    )
    parser.add_argument(
        "--model", required=True, help="a folder saved with save_pretrained, or a Hub model id"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="where to write the captions: a .jsonl or .csv file"
    )
    parser.add_argument(
        "--format",
        choices=sorted(set(FORMATS.values())),
        help="output format (default: from --output's extension)",
    )
    parser.add_argument(
        "--batch_size", type=positive_int, default=32, help="images captioned together (default: 32)"
    )
    parser.add_argument(
        "--num_beams", type=positive_int, help="beam width (default: the model's generation_config)"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=positive_int,
        help="longest caption in tokens (default: the model's generation_config)",
    )
    parser.add_argument(
        "--device", default="auto", help="torch device, e.g. cpu or cuda:0 (default: cuda if available)"
    )
    parser.add_argument(
        "--num_workers",
        type=non_negative_int,
        default=default_num_workers(),
        help="image-decoding worker processes; 0 decodes in the main process (default: one per CPU core, up to 8)",
    )
    return parser.parse_args(argv)


def _check_arguments(args: argparse.Namespace):
    file_format = args.format or FORMATS.get(args.output.suffix.lower())
    if file_format is None:
        raise UsageError(f"--output {args.output}: use a .jsonl or .csv name, or pass --format")
    if args.output.is_dir():
        raise UsageError(f"--output {args.output} is a folder; name a file")
    return file_format, default_device(args.device)


def caption_batch(model, processor, pixel_values: torch.Tensor, settings: dict) -> list[tuple[str, float]]:
    """(B, 3, H, W) pixels -> B (caption, score) pairs.

    Example:
        caption_batch(model, processor, processor(images=["dog.jpg"])["pixel_values"], {"num_beams": 3})
        # -> [('a dog runs on the grass', -0.61)]
    """
    output = model.generate(
        pixel_values=pixel_values, return_dict_in_generate=True, output_scores=True, **settings
    )
    return list(zip(processor.batch_decode(output.sequences), output.sequences_scores.tolist(), strict=True))


def caption_all(
    args: argparse.Namespace, paths: list[Path], model, processor, rows: CaptionRows
) -> tuple[int, int]:
    """Caption `paths` in batches into `rows`, reporting unreadable files; returns (captioned, skipped)."""
    settings = {
        key: getattr(args, key) for key in ("num_beams", "max_new_tokens") if getattr(args, key) is not None
    }
    sources = [{"path": str(path)} for path in paths]
    skipped = []
    captioned = 0

    def report_skip(message: str) -> None:
        skipped.append(message)
        tqdm.write(f"skipped {message}", file=sys.stderr)  # above the bar, not through it

    batches = pixel_batches(
        sources,
        processor.image_processor,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        on_bad_image="skip",
        on_skip=report_skip,
    )
    with tqdm(total=len(paths), unit="img", desc="captioning") as progress:
        for pixel_values, rows_done in batches:
            results = caption_batch(model, processor, pixel_values.to(model.device), settings)
            for row, (caption, score) in zip(rows_done, results, strict=True):
                rows.write({"image": sources[row]["path"], "caption": caption, "score": score})
            captioned += len(rows_done)
            progress.n = captioned + len(skipped)
            progress.refresh()
    return captioned, len(skipped)


def caption_across_processes(args, paths: list[Path], model, processor, file_format: str, processes):
    """Under `accelerate launch`: each process captions whole batches of its share of `paths`, and
    the main process writes everyone's rows, in input order, into the one output file.
    Returns (captioned, skipped) over all processes."""
    share = [paths[i] for i in share_of(len(paths), processes, block=args.batch_size)]
    rows = []
    counts = caption_all(args, share, model, processor, SimpleNamespace(write=rows.append))
    rows, counts = gather_in_order(rows, processes), gather_in_order([counts], processes)
    if processes.is_main_process:
        with atomic_write(args.output, newline="", encoding="utf-8") as file:
            writer = CaptionRows(file, file_format)
            for row in rows:
                writer.write(row)
    return sum(captioned for captioned, _ in counts), sum(skipped for _, skipped in counts)


def run(args: argparse.Namespace) -> int:
    """The work after parsing: find the images, load the model, caption into the output file.

    Under `accelerate launch` the processes share the images (`caption_across_processes`).
    """
    file_format, device = _check_arguments(args)
    paths, unmatched = find_images(args.inputs)
    if not paths:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UsageError(f"no image files found in {' '.join(args.inputs)} (looked for {extensions})")
    for pattern in unmatched:
        print(f"caption_images.py: warning: no image files in {pattern}", file=sys.stderr)
    processes = process_state()  # one process unless started by `accelerate launch`
    if processes.num_processes > 1:
        model, processor = load_captioner(args.model, processes.device)
        captioned, skipped = caption_across_processes(args, paths, model, processor, file_format, processes)
    else:
        model, processor = load_captioner(args.model, device)
        with atomic_write(args.output, newline="", encoding="utf-8") as file:
            captioned, skipped = caption_all(args, paths, model, processor, CaptionRows(file, file_format))
    if processes.is_main_process:
        print(
            f"captioned {captioned} image(s) into {args.output}; skipped {skipped} unreadable file(s)",
            file=sys.stderr,
        )
    return 0 if captioned else 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 1 nothing readable); bad arguments exit 2.

    main(["photos/", "--model", "outputs/demo/model", "--output", "captions.csv"])
    """
    return run_cli(run, "caption_images.py", parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
