"""Caption folders, files or globs of images into JSONL or CSV rows: image path, caption, score.

    python caption_images.py photos/ "more/*.jpg" --model outputs/flickr8k --output captions.jsonl
    python caption_images.py photos/ --model me/clip-lstm-flickr8k --output captions.csv --num_beams 3

Folders are searched recursively for common image extensions. Images are decoded in DataLoader
workers and captioned in batches; files that cannot be read (or above processing.MAX_IMAGE_PIXELS
and not a JPEG) are reported on stderr, one line each, and skipped. The output file appears only
when complete (written to a temporary `.<name>.*.partial` file, then renamed, with the umask's
permissions); a partial file that a killed run left behind is removed by the next run.
`score` is the caption's `sequences_scores`: its summed log-probability / length ** length_penalty.

A file name that is not valid UTF-8 (e.g. Latin-1 `caf\\xe9.jpg` on Linux) is written escaped, so the
output stays valid UTF-8: in JSONL as JSON's `\\udcXX` escape of Python's surrogateescape form
(`os.fsencode(json.loads(line)["image"])` gives the exact bytes back), in CSV as `\\xNN` per
undecodable byte (`codecs.escape_decode` gives the bytes back when the name has no backslash).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import io
import json
import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from clip_lstm_captioner.cli import (
    beam_width,
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
from processing import first_line

try:  # POSIX: a live run holds a lock on its partial file, which tells it from a killed run's
    import fcntl
except ImportError:  # Windows: stale partial files are left for the user
    fcntl = None

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


_UNDECODABLE_BYTE = re.compile("[\udc80-\udcff]")  # what os.fsdecode makes of bytes that are not UTF-8


def _json_line(row: dict) -> str:
    """One JSONL line; an undecodable byte of a file name becomes JSON's `\\udcXX` escape.

    Example:
        >>> _json_line({"image": os.fsdecode(b"caf\\xe9.jpg"), "caption": "a café"})
        '{"image": "caf\\\\udce9.jpg", "caption": "a café"}'
    """
    text = json.dumps(row, ensure_ascii=False)  # a lone surrogate stays raw here: UTF-8 cannot encode it
    return _UNDECODABLE_BYTE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _csv_safe(name: str) -> str:
    """A file name as CSV text: each undecodable byte as `\\xNN`.

    Example:
        >>> _csv_safe(os.fsdecode(b"caf\\xe9.jpg"))
        'caf\\\\xe9.jpg'
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace") if _UNDECODABLE_BYTE.search(name) else name


class CaptionRows:
    """Rows as JSONL or CSV into an open (atomically written) UTF-8 text file.

    Each row is made whole before it is written, so a row that cannot be encoded is reported and
    skipped without costing the others; a failed write (disk full) is a one-line `UsageError`.
    """

    def __init__(self, file, file_format: str, output: Path):
        self.file, self.format, self.output = file, file_format, output
        if file_format == "csv":
            self._write(self._csv_line(dict(zip(FIELDS, FIELDS, strict=True))))

    def _csv_line(self, row: dict) -> str:
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=FIELDS).writerow(row)
        return buffer.getvalue()

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
        except OSError as error:
            raise UsageError(f"--output {self.output}: cannot write there ({first_line(error)})") from None

    def write(self, row: dict) -> str | None:
        """Write `row`; return None, or why it could not be written (the row is then left out)."""
        if self.format == "csv":
            text = self._csv_line(dict(row, image=_csv_safe(row["image"])))
        else:
            text = _json_line(row) + "\n"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            return f"{_csv_safe(row['image'])}: cannot write its row ({error.reason})"
        self._write(text)
        return None


# ----------------------------------------------------------------------------- the output file


def remove_stale_partials(output: Path) -> list[Path]:
    """Remove the temporary files that killed runs writing `output` left behind; return them.

    A run holds an exclusive lock (flock) on its `.<name>.<random>.partial` file while it writes,
    and the kernel drops the lock when the process ends, however it ends. So a partial file of
    this output name that can be locked has no live writer: it is stale. Other names are left alone.
    """
    removed = []
    if fcntl is None or not output.parent.is_dir():
        return removed
    for path in output.parent.glob(f".{glob.escape(output.name)}.*.partial"):
        with contextlib.suppress(OSError), open(path, "rb") as file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live run is writing it
            path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def open_output(output: Path):
    """`atomic_write(output)` for UTF-8 text, locked while written (see `remove_stale_partials`);
    failing to create it, or to complete it, is a one-line `UsageError` naming --output."""
    writer = atomic_write(output, newline="", encoding="utf-8")
    try:
        file = writer.__enter__()  # mkdir and mkstemp: a read-only folder, a file as parent, /proc
        if fcntl is not None:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        raise UsageError(f"--output {output}: cannot write there ({first_line(error)})") from None
    try:
        yield file
    except BaseException:
        if not writer.__exit__(*sys.exc_info()):  # removes the partial file
            raise
    else:
        try:
            writer.__exit__(None, None, None)  # flush, close and rename: a full disk fails here
        except OSError as error:
            raise UsageError(f"--output {output}: cannot write there ({first_line(error)})") from None


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
        "--num_beams",
        type=beam_width,
        help="beam width, 1 to 64 (default: the model's generation_config)",
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
                problem = rows.write({"image": sources[row]["path"], "caption": caption, "score": score})
                if problem:
                    report_skip(problem)
                else:
                    captioned += 1
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
    captioned, skipped = sum(done for done, _ in counts), sum(left for _, left in counts)
    if processes.is_main_process:
        with open_output(args.output) as file:
            writer = CaptionRows(file, file_format, args.output)
            for row in rows:
                problem = writer.write(row)
                if problem:  # a row that cannot be encoded is left out, as in `caption_all`
                    tqdm.write(f"skipped {problem}", file=sys.stderr)
                    captioned, skipped = captioned - 1, skipped + 1
    return captioned, skipped


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
    if processes.is_main_process:
        for path in remove_stale_partials(args.output):
            print(f"caption_images.py: removed {path}, left by an interrupted run", file=sys.stderr)
    if processes.num_processes > 1:
        model, processor = load_captioner(args.model, processes.device)
        captioned, skipped = caption_across_processes(args, paths, model, processor, file_format, processes)
    else:
        with open_output(args.output) as file:  # before the model loads: an unwritable --output fails at once
            model, processor = load_captioner(args.model, device)
            rows = CaptionRows(file, file_format, args.output)
            captioned, skipped = caption_all(args, paths, model, processor, rows)
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
