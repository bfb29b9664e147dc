"""train_accelerate.py: the offline demo's bar, resuming, two processes, atomic saves, errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_VISION

import train_accelerate
from clip_lstm_captioner.data import load_caption_dataset
from clip_lstm_captioner.embedding_cache import cache_image_embeds, image_embeds_of
from clip_lstm_captioner.shapes import make_shapes_dataset, read_scenes, score_shapes_captions
from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import ClipLstmProcessor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    """A 48-image shapes folder in the Kaggle layout: enough for a few batches per epoch."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "set", num_images=48, seed=1)


def tiny_run_args(dataset: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        str(dataset),
        "--data_cache_dir",
        str(output_dir.parent / "cache"),
        "--vision_model",
        "random",
        "--vision_config",
        json.dumps(TINY_VISION),
        "--min_word_frequency",
        "1",
        "--embed_dim",
        "16",
        "--hidden_size",
        "24",
        "--dropout",
        "0.3",
        "--batch_size",
        "16",
        "--num_epochs",
        "2",
        "--learning_rate",
        "0.01",
        "--num_sample_images",
        "2",
        "--num_workers",
        "0",
        "--no_eval",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


# ----------------------------------------------------------------------------- the offline demo


def test_demo_writes_a_model_that_names_the_largest_colour(demo_run):
    model_dir = demo_run / train_accelerate.MODEL_FOLDER
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "training_args.json",
        "modeling_clip_lstm.py",
        "processing.py",
    ):
        assert (model_dir / name).exists(), name
    for name in ("loss_curve.png", "samples.jsonl", "trainer_state.json"):
        assert (demo_run / name).exists(), name
    model = ClipLstmForImageCaptioning.from_pretrained(model_dir)
    processor = ClipLstmProcessor.from_pretrained(model_dir)
    args = json.loads((model_dir / "training_args.json").read_text())
    test = load_caption_dataset("shapes", cache_dir=args["data_cache_dir"])["test"]
    test = cache_image_embeds(
        test, model, processor.image_processor, cache_dir=args["data_cache_dir"], num_workers=0
    )
    captions = dict(
        zip(
            test["image_id"],
            processor.batch_decode(model.generate(image_embeds=image_embeds_of(test))),
            strict=True,
        )
    )
    scenes = read_scenes(Path(args["data_cache_dir"]) / "shapes-v1-n2000-seed0")
    scores = score_shapes_captions(captions, scenes)
    print(
        f"demo model on {scores['num_images']} held-out images: colour {scores['colour_accuracy']:.3f}, "
        f"shape {scores['shape_accuracy']:.3f}"
    )
    assert scores["num_images"] == 250
    assert scores["colour_accuracy"] >= 0.85  # the bar; chance is 1/7
    assert (
        scores["shape_accuracy"] >= 0.5
    )  # our own guard for the pre-trained tower (random tower: ~0.26; chance 1/4)
    report = json.loads((demo_run / "eval" / "report.json").read_text())
    assert report["shapes"]["ours"] == scores  # the run's own report agrees with this recount
    history = json.loads((demo_run / "trainer_state.json").read_text())["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]


# ----------------------------------------------------------------------------- resuming


class Interrupted(Exception):
    pass


def interrupt_after_checkpoint(monkeypatch, at_step: int):
    original = train_accelerate.save_checkpoint

    def save_then_crash(accelerator, args, state):
        original(accelerator, args, state)
        if state["step"] >= at_step:
            raise Interrupted(f"simulated crash after the checkpoint at step {state['step']}")

    monkeypatch.setattr(train_accelerate, "save_checkpoint", save_then_crash)


@pytest.mark.parametrize(
    "accumulation, checkpointing, crash_at",
    [("1", "3", 3), ("2", "2", 2), ("1", "epoch", 1)],
)
def test_interrupted_run_resumes_to_the_same_weights(
    tmp_path, small_shapes, monkeypatch, accumulation, checkpointing, crash_at
):
    common = ("--gradient_accumulation_steps", accumulation)
    straight = tmp_path / "straight"
    train_accelerate.main(tiny_run_args(small_shapes, straight, *common))

    resumed = tmp_path / "resumed"
    interrupt_after_checkpoint(monkeypatch, crash_at)
    with pytest.raises(Interrupted):
        train_accelerate.main(
            tiny_run_args(small_shapes, resumed, *common, "--checkpointing_steps", checkpointing)
        )
    monkeypatch.undo()
    train_accelerate.main(
        tiny_run_args(
            small_shapes,
            resumed,
            *common,
            "--checkpointing_steps",
            checkpointing,
            "--resume_from_checkpoint",
            "latest",
        )
    )

    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    history_a = json.loads((straight / "trainer_state.json").read_text())["history"]
    history_b = json.loads((resumed / "trainer_state.json").read_text())["history"]
    assert history_a == history_b and len(history_a) == 2


# ----------------------------------------------------------------------------- processes and scripts


def run_script(command: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_on_cpu_train_together_and_only_the_main_one_writes(tmp_path, small_shapes):
    output_dir = tmp_path / "ddp"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    result = run_script(
        launch
        + ["train_accelerate.py", *tiny_run_args(small_shapes, output_dir, "--checkpointing_steps", "epoch")],
        {"ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    # CLIP ran once per split (the main process first; the other one read the cache): the tower's own
    # bar starts once per split (a finished bar may be redrawn, so count starts, not ends)
    tower_bars = re.findall(r"(?<!caching )CLIP embeddings:   0%", result.stderr)
    assert len(tower_bars) == 3, result.stderr[-3000:]
    # one line per epoch in the samples log and one best model: a second writer would have doubled them
    lines = (output_dir / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert sorted(p.name for p in output_dir.iterdir()) == [
        "checkpoints",
        "loss_curve.png",
        "model",
        "samples.jsonl",
        "trainer_state.json",
    ]
    assert json.loads((output_dir / "model" / "training_args.json").read_text())["num_processes"] == 2


def test_plain_python_run_with_tensorboard_and_final_evaluation(tmp_path, small_shapes):
    pytest.importorskip(
        "tensorboard", reason="the tensorboard tracker needs the tensorboard package (dev extra)"
    )
    output_dir = tmp_path / "plain"
    args = [a for a in tiny_run_args(small_shapes, output_dir) if a != "--no_eval"]
    result = run_script(
        [
            sys.executable,
            "train_accelerate.py",
            *args,
            "--num_epochs",
            "1",
            "--report_to",
            "tensorboard",
            "--no_meteor",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model: " in result.stdout and "loss curve: " in result.stdout and "BLEU-4" in result.stdout
    assert list(output_dir.rglob("events.out.tfevents.*"))
    assert ClipLstmForImageCaptioning.from_pretrained(output_dir / "model").config.hidden_size == 24
    report = json.loads((output_dir / "eval" / "report.json").read_text())
    assert (
        report["num_images"] == 6
        and report["split"] == "test"
        and "most_frequent_caption" in report["models"]
    )
    assert json.loads((output_dir / "model" / "report.json").read_text()) == report  # the model card reads it


def test_trackio_tracking_works_offline(tmp_path, small_shapes):
    pytest.importorskip("trackio", reason="the trackio tracker needs the trackio package (dev extra)")
    result = run_script(
        [
            sys.executable,
            "train_accelerate.py",
            *tiny_run_args(small_shapes, tmp_path / "run"),
            "--num_epochs",
            "1",
            "--report_to",
            "trackio",
        ],
        {"HF_HOME": str(tmp_path / "hf")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "hf" / "trackio" / "clip-lstm-captioner.db").stat().st_size > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vision_config", "{not json"], "--vision_config"),
        (["--vision_model", "openai/clip-vit-base-patch32"], "offline"),
        (["--dataset", "no/such-dataset"], "shapes"),
    ],
)
def test_bad_arguments_fail_with_one_line(tmp_path, small_shapes, capsys, extra, message):
    args = tiny_run_args(small_shapes, tmp_path / "bad", "--num_epochs", "1") + extra  # later flags win
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(args)
    assert exited.value.code == 2
    errors = capsys.readouterr().err
    lines = errors.strip().splitlines()
    assert lines and lines[-1].startswith("train_accelerate.py: error: ") and message in lines[-1], errors[
        -2000:
    ]
    assert "Traceback" not in errors
    assert not (tmp_path / "bad" / "model").exists()


# ----------------------------------------------------------------------------- atomic saves


def test_a_crash_while_saving_keeps_the_previous_best_model(tmp_path):
    from tiny import tiny_model, tiny_processor

    folder = tmp_path / "model"
    model, processor = tiny_model(), tiny_processor()
    train_accelerate.save_model_atomically(model, processor, folder, {"run": 1})
    before = load_file(folder / "model.safetensors")

    class Broken(ClipLstmProcessor):
        def save_pretrained(self, *args, **kwargs):
            raise OSError("disk full")

    broken = Broken(processor.image_processor, processor.tokenizer)
    changed = tiny_model(seed=5)
    with pytest.raises(OSError, match="disk full"):
        train_accelerate.save_model_atomically(changed, broken, folder, {"run": 2})
    after = load_file(folder / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((folder / "training_args.json").read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half-written folder left behind


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    from tiny import tiny_model, tiny_processor

    folder = tmp_path / "model"
    train_accelerate.save_model_atomically(tiny_model(), tiny_processor(), folder, {})
    os.replace(folder, tmp_path / ".model.old")  # as if the process died right after the first rename
    train_accelerate.recover_interrupted_save(folder)
    assert ClipLstmForImageCaptioning.from_pretrained(folder).config.vocab_size == 12


def test_push_to_hub_publishes_the_best_model_folder(tmp_path, small_shapes, monkeypatch):
    published = []
    monkeypatch.setattr(
        train_accelerate, "publish", lambda folder, repo_id: published.append((folder, repo_id)) or "url"
    )
    output_dir = tmp_path / "pushed"
    train_accelerate.main(
        tiny_run_args(
            small_shapes,
            output_dir,
            "--num_epochs",
            "1",
            "--push_to_hub",
            "--hub_model_id",
            "someone/tiny-captioner",
        )
    )
    assert published == [(output_dir / "model", "someone/tiny-captioner")]


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    real_find_spec = train_accelerate.importlib.util.find_spec
    monkeypatch.setattr(
        train_accelerate.importlib.util,
        "find_spec",
        lambda name: None if name == "trackio" else real_find_spec(name),
    )
    with pytest.raises(ValueError, match=r"--report_to all: the trackio package is not installed"):
        train_accelerate.check_trackers("all")
    assert train_accelerate.check_trackers("none") is None
