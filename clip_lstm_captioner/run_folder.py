"""A training run's folder: one run per folder (a lock, the refusal, --overwrite_output_dir),
checkpoints written whole and resumed safely, and the best model saved atomically.

train_accelerate.py calls these in order; each says in one line what went wrong and what was kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from accelerate.utils import load as load_accelerate_file
from safetensors import SafetensorError, safe_open

from processing import first_line

from .cli import MODEL_FOLDER
from .errors import TrainingError, UsageError
from .files import write_text_atomic

LOCK_FILE = ".train_accelerate.lock"
# What a run writes into its output_dir (`--overwrite_output_dir` deletes exactly these; the tracker
# logs go to <output_dir>/<project name>, see `init_trackers`).
TRACKER_PROJECT = "clip-lstm-captioner"
RUN_OUTPUTS = (
    MODEL_FOLDER,
    f".{MODEL_FOLDER}.tmp",
    f".{MODEL_FOLDER}.old",
    "checkpoints",
    "eval",
    "samples.jsonl",
    "trainer_state.json",
    "loss_curve.png",
    TRACKER_PROJECT,
)


@contextlib.contextmanager
def output_dir_lock(folder: Path):
    """Hold an exclusive lock on `folder` (creating it) for one training run; yields the lock file.

    `fcntl.flock` on `folder/.train_accelerate.lock`, which holds the holder's pid for the error
    message. The kernel drops the lock when its process dies (SIGKILL included), so a stale lock
    file left by a dead run is simply locked again: no pid guessing, no pid-reuse race. The file
    is removed on exit; a run that opened it just before checks that it locked the file still in place.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    for _ in range(5):  # bounded: each retry means another run just released and removed the file
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            raise UsageError(
                f"--output_dir {folder}: in use by another training run (pid {holder}, lock file "
                f"{path}); wait for it to end or choose another --output_dir"
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle).st_ino:
            break
        os.close(handle)
    else:
        raise UsageError(f"--output_dir {folder}: could not take the lock {path}; try again")
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before closing: whoever waits then locks a file that is gone and retries
        os.close(handle)


def check_output_dir(args, output_dir: Path) -> None:
    """Refuse an output_dir that holds files unless resuming or overwriting (read-only: every process
    checks, so that all of them stop with the same line instead of one waiting at a barrier).

    A run mixed into another one's folder would replace its better model/ with its own epoch 1,
    prune its checkpoints by step, and `--resume_from_checkpoint latest` would pick the other run's.
    """
    held = (
        sorted(path.name for path in output_dir.iterdir() if path.name != LOCK_FILE)
        if output_dir.is_dir()
        else []
    )
    if held and not (args.resume_from_checkpoint or args.overwrite_output_dir):
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UsageError(
            f"--output_dir {output_dir} already holds files ({shown}): pass --resume_from_checkpoint "
            "latest to continue that run, --overwrite_output_dir to replace it, or another --output_dir"
        )


def clear_previous_run(args, output_dir: Path) -> None:
    """With --overwrite_output_dir, delete the earlier run's files (RUN_OUTPUTS) before this run writes any."""
    if not args.overwrite_output_dir:
        return
    removed = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    for name in removed:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    print(
        f"--overwrite_output_dir: removed the previous run's {', '.join(removed) or 'nothing'} from {output_dir}"
    )


# ----------------------------------------------------------------------------- checkpoints

# Written by accelerator.save_state (model, optimizer, schedule) and by us, last, before the rename.
CHECKPOINT_FILES = ("model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json")


