"""Two CPU processes under `accelerate launch` do what one process does, each image once:
the embedding cache (identical file, nothing trusted after a crash), caption_images.py and
evaluate_model.py (same output, same report numbers).

Each launch starts two interpreters and a gloo group (~30-60 s on a busy 2-core machine), so the
data are a few tiny images in Flickr8k's Kaggle layout and the models are tiny random ones.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from tiny import TINY_CAPTIONS, coloured_image, save_peaked_captioner, tiny_model

import caption_images
import evaluate_model
from clip_lstm_captioner.data import load_caption_dataset
from clip_lstm_captioner.embedding_cache import cache_image_embeds, image_embeds_of
from processing import image_processor_for

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")  # the CLI of this environment
NUM_IMAGES = 16  # a seeded split keeps 12 for training: four batches of 3, two per process

# What train_accelerate.py does: one call on every process, passing the accelerator. Each process
# says how many images it encoded. Arguments: data folder, cache folder, rank to crash (-1: none),
# image_feature.
CACHE_SCRIPT = """
import sys
from accelerate import Accelerator
from tiny import tiny_model
from clip_lstm_captioner import embedding_cache
from clip_lstm_captioner.data import load_caption_dataset
from processing import image_processor_for

folder, cache_dir, crash_rank, feature = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
state = Accelerator()
encode = embedding_cache._embed_images

def counted(sources, *args):
    if state.process_index == crash_rank:
        raise RuntimeError(f"process {crash_rank} killed mid-cache")
    # one write per line: the two processes share the pipe, and print() writes the newline separately
    print(f"process {state.process_index} of {state.num_processes} encoded {len(sources)} images\\n", end="", flush=True)
    return encode(sources, *args)

embedding_cache._embed_images = counted
with state.main_process_first():
    split = load_caption_dataset(folder)["train"]
model = tiny_model(image_feature=feature)
embedding_cache.cache_image_embeds(split, model, image_processor_for(model.config.vision_config),
                                   cache_dir=cache_dir, batch_size=3, num_workers=0, accelerator=state)
"""


def free_port() -> int:
    with socket.socket() as sock:  # other test runs on this machine may hold accelerate's default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` with two CPU processes (gloo), as DESIGN.md says they are started."""
    command = [
        str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        *map(str, args),
    ]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    # the project's editable install points at another checkout: import this one, and tests/tiny.py
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def kaggle_folder(tmp_path_factory) -> Path:
    """Flickr8k's Kaggle layout: Images/ + captions.txt (header image,caption; five rows per image)."""
    root = tmp_path_factory.mktemp("flickr8k")
    (root / "Images").mkdir()
    rows = ["image,caption"]
    for i in range(NUM_IMAGES):
        name = f"{1000 + i}_{i:04x}.jpg"
        colour = (40 + 13 * i, 200 - 11 * i, (90 * i) % 256)
        coloured_image(colour, size=(60 + i, 45)).save(root / "Images" / name, quality=90)
        rows += [f"{name},{TINY_CAPTIONS[(i + k) % len(TINY_CAPTIONS)]} ." for k in range(5)]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(path.name for path in (cache_dir / "embeddings").iterdir())


