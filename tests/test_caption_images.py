"""caption_images.py: a folder of generated images plus a broken one -> JSONL / CSV rows that match
model.generate image by image; bad arguments -> one line and exit code 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
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