def step_of(folder: Path) -> int:
    return int(folder.name.split("_")[1])


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (one phrase), or None when it looks whole."""
    if not folder.is_dir():
        return "no such folder"
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"incomplete, no {', '.join(missing)}"
    try:
        json.loads((folder / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"trainer_state.json is unreadable ({first_line(error)})"
    try:
        with safe_open(folder / "model.safetensors", "pt") as weights:  # reads and checks the header only
            weights.keys()
    except (OSError, SafetensorError) as error:
        return f"model.safetensors is unreadable ({first_line(error)})"
    return None


def find_checkpoint(args) -> Path | None:
    """The checkpoint to resume from: the named folder (refused in one line if broken), or for
    'latest' the newest complete one in output_dir/checkpoints, skipping broken ones with a warning."""
    if args.resume_from_checkpoint in (None, ""):
        return None
    if args.resume_from_checkpoint != "latest":
        folder = Path(args.resume_from_checkpoint)
        if problem := checkpoint_problem(folder):
            raise UsageError(f"--resume_from_checkpoint {folder}: not a usable checkpoint: {problem}")
        return folder
    folders = sorted((Path(args.output_dir) / "checkpoints").glob("step_*"), key=step_of, reverse=True)
    for folder in folders:
        if (problem := checkpoint_problem(folder)) is None:
            return folder
        print(f"train_accelerate.py: warning: skipping checkpoint {folder}: {problem}", file=sys.stderr)
    if any(path.name != LOCK_FILE for path in Path(args.output_dir).glob("*")):
        raise UsageError(
            f"--resume_from_checkpoint latest: no complete checkpoint in {args.output_dir}/checkpoints; "
            "pass --overwrite_output_dir to start that run over"
        )
    return None  # nothing to resume in an empty folder: a fresh start, as in accelerate's examples


def load_checkpoint(accelerator, folder: Path) -> dict:
    """Restore weights, optimizer, schedule and RNG states; returns the loop state saved with them."""
    try:
        accelerator.load_state(str(folder))
    except (OSError, RuntimeError, SafetensorError, EOFError, ValueError) as error:
        raise UsageError(f"--resume_from_checkpoint {folder}: cannot load it ({first_line(error)})") from None
    check_random_states(folder, accelerator.process_index)
    return json.loads((folder / "trainer_state.json").read_text())


def check_random_states(folder: Path, process_index: int) -> None:
    """Warn when this process's RNG states were not restored: accelerate only logs that at INFO level,
    and the run then draws different dropout masks than the uninterrupted one would have."""
    path = folder / f"random_states_{process_index}.pkl"
    try:
        states = load_accelerate_file(path)  # the call accelerate's load_state makes
        restored = torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
        reason = None if restored else "its torch state was not applied"
    except Exception as error:  # whatever accelerate's own `except Exception` swallowed
        reason = first_line(error) or type(error).__name__
    if reason:
        print(
            f"train_accelerate.py: warning: {path} could not be restored ({reason}); the run goes on with fresh "
            "random states, so it will not be bit-identical to an uninterrupted one",
            file=sys.stderr,
        )


def save_checkpoint(accelerator, args, state: dict) -> None:
    """accelerate's save_state (weights, optimizer, schedule, RNGs) plus our loop counters, written
    into `checkpoints/.step_N.tmp` and renamed to `step_N` only when complete (a kill mid-save leaves
    no `step_N` that looks resumable); then only the newest `--checkpoints_total_limit` are kept."""
    checkpoints = Path(args.output_dir) / "checkpoints"
    folder = checkpoints / f"step_{state['step']}"
    temporary = checkpoints / f".{folder.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            write_text_atomic(temporary / "trainer_state.json", json.dumps(state, indent=2))
    except (OSError, RuntimeError, SafetensorError) as error:  # a full disk shows up as any of these
        shutil.rmtree(temporary, ignore_errors=True)
        raise TrainingError(
            f"cannot write the checkpoint {folder}: {first_line(error)}; the earlier checkpoints are kept"
        ) from None
    accelerator.wait_for_everyone()  # every process's random states are in before the rename
    if accelerator.is_main_process:
        replace_folder(temporary, folder)
        older = sorted(checkpoints.glob("step_*"), key=step_of)
        for stale in older[: -args.checkpoints_total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()


def replace_folder(source: Path, destination: Path) -> None:
    """Rename `source` to `destination`, replacing a folder already there (a step saved twice)."""
    if destination.exists():
        previous = destination.with_name(f".{destination.name}.old")
        os.replace(destination, previous)
        os.replace(source, destination)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(source, destination)


def save_best_model(model, processor, folder: Path, run_args: dict) -> None:
    """`save_model_atomically`, with a full disk (OSError, or a SafetensorError or RuntimeError from
    the serialisers, which are not OSErrors) reported in one line."""
    try:
        save_model_atomically(model, processor, folder, run_args)
    except (OSError, RuntimeError, SafetensorError) as error:
        raise TrainingError(
            f"cannot save the best model to {folder}: {first_line(error)}; "
            "the previous best model (if any) is kept"
        ) from None


# ----------------------------------------------------------------------------- the best model


def save_model_atomically(model, processor, folder: Path, run_args: dict) -> None:
    """Write model, processor, generation config and the run's arguments to a temporary folder,
    then swap it in with renames: a crash mid-save leaves the previous best model whole."""
    temporary, previous = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
        write_text_atomic(temporary / "training_args.json", json.dumps(run_args, indent=2, default=str))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if folder.exists():
        os.replace(folder, previous)
    os.replace(temporary, folder)
    shutil.rmtree(previous, ignore_errors=True)


def recover_interrupted_save(folder: Path) -> None:
    """If a run died between the two renames of `save_model_atomically`, put the old model back."""
    previous = folder.with_name(f".{folder.name}.old")
    if previous.exists() and not folder.exists():
        os.replace(previous, folder)
    shutil.rmtree(folder.with_name(f".{folder.name}.tmp"), ignore_errors=True)