@pytest.mark.parametrize("feature", ["pooled", "patches"])  # (N, D) float32; (N, P, D) float16
def test_two_processes_write_the_cache_one_process_writes(kaggle_folder, tmp_path, feature):
    script = tmp_path / "cache_script.py"
    script.write_text(CACHE_SCRIPT)
    result = launch_two(script, kaggle_folder, tmp_path / "two", -1, feature, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(line for line in result.stdout.splitlines() if " encoded " in line) == [
        "process 0 of 2 encoded 6 images",  # two batches of 3 each
        "process 1 of 2 encoded 6 images",
    ]

    split = load_caption_dataset(kaggle_folder)["train"]
    model = tiny_model(image_feature=feature)
    one = cache_image_embeds(
        split, model, image_processor_for(model.config.vision_config), cache_dir=tmp_path / "one",
        batch_size=3, num_workers=0,
    )  # fmt: skip
    names = cache_files(tmp_path / "one")
    assert cache_files(tmp_path / "two") == names  # same key, and no parts left behind
    assert len(names) == 1 and names[0].startswith("clip-embeds-")
    two = datasets.Dataset.from_file(str(tmp_path / "two" / "embeddings" / names[0]))
    assert two["image_id"] == one["image_id"] == split["image_id"]
    assert np.array_equal(image_embeds_of(two).numpy(), image_embeds_of(one).numpy())  # bit for bit
    assert two.features["image_embeds"] == one.features["image_embeds"]
    assert image_embeds_of(two).shape == (split.num_rows, *model.config.image_feature_shape)
    one_file, two_file = (tmp_path / run / "embeddings" / names[0] for run in ("one", "two"))
    assert two_file.read_bytes() == one_file.read_bytes()  # the same file, byte for byte


def test_a_crashed_process_leaves_no_cache_behind(kaggle_folder, tmp_path, monkeypatch):
    script = tmp_path / "cache_script.py"
    script.write_text(CACHE_SCRIPT)
    result = launch_two(script, kaggle_folder, tmp_path / "cache", 1, "pooled", cwd=tmp_path)
    assert result.returncode != 0 and "process 1 killed mid-cache" in result.stderr
    embeddings = tmp_path / "cache" / "embeddings"
    assert not list(embeddings.glob("clip-embeds-*.arrow"))  # nothing a later run would read

    split = load_caption_dataset(kaggle_folder)["train"]
    model = tiny_model()
    encoded = []
    original = model.get_image_features
    monkeypatch.setattr(
        model, "get_image_features", lambda pixels: encoded.append(len(pixels)) or original(pixels)
    )
    again = cache_image_embeds(
        split, model, image_processor_for(model.config.vision_config), cache_dir=tmp_path / "cache",
        batch_size=3, num_workers=0,
    )  # fmt: skip
    assert sum(encoded) == split.num_rows and np.isfinite(image_embeds_of(again).numpy()).all()
    left = cache_files(tmp_path / "cache")  # the killed run's features file was replaced, then removed
    assert len(left) == 1 and left[0].endswith(".arrow")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_peaked_captioner(tmp_path_factory.mktemp("model"))


def test_two_processes_caption_every_file_once(kaggle_folder, model_dir, tmp_path):
    broken = tmp_path / "photos" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = [kaggle_folder / "Images", broken, "--model", model_dir, "--batch_size", "3", "--num_workers", "0"]
    args += ["--num_beams", "3", "--max_new_tokens", "8"]
    result = launch_two(
        REPO_ROOT / "caption_images.py", *args, "--output", tmp_path / "two.jsonl", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f"skipped {broken}") == 1  # reported by the one process that tried it
    assert result.stderr.count(f"captioned {NUM_IMAGES} image(s)") == 1

    assert caption_images.main([str(a) for a in args] + ["--output", str(tmp_path / "one.jsonl")]) == 0
    one, two = (
        [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        for name in ("one.jsonl", "two.jsonl")
    )
    images = sorted(str(path) for path in (kaggle_folder / "Images").iterdir())
    assert sorted(row["image"] for row in two) == images  # every file once
    assert [(row["image"], row["caption"]) for row in two] == [(row["image"], row["caption"]) for row in one]
    # the same batches, but threads per process differ (accelerate sets them): scores agree to float32 rounding
    assert [row["score"] for row in two] == pytest.approx([row["score"] for row in one], rel=1e-5)


def test_two_processes_report_the_numbers_one_process_reports(kaggle_folder, model_dir, tmp_path):
    args = ["--model", model_dir, "--dataset", kaggle_folder, "--split", "train", "--no_meteor"]
    args += ["--data_cache_dir", tmp_path / "cache", "--batch_size", "3", "--embed_batch_size", "3"]
    args += ["--num_workers", "0", "--num_gallery", "2"]
    result = launch_two(
        REPO_ROOT / "evaluate_model.py", *args, "--output_dir", tmp_path / "two", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("written to") == 1  # one process reports

    one = evaluate_model.main([str(a) for a in args] + ["--output_dir", str(tmp_path / "one")])
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["num_images"] == one["num_images"] == 12
    for key in ("ours", "most_frequent_caption"):
        scores = {name: value for name, value in one["models"][key].items() if "seconds" not in name}
        assert {name: two["models"][key][name] for name in scores if name != "images_per_s"} == {
            name: value for name, value in scores.items() if name != "images_per_s"
        }
    assert (tmp_path / "two" / "captions.jsonl").read_text() == (
        tmp_path / "one" / "captions.jsonl"
    ).read_text()
