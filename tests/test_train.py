"""train_accelerate.py: the offline demo's bar, resuming, two processes, atomic saves, errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_VISION

import train_accelerate
from clip_lstm_captioner import run_folder
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
    assert model.config.image_feature == "patches" and model.decoder.layout is not None
    assert scores["colour_accuracy"] >= 0.85  # the bar; chance is 1/7
    # A guard, below the 86-90% the demo measured on three seeds and above pooled demos (46-78%):
    # a random tower gives ~0.26, chance is 1/4.
    assert scores["shape_accuracy"] >= 0.8
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
    run_folder.save_model_atomically(model, processor, folder, {"run": 1})
    before = load_file(folder / "model.safetensors")

    class Broken(ClipLstmProcessor):
        def save_pretrained(self, *args, **kwargs):
            raise OSError("disk full")

    broken = Broken(processor.image_processor, processor.tokenizer)
    changed = tiny_model(seed=5)
    with pytest.raises(OSError, match="disk full"):
        run_folder.save_model_atomically(changed, broken, folder, {"run": 2})
    after = load_file(folder / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((folder / "training_args.json").read_text()) == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no half-written folder left behind


def test_a_crash_between_the_renames_is_recovered(tmp_path):
    from tiny import tiny_model, tiny_processor

    folder = tmp_path / "model"
    run_folder.save_model_atomically(tiny_model(), tiny_processor(), folder, {})
    os.replace(folder, tmp_path / ".model.old")  # as if the process died right after the first rename
    run_folder.recover_interrupted_save(folder)
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


# ----------------------------------------------------------------------------- flags, checked before any work


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--checkpointing_steps", "0"),
        ("--checkpointing_steps", "-5"),
        ("--checkpointing_steps", "abc"),
        ("--gradient_accumulation_steps", "0"),
        ("--num_epochs", "0"),
        ("--batch_size", "-1"),
        ("--max_train_steps", "0"),
        ("--checkpoints_total_limit", "0"),
        ("--learning_rate", "nan"),
        ("--warmup_ratio", "1.5"),
        ("--dropout", "1"),
        ("--num_sample_images", "-1"),
    ],
)
def test_bad_flag_values_are_named_before_any_work(tmp_path, capsys, flag, value):
    # The dataset does not exist: had the flags been checked after loading data, the error would name it instead.
    args = tiny_run_args(tmp_path / "no-such-dataset", tmp_path / "run") + [flag, value]
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(args)
    assert exited.value.code == 2
    errors = capsys.readouterr().err
    last = errors.strip().splitlines()[-1]
    assert last.startswith("train_accelerate.py: error: ") and flag in last, errors[-2000:]
    assert "no-such-dataset" not in errors and "Traceback" not in errors
    assert not (tmp_path / "run").exists()  # nothing was created


def test_attention_heads_that_do_not_divide_the_widths_are_named_before_any_work(tmp_path, capsys):
    args = tiny_run_args(tmp_path / "no-such-dataset", tmp_path / "run")
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(args + ["--image_feature", "patches", "--attention_heads", "3"])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train_accelerate.py: error: --attention_heads 3 must divide --embed_dim"), last
    assert not (tmp_path / "run").exists()
    pooled = train_accelerate.parse_args(args + ["--attention_heads", "3"])  # unused: no error
    assert pooled.attention_heads == 3


def test_overwrite_and_resume_together_are_refused(tmp_path, capsys):
    args = tiny_run_args(tmp_path / "data", tmp_path / "run", "--overwrite_output_dir")
    with pytest.raises(SystemExit):
        train_accelerate.main(args + ["--resume_from_checkpoint", "latest"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--overwrite_output_dir" in last and "--resume_from_checkpoint" in last


# ----------------------------------------------------------------------------- one run per folder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_shapes):
    """A finished two-epoch tiny run with a checkpoint at each epoch end (step_12, step_24)."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    train_accelerate.main(tiny_run_args(small_shapes, output_dir, "--checkpointing_steps", "epoch"))
    assert sorted(p.name for p in (output_dir / "checkpoints").iterdir()) == ["step_12", "step_24"]
    return output_dir


