"""caption_images.py: a folder of generated images plus a broken one -> JSONL / CSV rows that match
model.generate image by image; bad arguments -> one line and exit code 2."""

from __future__ import annotations

import csv
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny import caption_files, coloured_image, save_peaked_captioner

import caption_images
from modeling_clip_lstm import ClipLstmForImageCaptioning

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--num_beams", "3", "--max_new_tokens", "8"]
COLOURS = {"red.png": (200, 30, 30), "sub/blue.jpg": (30, 40, 210), "sub/deeper/green.PNG": (30, 160, 40)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_peaked_captioner(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three readable images (one two folders down, one with an upper-case extension), a broken JPEG
    and a text file that the folder search must not pick up."""
    folder = tmp_path_factory.mktemp("images")
    for name, colour in COLOURS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        coloured_image(colour, size=(48, 40)).save(folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def direct_captions(model_dir: Path, paths: list[str]) -> dict[str, str]:
    """Each image captioned on its own with model.generate, for comparison with the batched script."""
    return {path: caption_files(model_dir, [path], num_beams=3, max_new_tokens=8)[0] for path in paths}


def run_main(*argv) -> int:
    return caption_images.main([str(arg) for arg in argv])


def test_jsonl_rows_match_generate_and_the_broken_file_is_reported(model_dir, images, tmp_path, capsys):
    output = tmp_path / "out" / "captions.jsonl"
    code = run_main(
        images, "--model", model_dir, "--output", output, "--batch_size", 2, "--num_workers", 0, *SETTINGS
    )
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    expected = direct_captions(model_dir, [str(images / name) for name in COLOURS])
    assert {row["image"]: row["caption"] for row in rows} == expected
    assert all(row["caption"] and isinstance(row["score"], float) and row["score"] < 0 for row in rows)
    errors = capsys.readouterr().err
    skipped = [line for line in errors.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and "broken.jpg" in skipped[0]
    assert "captioned 3 image(s)" in errors and "skipped 1 unreadable file(s)" in errors
    assert sorted(p.name for p in output.parent.iterdir()) == ["captions.jsonl"]  # no temporary file left


def test_csv_from_globs_with_workers(model_dir, images, tmp_path, capsys):
    output = tmp_path / "captions.csv"
    globbed = [images / "*.png", images / "**" / "*.jpg", images / "typo-*"]
    code = run_main(*globbed, "--model", model_dir, "--output", output, "--num_workers", 2, *SETTINGS)
    assert code == 0
    with open(output, newline="") as file:
        rows = list(csv.DictReader(file))
    # *.png is case-sensitive in globs: green.PNG is not matched; **/*.jpg matches blue.jpg and broken.jpg.
    expected = direct_captions(model_dir, [str(images / "red.png"), str(images / "sub/blue.jpg")])
    assert {row["image"]: row["caption"] for row in rows} == expected
    assert all(float(row["score"]) < 0 for row in rows)
    errors = capsys.readouterr().err
    assert "no image files in" in errors and "typo-*" in errors and "skipped 1 unreadable" in errors


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "no/such/folder/here"], "--model 'no/such/folder/here': no such folder"),
        (["--model", "./missing-model"], "no such folder"),
        (
            ["--model", "outputs/not-trained-yet"],
            "cannot load --model 'outputs/not-trained-yet' from the Hugging Face Hub",
        ),
        (["--output", "{tmp}/captions.txt"], "use a .jsonl or .csv name"),
        (["{tmp}/nothing-here"], "no image files found"),
        (["--device", "toaster"], "--device toaster: not a torch device"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(model_dir, images, tmp_path, capsys, arguments, message):
    arguments = [arg.replace("{tmp}", str(tmp_path)) for arg in arguments]
    inputs = [a for a in arguments if a.endswith("nothing-here")] or [str(images)]
    options = [a for a in arguments if a not in inputs]
    defaults = {"--model": str(model_dir), "--output": str(tmp_path / "out.jsonl")}
    for flag, value in defaults.items():
        if flag not in options:
            options += [flag, value]
    with pytest.raises(SystemExit) as exited:
        caption_images.main(inputs + options)
    assert exited.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("caption_images.py: error:") and message in errors[0], (
        errors
    )
    assert not list(tmp_path.glob("out.jsonl*"))


def test_a_failure_midway_leaves_no_output(model_dir, images, tmp_path, monkeypatch):
    calls = []

    def fail_on_second_batch(self, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory, say")
        return real_generate(self, **kwargs)

    real_generate = ClipLstmForImageCaptioning.generate
    monkeypatch.setattr(ClipLstmForImageCaptioning, "generate", fail_on_second_batch)
    output = tmp_path / "captions.jsonl"
    with pytest.raises(RuntimeError, match="out of memory"):
        run_main(images, "--model", model_dir, "--output", output, "--batch_size", 1, "--num_workers", 0)
    assert list(tmp_path.iterdir()) == []


def test_runs_as_a_script(model_dir, images, tmp_path):
    output = tmp_path / "captions.jsonl"
    command = [
        sys.executable,
        "caption_images.py",
        str(images),
        "--model",
        str(model_dir),
        "--output",
        str(output),
    ]
    done = subprocess.run(command + SETTINGS, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(output.read_text().splitlines()) == 3 and "Traceback" not in done.stderr


def test_huge_images_and_decompression_bombs_are_skipped_in_one_line_each(model_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    coloured_image((200, 30, 30), size=(48, 40)).save(folder / "red.png")
    Image.new("1", (8000, 6000)).save(folder / "huge.png")  # 48 MP: above processing.MAX_IMAGE_PIXELS
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 MP: PIL's own guard
    output = tmp_path / "captions.jsonl"
    assert run_main(folder, "--model", model_dir, "--output", output, "--num_workers", 0, *SETTINGS) == 0
    assert [json.loads(line)["image"] for line in output.read_text().splitlines()] == [
        str(folder / "red.png")
    ]
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    assert sorted(skipped) == [
        f"skipped {folder / 'bomb.png'}: too large to decode (Image size (400000000 pixels) exceeds limit of "
        "178956970 pixels, could be decompression bomb DOS attack.)",
        f"skipped {folder / 'huge.png'}: too large to decode (8000×6000, 48 megapixels; above 40 megapixels "
        "only a JPEG is read, at a reduced size)",
    ]


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_a_file_name_that_is_not_utf8_is_written_escaped_and_the_other_rows_kept(
    model_dir, tmp_path, file_format
):
    folder = tmp_path / "images"
    folder.mkdir()
    coloured_image((200, 30, 30), size=(48, 40)).save(folder / "red.png")
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.png")  # a Latin-1 name: not valid UTF-8
    coloured_image((30, 40, 210), size=(48, 40)).save(latin1, format="PNG")
    output = tmp_path / f"captions.{file_format}"
    assert run_main(folder, "--model", model_dir, "--output", output, "--num_workers", 0, *SETTINGS) == 0
    text = output.read_text(encoding="utf-8")  # the file itself is valid UTF-8
    if file_format == "jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
        # JSON's own \udcXX escape: json.loads + os.fsencode give back the exact bytes of the name
        assert [os.fsencode(row["image"]) for row in rows] == [latin1, os.fsencode(folder / "red.png")]
        assert "caf\\udce9.png" in text
    else:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert [row["image"] for row in rows] == [f"{folder}/caf\\xe9.png", str(folder / "red.png")]
    assert all(row["caption"] for row in rows)
    expected = caption_files(
        model_dir, [latin1.decode("utf-8", "surrogateescape")], num_beams=3, max_new_tokens=8
    )
    assert rows[0]["caption"] == expected[0]


UNWRITABLE_OUTPUTS = {
    "under a file": "{tmp}/a-file/captions.jsonl",
    "under /proc": "/proc/captions.jsonl",
    "in a read-only folder": "{tmp}/read-only/captions.jsonl",
}


@pytest.mark.parametrize("case", UNWRITABLE_OUTPUTS)
def test_an_unwritable_output_is_one_line_before_any_work(model_dir, images, tmp_path, capsys, case):
    if case == "in a read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the other cases cover the error path")
        (tmp_path / "read-only").mkdir(mode=0o555)
    (tmp_path / "a-file").write_text("not a folder")
    output = UNWRITABLE_OUTPUTS[case].replace("{tmp}", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        run_main(images, "--model", model_dir, "--output", output, "--num_workers", 0)
    assert exited.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"caption_images.py: error: --output {output}: cannot write there (")


@pytest.mark.parametrize("num_beams", ["65", "100000"])
def test_num_beams_has_an_upper_bound(model_dir, images, tmp_path, capsys, num_beams):
    with pytest.raises(SystemExit) as exited:
        run_main(images, "--model", model_dir, "--output", tmp_path / "out.jsonl", "--num_beams", num_beams)
    assert exited.value.code == 2
    assert f"--num_beams: must be at most 64, got {num_beams}" in capsys.readouterr().err


def test_output_gets_the_umask_permissions(model_dir, images, tmp_path):
    output = tmp_path / "captions.csv"
    old_umask = os.umask(0o002)
    try:
        assert run_main(images, "--model", model_dir, "--output", output, "--num_workers", 0, *SETTINGS) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o664  # like `open(path, "w")`, not mkstemp's 0600


def test_stale_partial_files_of_the_same_output_are_cleaned_up(model_dir, images, tmp_path):
    """A killed run leaves `.captions.jsonl.<random>.partial`; the next run removes it, unless a live
    run still holds it (its lock), and leaves other outputs' partial files alone."""
    output = tmp_path / "captions.jsonl"
    stale = tmp_path / ".captions.jsonl.k1ll3d00.partial"
    stale.write_text('{"image": "half a row')
    other = tmp_path / ".other.jsonl.k1ll3d00.partial"
    other.write_text("")
    live = tmp_path / ".captions.jsonl.running.partial"
    live.write_text("")
    holder = subprocess.Popen(  # a run in progress: it holds the lock on its partial file
        [sys.executable, "-c", HOLD_LOCK, str(live)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_main(images, "--model", model_dir, "--output", output, "--num_workers", 0, *SETTINGS) == 0
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert not stale.exists() and other.exists() and live.exists()
    assert len(output.read_text().splitlines()) == 3


HOLD_LOCK = """
import fcntl, sys, time
file = open(sys.argv[1], "a")
fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(600)
"""
