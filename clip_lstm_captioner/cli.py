"""Small command-line helpers shared by the scripts: the error boundary, argument types, device and
worker defaults, the Hub probe, and the one way to load a trained captioner.

    >>> positive_int("3"), default_device("cpu")
    (3, device(type='cpu'))
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch
from huggingface_hub import HfApi, constants

from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import CaptionerError, ClipLstmProcessor, check_vocabulary, first_line, is_hub_id

from .errors import UsageError

T = TypeVar("T")

# Where the offline demo (`train_accelerate.py --demo`) writes its run; the trained model is its model/.
DEMO_OUTPUT_DIR = Path(__file__).resolve().parent.parent / "outputs" / "demo"
MODEL_FOLDER = "model"  # inside a run folder: the best model, loadable with from_pretrained
DEMO_MODEL_DIR = DEMO_OUTPUT_DIR / MODEL_FOLDER
DEMO_COMMAND = "python train_accelerate.py --demo"
MODEL_HINT = (
    "pass a folder saved by train_accelerate.py (its run folder's model/; the offline demo makes "
    f"outputs/demo/model with `{DEMO_COMMAND}`)"
)


# ----------------------------------------------------------------------------- the error boundary


def run_cli(work: Callable[..., T], prog: str, *args) -> T:
    """`work(*args)`; a user error (`CaptionerError`) prints `<prog>: error: <one line>` and exits 2.

    Anything else is a bug and keeps its traceback. The exit is argparse's own (`SystemExit(2)`), so
    a script's `main(argv)` behaves the same from the shell and when a test calls it.

    >>> def bad():
    ...     raise UsageError("--batch_size must be >= 1, got 0")
    >>> run_cli(bad, "demo.py")
    Traceback (most recent call last):
    ...
    SystemExit: 2
    """
    try:
        return work(*args)
    except CaptionerError as error:
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """Turn a loader's OSError (offline Hub, missing or broken files) into a `UsageError` naming `what`.

    >>> with loading("--vision_model x"):
    ...     raise OSError("no route to host")
    Traceback (most recent call last):
    ...
    clip_lstm_captioner.errors.UsageError: --vision_model x: OSError: no route to host
    """
    try:
        yield
    except OSError as error:
        raise UsageError(f"{what}: {first_line(error)}") from None


# ----------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, refused with the value in the message."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# Beam search keeps num_beams hypotheses per image: time and memory grow linearly with it (each step
# holds batch x beams x vocabulary scores: 64 x 64 x 49,409 floats are 0.8 GB), while caption quality
# stops improving at 3-10 beams. 64 leaves ample room for experiments; 100,000 beams ran 350 s and 5 GB.
MAX_NUM_BEAMS = 64


def beam_width(text: str) -> int:
    """argparse type: a beam width, 1 to `MAX_NUM_BEAMS`.

    >>> beam_width("5")
    5
    """
    value = positive_int(text)
    if value > MAX_NUM_BEAMS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_NUM_BEAMS}, got {value} (wider beams cost time and memory without better captions)"
        )
    return value


def steps_or_epoch(text: str) -> int | str:
    """argparse type of --checkpointing_steps: 'epoch' or a positive number of optimizer steps.

    >>> steps_or_epoch("epoch"), steps_or_epoch("500")
    ('epoch', 500)
    """
    return "epoch" if text == "epoch" else positive_int(text)


def _float_in(text: str, low: float, high: float, low_open: bool, high_open: bool) -> float:
    value = float(text)
    inside = math.isfinite(value) and (low < value if low_open else low <= value)
    inside = inside and (value < high if high_open else value <= high)
    if not inside:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise argparse.ArgumentTypeError(f"must be a number in {bounds}, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rate)."""
    return _float_in(text, 0.0, math.inf, low_open=True, high_open=True)


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (weight decay, gradient clipping norm)."""
    return _float_in(text, 0.0, math.inf, low_open=False, high_open=True)


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (warmup ratio)."""
    return _float_in(text, 0.0, 1.0, low_open=False, high_open=False)


def dropout_rate(text: str) -> float:
    """argparse type: a probability in [0, 1); dropout 1 would zero every input.

    >>> dropout_rate("0.2")
    0.2
    """
    return _float_in(text, 0.0, 1.0, low_open=False, high_open=True)


# ----------------------------------------------------------------------------- machine defaults


def default_device(name: str | None = None) -> torch.device:
    """`name` as a torch device ("auto" or None: cuda when available, else cpu); a bad name is a UsageError."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a torch device (try cpu or cuda)") from None


def default_num_workers(requested: int | None = None) -> int:
    """Image-decoding worker processes: `requested`, else one per CPU core up to 8.

    >>> default_num_workers(3)
    3
    """
    return min(8, os.cpu_count() or 1) if requested is None else requested


# ----------------------------------------------------------------------------- the Hub and loading


def hub_unreachable(repo_id: str, repo_type: str = "model") -> str | None:
    """Why the Hub cannot serve `repo_id` (one line), or None when it can or offline mode is set.

    The libraries retry an unreachable Hub for tens of seconds; one short request tells at once.
    """
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=5)
    except Exception as error:  # network, HTTP and not-found errors all mean "cannot load it"
        return first_line(error)
    return None


def load_pretrained(loader, source: str, what: str, hint: str):
    """`loader(source)` for a local folder or a Hub id; every failure becomes one `UsageError` line.

    >>> load_pretrained(print, "no/such/dir/here", "--model", "pass a folder")
    Traceback (most recent call last):
    ...
    clip_lstm_captioner.errors.UsageError: --model 'no/such/dir/here': no such folder; pass a folder
    """
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            nested = " (its model/ subfolder has one)" if (folder / "model" / "config.json").is_file() else ""
            raise UsageError(f"{what} {source!r}: the folder has no config.json{nested}; {hint}")
        source = str(folder)
    elif not is_hub_id(source):
        raise UsageError(f"{what} {source!r}: no such folder; {hint}")
    elif reason := hub_unreachable(source):
        raise UsageError(
            f"{what} {source!r}: no such folder, and the Hugging Face Hub cannot serve it ({reason}); {hint}"
        )
    try:
        return loader(source)
    except Exception as error:  # offline, missing or broken files: one line, not a traceback
        where = "its folder" if folder.is_dir() else "the Hugging Face Hub (offline, or no such repo)"
        raise UsageError(f"cannot load {what} {source!r} from {where}: {first_line(error)}; {hint}") from None


def load_captioner(
    source: str, device: torch.device | str | None = None, what: str = "--model"
) -> tuple[ClipLstmForImageCaptioning, ClipLstmProcessor]:
    """Our model (eval mode, on `device`) and processor from a saved folder or a Hub repo made by publishing.py.

    Loaded with this project's own classes, so a Hub repo's code is not run. A tokenizer whose size
    differs from the model's vocabulary is refused in one line naming both sizes.

        model, processor = load_captioner("outputs/demo/model")
    """

    def loader(path):
        model = ClipLstmForImageCaptioning.from_pretrained(path)
        processor = ClipLstmProcessor.from_pretrained(path, trust_remote_code=False)
        check_vocabulary(processor.tokenizer, model.config.vocab_size)
        return model.eval(), processor

    model, processor = load_pretrained(loader, source, what, MODEL_HINT)
    return (model.to(device) if device is not None else model), processor