def copy_run(finished_run: Path, destination: Path) -> Path:
    shutil.copytree(finished_run, destination)
    return destination


def cached_args(small_shapes, finished_run, output_dir, *extra):
    """The finished run's arguments, into `output_dir`, reusing its embedding cache."""
    cache = str(finished_run.parent / "cache")
    return tiny_run_args(small_shapes, output_dir, "--checkpointing_steps", "epoch", *extra) + [
        "--data_cache_dir",
        cache,
    ]


def test_a_rerun_into_a_finished_run_is_refused_and_overwrite_starts_clean(
    tmp_path, small_shapes, finished_run, capsys
):
    run = copy_run(finished_run, tmp_path / "run")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(cached_args(small_shapes, finished_run, run, "--num_epochs", "1"))
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train_accelerate.py: error: --output_dir ") and "--overwrite_output_dir" in last
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # the old run, byte for byte, and no lock file left behind

    (run / "notes.txt").write_text("mine")  # not a file of the run: left alone
    train_accelerate.main(
        cached_args(small_shapes, finished_run, run, "--num_epochs", "1", "--overwrite_output_dir")
    )
    lines = (run / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]  # not the old run's 1, 2 then 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_12"]
    assert len(json.loads((run / "trainer_state.json").read_text())["history"]) == 1
    assert (run / "notes.txt").read_text() == "mine"
    assert not list(run.glob(".*lock*"))


