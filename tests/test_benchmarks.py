"""benchmarks/bench_generate.py: a tiny end-to-end run, its reference beam search, its target verdicts."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from tiny import EOS, PAD, image_embeds, peaked_model

from benchmarks import bench_generate

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_generate.py"


def test_quick_run_prints_json_with_every_figure(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--max_new_tokens",
            "4",
            "--device",
            "cpu",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # another folder: the script finds the package
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)  # stdout is the JSON alone; progress goes to stderr
    assert json.loads(output.read_text()) == printed
    assert printed["device"]["type"] == "cpu" and printed["settings"]["num_images"] == 50
    figures = printed["image_embeds"]["vocab_8000"]
    for name in ("greedy", "beam5"):
        for batch in (1, 50):
            assert figures[f"{name}_batch{batch}_captions_per_s"] > 0
            # random weights never write EOS: every caption runs to the limit, and the JSON says so
            assert figures[f"{name}_batch{batch}_mean_generated_tokens"] == 4.0
    assert figures["reference_beam5_s_per_image"] > 0 and figures["reference_images_timed"] == 2
    speedup = figures["speedup_beam5_batch50_vs_reference_per_image"]
    assert speedup == figures["reference_beam5_s_per_image"] * figures["beam5_batch50_captions_per_s"]
    assert printed["original_size_reference"] is None and printed["vit_b32_pixel_values"] is None
    cpu_target = printed["targets"][0]
    assert cpu_target["measured_speedup"] == speedup
    assert cpu_target["met"] is None  # judged only on the 1,000-image batch it is stated for
    assert cpu_target["not_judged_because"] == "batch of 50 images, not 1,000"
    assert all(target["met"] is None for target in printed["targets"][1:])  # no GPU here


def test_reference_beam_search_matches_generate_when_no_caption_ends():
    # Without EOS both are plain beam search over the same candidates; peaked logits leave no near-ties.
    model = peaked_model(seed=4, eos_bias=-1e4)
    feats = image_embeds(6, seed=4)
    batched = model.generate(image_embeds=feats, num_beams=5, max_new_tokens=6)
    for i in range(6):
        caption = bench_generate.reference_beam_search(model, feats[i], num_beams=5, max_new_tokens=6)
        assert caption == batched[i].tolist()
        assert len(caption) == 7 and EOS not in caption and PAD not in caption


def test_reference_beam_search_ends_captions_at_eos():
    model = peaked_model(seed=0, eos_bias=6.0)
    caption = bench_generate.reference_beam_search(
        model, image_embeds(1, seed=0)[0], num_beams=5, max_new_tokens=6
    )
    assert caption[-1] == EOS and EOS not in caption[:-1] and len(caption) < 7


def fake_results(
    device: dict, num_images: int, speedup: float, beam_seconds: float, others_share=0.0
) -> dict:
    figures = {
        f"speedup_beam5_batch{num_images}_vs_reference_per_image": speedup,
        f"beam5_batch{num_images}_s_per_batch": beam_seconds,
        "others_cpu_share": others_share,
    }
    return {
        "device": device,
        "settings": {"num_images": num_images, "vocab_sizes": [8000]},
        "image_embeds": {"vocab_8000": figures},
    }


def test_targets_are_judged_only_on_the_matching_device_batch_and_a_quiet_machine():
    cpu = {"type": "cpu", "name": "Some Xeon"}
    h100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    other_gpu = {"type": "cuda", "name": "NVIDIA A10G"}
    verdicts = lambda results: [t["met"] for t in bench_generate.evaluate_targets(results)]  # noqa: E731
    assert verdicts(fake_results(cpu, 1000, 60.0, 20.0)) == [True, None]
    assert verdicts(fake_results(cpu, 1000, 40.0, 20.0)) == [False, None]
    assert verdicts(fake_results(cpu, 50, 60.0, 1.0)) == [None, None]
    assert verdicts(fake_results(h100, 1000, 60.0, 0.5)) == [None, True]
    assert verdicts(fake_results(h100, 1000, 60.0, 1.5)) == [None, False]
    assert verdicts(fake_results(other_gpu, 1000, 60.0, 0.5)) == [None, None]
    # a busy neighbour inflates the speed-up (the batch-1 reference suffers most): no verdict, and why
    noisy = bench_generate.evaluate_targets(fake_results(cpu, 1000, 60.0, 20.0, others_share=0.4))
    assert noisy[0]["met"] is None and "40%" in noisy[0]["not_judged_because"]
    assert (
        bench_generate.evaluate_targets(fake_results(cpu, 1000, 60.0, 20.0))[0]["not_judged_because"] is None
    )


def test_eos_bias_makes_captions_end_at_varied_lengths():
    # The headline runs never end early; --eos_bias must give a mix, or its figures say nothing new.
    cpu = torch.device("cpu")
    model = bench_generate.build_model(8000, cpu, torch.float32, eos_bias=4.0)
    sequences = model.generate(
        image_embeds=bench_generate.random_image_embeds(50, cpu, 0), num_beams=1, max_new_tokens=10
    )
    lengths = (sequences != model.config.pad_token_id).sum(1) - 1
    assert 1 <= int(lengths.min()) < int(lengths.max()) == 10
    assert 0.0 < float((sequences == model.config.eos_token_id).any(1).float().mean()) < 1.0


REHEARSAL = Path(__file__).resolve().parent.parent / "benchmarks" / "rehearsal.py"


def test_rehearsal_runs_every_stage_at_a_tiny_size(tmp_path):
    # The benchmark itself is minutes to hours; here 24 images and a tiny tower check that it runs.
    command = [sys.executable, str(REHEARSAL), "--num_images", "24", "--tiny_tower", "--num_workers", "0"]
    command += ["--workdir", str(tmp_path / "work"), "--output", str(tmp_path / "rehearsal.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(
        result.stdout
    )  # stdout is the JSON alone; the training script's output goes to stderr
    assert json.loads((tmp_path / "rehearsal.json").read_text()) == printed
    assert set(printed["stages_seconds"]) == set(rehearsal_stages())
    assert all(seconds > 0 for seconds in printed["stages_seconds"].values()), printed["stages_seconds"]
    assert printed["device"]["type"] == "cpu" and printed["settings"]["num_images"] == 24
    assert printed["epochs_run"] == 1 and printed["cache_images_per_s"] > 0
    evaluation = printed["evaluation"]
    assert (
        evaluation["num_images"] == 3 and evaluation["generation"]["num_beams"] == 5
    )  # the seeded test split
    assert evaluation["captioning_seconds"] > 0 and 0 <= evaluation["bleu_4"] <= 1
    assert printed["peak_memory"]["process_rss_mib"] > 0
    assert (tmp_path / "work" / "flickr8k" / "captions.txt").read_text().count("\n") == 1 + 24 * 5


def rehearsal_stages():
    from benchmarks import rehearsal

    return rehearsal.STAGES
