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
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import evaluate_model
from data import ImageFiles, collate_pixels
from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import ClipLstmProcessor

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
FIELDS = ("image", "caption", "score")


class UsageError(Exception):
    """A bad argument or input: reported in one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------- inputs


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def find_images(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Files named as given, image files under folders (recursively) and glob matches, without repeats;
    and the patterns that matched no image.

    Example:
        >>> find_images(["photos/", "extra/*.png", "typo/"])
        ([PosixPath('photos/a.jpg'), PosixPath('photos/trip/b.png'), PosixPath('extra/c.png')], ['typo/'])
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


def load_captioner(name: str, device: torch.device) -> tuple[ClipLstmForImageCaptioning, ClipLstmProcessor]:
    """Model and processor from a folder or Hub id (evaluate_model's loader), errors as `UsageError`.

    Example:
        >>> model, processor = load_captioner("outputs/demo/model", torch.device("cpu"))
    """
    try:
        model, processor = evaluate_model.load_captioner(name)
    except evaluate_model.EvaluationError as error:
        raise UsageError(str(error)) from None
    return model.to(device), processor


class AtomicRows:
    """Write rows as JSONL or CSV to a temporary file beside `output`, renamed onto it on success."""

    def __init__(self, output: Path, file_format: str):
        output.parent.mkdir(parents=True, exist_ok=True)
        handle, self.temporary = tempfile.mkstemp(
            prefix=f".{output.name}.", suffix=".partial", dir=output.parent
        )
        self.file = os.fdopen(handle, "w", newline="", encoding="utf-8")
        self.output, self.file_format = output, file_format
        self.csv = csv.DictWriter(self.file, fieldnames=FIELDS) if file_format == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv:
            self.csv.writerow(row)
        else:
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")

    def __enter__(self) -> AtomicRows:
        return self

    def __exit__(self, error_type, *_) -> None:
        self.file.close()
        if error_type is None:
            os.replace(self.temporary, self.output)  # readers never see a half-written file
        else:
            os.unlink(self.temporary)


# ----------------------------------------------------------------------------- arguments and main


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
        "--batch_size", type=_positive_int, default=32, help="images captioned together (default: 32)"
    )
    parser.add_argument(
        "--num_beams", type=_positive_int, help="beam width (default: the model's generation_config)"
    )
    parser.add_argument(
        "--max_new_tokens",
        type=_positive_int,
        help="longest caption in tokens (default: the model's generation_config)",
    )
    parser.add_argument(
        "--device", default="auto", help="torch device, e.g. cpu or cuda:0 (default: cuda if available)"
    )
    parser.add_argument(
        "--num_workers",
        type=_non_negative_int,
        default=min(4, max(0, (os.cpu_count() or 1) - 1)),
        help="image-decoding worker processes; 0 decodes in the main process (default: min(4, CPUs - 1))",
    )
    return parser.parse_args(argv)


def _check_arguments(args: argparse.Namespace) -> tuple[str, torch.device]:
    file_format = args.format or FORMATS.get(args.output.suffix.lower())
    if file_format is None:
        raise UsageError(f"--output {args.output}: use a .jsonl or .csv name, or pass --format")
    if args.output.is_dir():
        raise UsageError(f"--output {args.output} is a folder; name a file")
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a torch device (try cpu or cuda)") from None
    return file_format, device


def caption_batch(model, processor, pixel_values: torch.Tensor, settings: dict) -> list[tuple[str, float]]:
    """(B, 3, H, W) pixels -> B (caption, score) pairs.

    Example:
        >>> caption_batch(model, processor, processor(images=["dog.jpg"])["pixel_values"], {"num_beams": 3})
        [('a dog runs on the grass', -0.61)]
    """
    output = model.generate(
        pixel_values=pixel_values, return_dict_in_generate=True, output_scores=True, **settings
    )
    return list(zip(processor.batch_decode(output.sequences), output.sequences_scores.tolist(), strict=True))


def caption_all(
    args: argparse.Namespace, paths: list[Path], model, processor, rows: AtomicRows
) -> tuple[int, int]:
    """Caption `paths` in batches into `rows`, reporting unreadable files; returns (captioned, skipped)."""
    settings = {
        key: getattr(args, key) for key in ("num_beams", "max_new_tokens") if getattr(args, key) is not None
    }
    sources = [{"path": str(path)} for path in paths]
    loader = DataLoader(ImageFiles(sources, processor.image_processor), batch_size=args.batch_size,
                        num_workers=args.num_workers, collate_fn=collate_pixels)
    captioned = skipped = start = 0
    with tqdm(total=len(paths), unit="img", desc="captioning") as progress:
        for pixel_values, readable, problems in loader:
            for _, message in problems:
                tqdm.write(f"skipped {message}", file=sys.stderr)  # above the bar, not through it
            skipped += len(problems)
            if readable:
                results = caption_batch(model, processor, pixel_values, settings)
                for index, (caption, score) in zip(readable, results, strict=True):
                    rows.write({"image": sources[start + index]["path"], "caption": caption, "score": score})
                captioned += len(readable)
            start += len(readable) + len(problems)
            progress.update(len(readable) + len(problems))
    return captioned, skipped


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 done, 1 nothing readable, 2 bad arguments).

    Example:
        >>> main(["photos/", "--model", "outputs/demo", "--output", "captions.csv"])
        0
    """
    args = parse_args(argv)
    try:
        file_format, device = _check_arguments(args)
        paths, unmatched = find_images(args.inputs)
        if not paths:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise UsageError(f"no image files found in {' '.join(args.inputs)} (looked for {extensions})")
        for pattern in unmatched:
            print(f"caption_images.py: warning: no image files in {pattern}", file=sys.stderr)
        model, processor = load_captioner(args.model, device)
    except UsageError as error:
        print(f"caption_images.py: error: {error}", file=sys.stderr)
        return 2
    with AtomicRows(args.output, file_format) as rows:
        captioned, skipped = caption_all(args, paths, model, processor, rows)
    print(
        f"captioned {captioned} image(s) into {args.output}; skipped {skipped} unreadable file(s)",
        file=sys.stderr,
    )
    return 0 if captioned else 1


if __name__ == "__main__":
    sys.exit(main())