def test_resume_continues_the_runs_best_loss_record(tmp_path, small_shapes, finished_run, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_24")
    state_file = run / "checkpoints" / "step_12" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["best_val_loss"] = 0.0  # a record that epoch 2 cannot beat
    state_file.write_text(json.dumps(state))
    model_before = (run / "model" / "model.safetensors").read_bytes()
    capsys.readouterr()
    train_accelerate.main(cached_args(small_shapes, finished_run, run, "--resume_from_checkpoint", "latest"))
    out = capsys.readouterr()
    assert "epoch 2:" in out.out + out.err and "best so far" not in out.out + out.err
    assert (run / "model" / "model.safetensors").read_bytes() == model_before
    final = json.loads((run / "trainer_state.json").read_text())
    assert final["best_val_loss"] == 0.0 and final["bad_epochs"] == 1


def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom clip_lstm_captioner import run_folder\n"
            "with run_folder.output_dir_lock(__import__('pathlib').Path(sys.argv[1])):\n"
            "    print('locked', flush=True); sys.stdin.read()",
            str(run),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exited:
            train_accelerate.main(tiny_run_args(tmp_path / "data", run))
        assert exited.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "in use" in last and f"pid {holder.pid}" in last and str(run) in last, last
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # The holder died without cleaning up: its lock file (and pid) remain, but the kernel released the lock.
    assert list(run.iterdir())
    with run_folder.output_dir_lock(run) as lock_file:
        assert lock_file.read_text().strip() == str(os.getpid())
    assert not list(run.iterdir())


# ----------------------------------------------------------------------------- checkpoints


def damage(checkpoint: Path, how: str) -> None:
    if how == "empty folder":
        shutil.rmtree(checkpoint)
        checkpoint.mkdir()
    elif how == "no trainer_state.json":
        (checkpoint / "trainer_state.json").unlink()
    elif how == "truncated model.safetensors":
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize("how", ["empty folder", "no trainer_state.json", "truncated model.safetensors"])
def test_a_named_broken_checkpoint_is_refused_in_one_line(tmp_path, small_shapes, finished_run, capsys, how):
    checkpoint = shutil.copytree(finished_run / "checkpoints" / "step_12", tmp_path / "step_12")
    damage(checkpoint, how)
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(
            cached_args(
                small_shapes, finished_run, tmp_path / "run", "--resume_from_checkpoint", str(checkpoint)
            )
        )
    assert exited.value.code == 2
    errors = capsys.readouterr().err
    last = errors.strip().splitlines()[-1]
    assert last.startswith("train_accelerate.py: error: --resume_from_checkpoint") and str(checkpoint) in last
    assert "Traceback" not in errors


def test_latest_skips_a_half_written_checkpoint_and_resumes_bit_identically(
    tmp_path, small_shapes, finished_run, capsys
):
    run = copy_run(finished_run, tmp_path / "run")
    damage(run / "checkpoints" / "step_24", "empty folder")  # what SIGKILL during an older save left
    capsys.readouterr()
    train_accelerate.main(cached_args(small_shapes, finished_run, run, "--resume_from_checkpoint", "latest"))
    out = capsys.readouterr()
    assert "step_24" in out.err and "incomplete" in out.err, out.err[-2000:]
    assert "resumed from" in out.out and "step_12" in out.out
    a = load_file(finished_run / "model" / "model.safetensors")
    b = load_file(run / "model" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_checkpoints_are_renamed_into_place_only_when_complete(tmp_path, small_shapes, monkeypatch, capsys):
    from accelerate import Accelerator

    original = Accelerator.save_state

    def save_then_fail(self, output_dir=None, **kwargs):
        original(self, output_dir, **kwargs)  # every file written, then the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456")

    monkeypatch.setattr(Accelerator, "save_state", save_then_fail)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(tiny_run_args(small_shapes, run, "--checkpointing_steps", "epoch"))
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot write the checkpoint" in last and "step_12" in last, last
    assert list((run / "checkpoints").iterdir()) == []  # no half-written step_12, no temporary folder


def test_a_corrupt_random_state_file_is_named_on_resume(tmp_path, small_shapes, finished_run, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_24")
    (run / "checkpoints" / "step_12" / "random_states_0.pkl").write_bytes(b"not a pickle")
    capsys.readouterr()
    train_accelerate.main(cached_args(small_shapes, finished_run, run, "--resume_from_checkpoint", "latest"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "random_states_0.pkl" in line]
    assert len(warnings) == 1 and "not be bit-identical" in warnings[0], warnings


# ----------------------------------------------------------------------------- tiny data, broken numbers, full disks


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    """The documented minimum: 3 images, so 1 training image."""
    return make_shapes_dataset(tmp_path_factory.mktemp("three") / "set", num_images=3, seed=2)


def test_one_training_image_trains_a_finite_model(tmp_path, three_images):
    run = tmp_path / "run"
    train_accelerate.main(tiny_run_args(three_images, run, "--num_epochs", "1"))
    weights = load_file(run / "model" / "model.safetensors")
    assert all(tensor.isfinite().all() for tensor in weights.values())
    history = json.loads((run / "trainer_state.json").read_text())["history"]
    assert all(torch.isfinite(torch.tensor([h["train_loss"], h["val_loss"]])).all() for h in history)


def test_a_patches_run_trains_from_its_float16_token_cache(tmp_path, small_shapes):
    run = tmp_path / "run"
    train_accelerate.main(tiny_run_args(small_shapes, run, "--image_feature", "patches", "--num_epochs", "1"))
    model = ClipLstmForImageCaptioning.from_pretrained(run / "model")
    assert model.config.image_feature == "patches"
    assert model.config.attention_heads == 16 and model.config.layout_dim == 16  # the script's defaults
    assert model.decoder.layout is not None
    assert all(tensor.isfinite().all() for tensor in load_file(run / "model" / "model.safetensors").values())
    files = list((tmp_path / "cache" / "embeddings").iterdir())
    assert len(files) == 3 and all(path.suffix == ".arrow" for path in files)  # the splits; no temporaries
    caches = [image_embeds_of(datasets.Dataset.from_file(str(path))) for path in files]
    assert all(embeds.dtype == torch.float16 and embeds.shape[1:] == (17, 32) for embeds in caches)


def test_image_statistics_ignore_broken_rows_and_need_two_rows_for_a_spread():
    from tiny import tiny_model

    model = tiny_model()
    one = torch.randn(1, model.config.image_feature_dim)
    model.fit_image_statistics(one)
    assert torch.equal(model.decoder.image_embeds_std, torch.ones_like(model.decoder.image_embeds_std))
    assert model.decoder.prepare_image_embeds(one).abs().max() < 1e-5  # centred on its one image
    rows = torch.randn(6, model.config.image_feature_dim)
    model.fit_image_statistics(rows[:4])
    expected = model.decoder.image_embeds_mean.clone(), model.decoder.image_embeds_std.clone()
    broken = rows.clone()
    broken[4, 0], broken[5, 3] = float("nan"), float("inf")
    model.fit_image_statistics(torch.cat([rows[:4], broken[4:]]))
    assert torch.equal(model.decoder.image_embeds_mean, expected[0])
    assert torch.equal(model.decoder.image_embeds_std, expected[1])
    with pytest.raises(ValueError, match="no finite"):
        model.fit_image_statistics(broken[4:])


@pytest.mark.parametrize("which", ["training", "validation"])
def test_a_non_finite_loss_stops_in_one_line_and_saves_nothing(
    tmp_path, three_images, monkeypatch, capsys, which
):
    if which == "validation":
        monkeypatch.setattr(train_accelerate, "validation_loss", lambda *args: float("nan"))
    else:
        original = train_accelerate.training_step
        monkeypatch.setattr(train_accelerate, "training_step", lambda *args: original(*args) * float("inf"))
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(tiny_run_args(three_images, run, "--num_epochs", "1"))
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train_accelerate.py: error: ") and f"{which} loss" in last, last
    assert not (run / "model").exists()


def test_a_full_disk_while_saving_the_best_model_is_one_line(tmp_path, three_images, monkeypatch, capsys):
    from safetensors import SafetensorError

    def disk_full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ClipLstmForImageCaptioning, "save_pretrained", disk_full)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        train_accelerate.main(tiny_run_args(three_images, run, "--num_epochs", "1"))
    assert exited.value.code == 2
    errors = capsys.readouterr().err
    last = errors.strip().splitlines()[-1]
    assert "cannot save the best model" in last and "No space left on device" in last, last
    assert "Traceback" not in errors and not (run / "model").exists()
    assert not list(run.glob(".model*"))


# ----------------------------------------------------------------------------- what the run records


# The launched script: train_accelerate.main, with one concession to these test machines, whose CPUs
# have no oneDNN LSTM kernel for bf16 ("could not create a primitive descriptor"): autocast is left
# off. The Accelerator's mixed precision still comes from the launcher, which is what is recorded.
LAUNCHED_WITHOUT_CPU_AUTOCAST = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import train_accelerate


class CpuAccelerator(train_accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.native_amp = False  # no autocast around forward (prepare) or in accelerator.autocast()


train_accelerate.Accelerator = CpuAccelerator
train_accelerate.main(sys.argv[1:])
"""


def test_mixed_precision_chosen_by_the_launcher_is_recorded(tmp_path, three_images):
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED_WITHOUT_CPU_AUTOCAST)
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
    args = tiny_run_args(three_images, run, "--num_epochs", "1")
    result = run_script(launch + [str(script), str(ROOT), *args])
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((run / "model" / "training_args.json").read_text())
    assert recorded["mixed_precision"] == "bf16"
    from clip_lstm_captioner.publishing import write_model_card

    card = write_model_card(run / "model", training_args=recorded).read_text()
    assert "| mixed_precision | bf16 |" in card


def test_the_demo_replaces_its_own_run_but_no_other_folder(tmp_path):
    assert train_accelerate.parse_args(["--demo"]).overwrite_output_dir
    assert not train_accelerate.parse_args(["--demo", "--output_dir", str(tmp_path)]).overwrite_output_dir
    assert not train_accelerate.parse_args(
        ["--demo", "--resume_from_checkpoint", "latest"]
    ).overwrite_output_dir
    assert not train_accelerate.parse_args(["--output_dir", str(tmp_path)]).overwrite_output_dir
