"""Caption-generation speed of ClipLstmForImageCaptioning.generate(), with random weights, as JSON.

Measures, at the real decoder size (embed 512, hidden 512, `--num_layers` LSTM layers):
  1. captions/s for greedy and beam 5, for 1 image and a `--num_images` batch of random 768-d
     `image_embeds`, for each of `--vocab_sizes`;
  2. a plain per-image, per-beam Python beam search (the original project's approach) on a sample
     of images, and the per-image speed-up of our batched beam 5 over it; the same reference at the
     original project's size (embed 256, hidden 128, 2 layers, CLIP's 49,409 tokens) for context;
  3. single-image latency from `pixel_values` through a random real-size ViT-B/32 tower.

Random weights never pick EOS, so every caption runs to `max_new_tokens`: the headline numbers are
the worst case, and each case reports its mean generated length. `--eos_bias` adds extra,
clearly labelled runs in which some captions end early.

    python benchmarks/bench_generate.py --output bench_generate.json     # full run (minutes on a CPU)
    python benchmarks/bench_generate.py --quick                          # seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import CLIPVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from benchmarks.common import device_info, emit  # noqa: E402
from configuration_clip_lstm import ClipLstmConfig  # noqa: E402
from modeling_clip_lstm import ClipLstmForImageCaptioning  # noqa: E402

NUM_BEAMS = 5
CLIP_VOCAB_SIZE = 49409
IMAGE_EMBED_DIM = 768  # ViT-B/32 pooler_output
# The original project's decoder, and the per-image beam-search time it reported on this 2-core CPU.
ORIGINAL_DECODER = dict(embed_dim=256, hidden_size=128, num_layers=2, vocab_size=CLIP_VOCAB_SIZE)
ORIGINAL_REPORTED_S_PER_IMAGE = 0.42
CPU_SPEEDUP_TARGET = 50.0
GPU_TARGET_SECONDS = 1.0
GPU_TARGET_IMAGES = 1000
TARGET_GPUS = ("H100", "H200")
NOISY_CPU_SHARE = 0.10  # above this share of the CPU taken by other processes, CPU targets are not judged


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--num_images", type=int, default=1000, help="images in the batched cases (default 1000)"
    )
    parser.add_argument("--max_new_tokens", type=int, default=30, help="caption length limit (default 30)")
    parser.add_argument(
        "--vocab_sizes", default="8000,49409", help="comma-separated vocabulary sizes to time"
    )
    parser.add_argument(
        "--num_layers", type=int, default=1, help="LSTM layers of the decoder (config default 1)"
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32", help="decoder weights dtype"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed repeats of the single-image cases (median)"
    )
    parser.add_argument(
        "--reference_images", type=int, default=20, help="images timed with the slow reference"
    )
    parser.add_argument(
        "--eos_bias",
        type=float,
        default=0.0,
        help="if non-zero, also time the batched cases with peaked random decoder weights and this added to the "
        "EOS logit, so captions end at varied lengths (4 ends about 70%% of them before 30 tokens, mean 15-19 tokens); "
        "the headline numbers stay at full length",
    )
    parser.add_argument(
        "--skip_vit", action="store_true", help="skip the pixel_values / ViT-B/32 latency section"
    )
    parser.add_argument(
        "--skip_patches",
        action="store_true",
        help="skip the attention decoder over ViT-B/32-shaped patch tokens (50 x 768)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fast run: 50 images, 2 reference images, vocab 8000, no ViT"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights and inputs")
    parser.add_argument("--output", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.reference_images, args.vocab_sizes, args.skip_vit = 50, 2, "8000", True
        args.repeats = min(args.repeats, 2)
    args.vocab_sizes = [int(v) for v in args.vocab_sizes.split(",") if v.strip()]
    for name in ("num_images", "max_new_tokens", "num_layers", "repeats", "reference_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.vocab_sizes or min(args.vocab_sizes) < 4:
        raise ValueError(f"--vocab_sizes must list sizes >= 4, got {args.vocab_sizes}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the JSON."""
    print(f"[bench_generate] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- device and timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """Run fn once; returns (seconds, result), with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def median_time(fn, device: torch.device, repeats: int):
    """Median seconds of `repeats` runs of fn after one warm-up run; returns (seconds, last result)."""
    fn()
    times, result = [], None
    for _ in range(repeats):
        seconds, result = timed(fn, device)
        times.append(seconds)
    return statistics.median(times), result


def cpu_ticks() -> tuple[int, int, float] | None:
    """(machine-wide busy ticks, all ticks, this process's CPU seconds), or None off Linux."""
    if not os.path.exists("/proc/stat"):
        return None
    with open("/proc/stat") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]  # user .. steal, all cores
    own = os.times()
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks), own.user + own.system


def others_cpu_share(start, end) -> float | None:
    """Share of the machine's CPU time that other processes used between two `cpu_ticks()`.

    Shared machines are noisy: another busy process slows OpenMP kernels many times over, most of
    all the small batch-1 ones, so a run with a large share here is not to be trusted.
    """
    if start is None or end is None:
        return None
    own_ticks = (end[2] - start[2]) * os.sysconf("SC_CLK_TCK")
    return max(0.0, (end[0] - start[0] - own_ticks) / max(1, end[1] - start[1]))


def with_others_share(section, *args) -> dict:
    """Run one benchmark section; its figures plus the CPU share other processes took meanwhile."""
    start = cpu_ticks()
    figures = section(*args)
    return {**figures, "others_cpu_share": others_cpu_share(start, cpu_ticks())}


# ----------------------------------------------------------------------------- models and inputs


def build_model(vocab_size: int, device, dtype, vision_config=None, eos_bias: float = 0.0, **decoder):
    """A random ClipLstmForImageCaptioning; special ids laid out as CLIP's (..., BOS, EOS, PAD at the end).

    Without `vision_config` the tower is a 1-layer stand-in with CLIP's 768-d output: the image_embeds
    cases never run it, and building a full ViT-B/32 for them would only cost time and memory.
    """
    if vision_config is None:
        vision_config = dict(
            hidden_size=IMAGE_EMBED_DIM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    config = ClipLstmConfig(
        vision_config=vision_config,
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 3,
        eos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
        **decoder,
    )
    model = ClipLstmForImageCaptioning(config).eval()
    if eos_bias:
        make_captions_end(model, eos_bias)
    model.decoder.to(dtype)
    return model.to(device)


@torch.no_grad()
def make_captions_end(model, eos_bias: float, seed: int = 1) -> None:
    """Give the decoder peaked, image- and prefix-dependent next-token distributions and add `eos_bias`
    to EOS's logit, so captions end at varied lengths (the recipe of tests/tiny.py's peaked_model).

    With its default small initialisation a random decoder's logits barely depend on the input
    (std ~0.007), so a plain EOS bias ends every caption at once or none of them.
    """
    generator, decoder = torch.Generator().manual_seed(seed), model.decoder

    def fill(param, std):
        param.copy_(torch.randn(param.shape, generator=generator) * std)

    fill(decoder.embed_tokens.weight, 1.0)
    fill(decoder.image_projection.weight, 3.0)
    for param in decoder.lstm.parameters():
        fill(param, 1.5 / decoder.lstm.hidden_size**0.5)
    fill(decoder.lm_head.weight, 6.0 / decoder.lm_head.in_features**0.5)
    fill(decoder.lm_head.bias, 0.5)
    decoder.lm_head.bias[model.config.eos_token_id] += eos_bias


def random_image_embeds(count: int, device, seed: int, tokens: int | None = None) -> torch.Tensor:
    """(count, 768) pooled features, or (count, tokens, 768) patch tokens."""
    shape = (count, IMAGE_EMBED_DIM) if tokens is None else (count, tokens, IMAGE_EMBED_DIM)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def mean_generated_tokens(sequences: torch.Tensor, pad_token_id: int) -> float:
    """Mean tokens written per caption (EOS included, BOS and padding not)."""
    return float(((sequences != pad_token_id).sum(dim=1) - 1).float().mean())


# ----------------------------------------------------------------------------- the per-image reference


@torch.no_grad()
def reference_beam_search(model, image_embed: torch.Tensor, num_beams: int, max_new_tokens: int) -> list[int]:
    """Standard beam search for ONE image, one beam at a time, as the original project did it.

    Each live hypothesis runs the LSTM one step at batch 1, proposes its top `num_beams` tokens
    (read back with .item(), a host sync per candidate), and the best `num_beams` of all proposals
    survive; those ending in EOS leave the beam for the finished list, so the beam shrinks. It stops
    when no hypothesis is live or at `max_new_tokens`, and returns the best finished-or-live caption
    by length-normalised score (sum of log-probs / generated tokens, i.e. length_penalty 1.0,
    generate()'s default). PAD and BOS are never proposed, as in generate().
    """
    config = model.config
    banned = [config.pad_token_id, config.bos_token_id]
    state, _ = model.decoder.start(image_embed[None])  # a pooled decoder: no memory to attend over
    live = [([config.bos_token_id], 0.0, state)]  # (tokens, score, state)
    finished = []
    for _ in range(max_new_tokens):
        proposals = []
        for tokens, score, state in live:
            logits, next_state, _ = model.decoder.step(
                torch.tensor([tokens[-1]], device=image_embed.device), state
            )
            log_probs = F.log_softmax(logits[0].float(), dim=-1)
            log_probs[banned] = float("-inf")
            top = torch.topk(log_probs, num_beams)
            for log_prob, token in zip(top.values, top.indices, strict=True):
                proposals.append((tokens + [token.item()], score + log_prob.item(), next_state))
        proposals.sort(key=lambda proposal: proposal[1], reverse=True)
        live = []
        for proposal in proposals[: num_beams - len(finished)]:
            (finished if proposal[0][-1] == config.eos_token_id else live).append(proposal)
        if not live:
            break
    return max(finished + live, key=lambda hyp: hyp[1] / (len(hyp[0]) - 1))[0]


@contextlib.contextmanager
def onednn_disabled():
    """torch's oneDNN (mkldnn) CPU kernels off, LSTM included; native ATen kernels instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch notes that TF32 on oneDNN needs an Intel GPU
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def time_reference(model, image_embeds: torch.Tensor, max_new_tokens: int, device) -> tuple[float, list]:
    """Seconds per image of the reference over the given images (after a short warm-up)."""
    reference_beam_search(model, image_embeds[0], NUM_BEAMS, 2)
    seconds, captions = timed(
        lambda: [reference_beam_search(model, embed, NUM_BEAMS, max_new_tokens) for embed in image_embeds],
        device,
    )
    return seconds / len(image_embeds), captions


def agreement(reference_captions: list[list[int]], sequences: torch.Tensor, pad_token_id: int) -> float:
    """Share of images whose reference caption equals generate()'s (padding stripped)."""
    rows = [[t for t in row if t != pad_token_id] for row in sequences[: len(reference_captions)].tolist()]
    return sum(caption == row for caption, row in zip(reference_captions, rows, strict=True)) / len(rows)


# ----------------------------------------------------------------------------- the sections


def bench_case(model, embeds, num_beams: int, args, device, repeats: int):
    """(captions/s, seconds per batch, mean generated tokens, sequences) for one generate() setting.

    Batched cases warm up with a 2-token run at the same batch size (it builds the same kernels)
    and are timed once; they take seconds to minutes on a CPU.
    """
    run = lambda tokens: model.generate(image_embeds=embeds, num_beams=num_beams, max_new_tokens=tokens)  # noqa: E731
    if repeats > 1:
        seconds, sequences = median_time(lambda: run(args.max_new_tokens), device, repeats)
    else:
        run(2)
        seconds, sequences = timed(lambda: run(args.max_new_tokens), device)
    mean_tokens = mean_generated_tokens(sequences, model.config.pad_token_id)
    return len(embeds) / seconds, seconds, mean_tokens, sequences


def bench_vocab(vocab_size: int, args, device, dtype) -> dict:
    """Greedy and beam 5 at batch 1 and batch N, the reference, and the speed-up, for one vocabulary."""
    model = build_model(vocab_size, device, dtype, num_layers=args.num_layers)
    embeds = random_image_embeds(args.num_images, device, args.seed)
    out, batched_beams = bench_generate_cases(model, embeds, args, device)
    beams_per_s = out[f"beam{NUM_BEAMS}_batch{args.num_images}_captions_per_s"]
    out.update(
        bench_reference(model, embeds[: args.reference_images], batched_beams, beams_per_s, args, device)
    )
    if args.eos_bias:
        out.update(bench_early_eos(vocab_size, args, device, dtype, embeds))
    return out


def bench_generate_cases(model, embeds, args, device) -> tuple[dict, torch.Tensor]:
    """generate() greedy and beam 5, batch 1 and batch N; also returns the batched beam-5 captions."""
    out, n = {}, len(embeds)
    for name, beams in (("greedy", 1), (f"beam{NUM_BEAMS}", NUM_BEAMS)):
        for batch, repeats in ((1, args.repeats), (n, 1)):
            log(f"vocab {model.config.vocab_size}: {name}, batch {batch}")
            rate, seconds, tokens, sequences = bench_case(model, embeds[:batch], beams, args, device, repeats)
            out[f"{name}_batch{batch}_captions_per_s"] = rate
            out[f"{name}_batch{batch}_s_per_batch"] = seconds
            out[f"{name}_batch{batch}_mean_generated_tokens"] = tokens
    return out, sequences  # the last case run: beam 5 at batch n


def bench_reference(model, sample, batched_beams, beams_per_s: float, args, device) -> dict:
    """The per-image reference on `sample`, and batched beam 5's per-image speed-up over it."""
    log(f"vocab {model.config.vocab_size}: reference beam search on {len(sample)} images")
    seconds, captions = time_reference(model, sample, args.max_new_tokens, device)
    n = args.num_images
    out = {
        f"reference_beam{NUM_BEAMS}_s_per_image": seconds,
        "reference_images_timed": len(sample),
        # Near-uniform random log-probs make near-ties, which batch-1 and batch-N matmuls may round apart.
        "reference_same_caption_as_batched_fraction": agreement(
            captions, batched_beams, model.config.pad_token_id
        ),
        f"speedup_beam{NUM_BEAMS}_batch{n}_vs_reference_per_image": seconds * beams_per_s,
    }
    if device.type == "cpu":
        # torch's default oneDNN LSTM kernel is several times slower than the native one at batch 1;
        # the reference without it shows how much of the speed-up that accounts for.
        log(f"vocab {model.config.vocab_size}: reference beam search with oneDNN off")
        with onednn_disabled():
            seconds, _ = time_reference(model, sample, args.max_new_tokens, device)
        out[f"reference_beam{NUM_BEAMS}_onednn_off_s_per_image"] = seconds
        out[f"speedup_beam{NUM_BEAMS}_batch{n}_vs_reference_onednn_off_per_image"] = seconds * beams_per_s
    return out


def bench_early_eos(vocab_size: int, args, device, dtype, embeds) -> dict:
    """Batched greedy and beam 5 with an EOS bias, so captions end at varied lengths (not the headline)."""
    model = build_model(vocab_size, device, dtype, eos_bias=args.eos_bias, num_layers=args.num_layers)
    out = {}
    for name, beams in (("greedy", 1), (f"beam{NUM_BEAMS}", NUM_BEAMS)):
        log(f"vocab {vocab_size}: {name}, batch {len(embeds)}, eos_bias {args.eos_bias}")
        rate, _, tokens, sequences = bench_case(model, embeds, beams, args, device, 1)
        prefix = f"eos_bias_{name}_batch{len(embeds)}"
        out[f"{prefix}_captions_per_s"] = rate
        out[f"{prefix}_mean_generated_tokens"] = tokens
        out[f"{prefix}_ended_with_eos_fraction"] = float(
            (sequences == model.config.eos_token_id).any(1).float().mean()
        )
    return out


def bench_original_reference(args, device, dtype) -> dict:
    """The reference beam search at the original project's decoder size, for context."""
    log(f"original-size decoder: reference beam search on {args.reference_images} images")
    model = build_model(device=device, dtype=dtype, **ORIGINAL_DECODER)
    sample = random_image_embeds(args.reference_images, device, args.seed)
    seconds, _ = time_reference(model, sample, args.max_new_tokens, device)
    return {
        "decoder": dict(ORIGINAL_DECODER),
        f"reference_beam{NUM_BEAMS}_s_per_image": seconds,
        "reference_images_timed": args.reference_images,
        "original_project_reported_s_per_image_2core_cpu": ORIGINAL_REPORTED_S_PER_IMAGE,
    }


def bench_vit(args, device, dtype) -> dict:
    """Single-image latency from 224x224 pixel_values through a random ViT-B/32 tower."""
    vocab_size = max(args.vocab_sizes)
    log(f"ViT-B/32 single-image latency (vocab {vocab_size})")
    model = build_model(
        vocab_size, device, dtype, vision_config=CLIPVisionConfig(), num_layers=args.num_layers
    )
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(
        device
    )
    clip_s, _ = median_time(lambda: model.get_image_features(pixel_values), device, args.repeats)
    out = {"vocab_size": vocab_size, "image_size": size, "clip_forward_batch1_ms": clip_s * 1e3}
    for name, beams in (("greedy", 1), (f"beam{NUM_BEAMS}", NUM_BEAMS)):
        caption = functools.partial(
            model.generate, pixel_values=pixel_values, num_beams=beams, max_new_tokens=args.max_new_tokens
        )
        seconds, _ = median_time(caption, device, args.repeats)
        out[f"{name}_from_pixel_values_batch1_ms"] = seconds * 1e3
    return out


# ----------------------------------------------------------------------------- targets


def evaluate_targets(results: dict) -> list[dict]:
    """The project's speed targets, each with its figure and whether it is met.

    `met` is null, with the reason in `not_judged_because`, where this run cannot judge it.
    """
    targets = [cpu_speedup_target(results)]
    targets += [gpu_time_target(results, vocab_size) for vocab_size in results["settings"]["vocab_sizes"]]
    return targets


def cpu_speedup_target(results: dict) -> dict:
    n, device = results["settings"]["num_images"], results["device"]
    figures = results["image_embeds"].get("vocab_8000", {})
    speedup = figures.get(f"speedup_beam{NUM_BEAMS}_batch{n}_vs_reference_per_image")
    reason = None
    if device["type"] != "cpu":
        reason = f"measured on {device['type']}, not the CPU"
    elif speedup is None:
        reason = "vocab 8000 not measured"
    elif n != 1000:
        reason = f"batch of {n} images, not 1,000"
    elif (figures.get("others_cpu_share") or 0.0) > NOISY_CPU_SHARE:
        # a busy neighbour slows the batch-1 reference far more than the batched search
        reason = f"other processes used {figures['others_cpu_share']:.0%} of the CPU meanwhile; rerun on a quiet machine"
    return {
        "target": f"batched beam {NUM_BEAMS} at least {CPU_SPEEDUP_TARGET:g}x the per-image reference per image "
        "on the CPU with the 8k vocabulary",
        "measured_speedup": speedup,
        "met": None if reason else speedup >= CPU_SPEEDUP_TARGET,
        "not_judged_because": reason,
    }


def gpu_time_target(results: dict, vocab_size: int) -> dict:
    n, device = results["settings"]["num_images"], results["device"]
    seconds = results["image_embeds"][f"vocab_{vocab_size}"].get(f"beam{NUM_BEAMS}_batch{n}_s_per_batch")
    reason = None
    if device["type"] != "cuda" or not any(gpu in device["name"] for gpu in TARGET_GPUS):
        reason = f"measured on {device['name']}, not an H100/H200"
    elif n != GPU_TARGET_IMAGES or seconds is None:
        reason = f"batch of {n} images, not {GPU_TARGET_IMAGES:,}"
    return {
        "target": f"on an H100/H200, {GPU_TARGET_IMAGES:,} images with beam {NUM_BEAMS} in under "
        f"{GPU_TARGET_SECONDS:g} s (vocab {vocab_size})",
        "measured_s": seconds if n == GPU_TARGET_IMAGES else None,
        "met": None if reason else seconds < GPU_TARGET_SECONDS,
        "not_judged_because": reason,
    }


def bench_patches(vocab_size: int, args, device, dtype) -> dict:
    """The attention decoder over ViT-B/32's 50 x 768 tokens: greedy and beam 5 at batch N, and beam 5
    with the attention weights returned; compare with the same vocabulary's `image_embeds` figures."""
    model = build_model(
        vocab_size,
        device,
        dtype,
        num_layers=args.num_layers,
        image_feature="patches",
        attention_heads=16,
        layout_dim=16,
    )  # 16 heads and the layout summary: train_accelerate.py's defaults
    embeds = random_image_embeds(args.num_images, device, args.seed, tokens=model.config.num_image_tokens)
    out, n = {"image_tokens": model.config.num_image_tokens}, len(embeds)
    for name, beams in (("greedy", 1), (f"beam{NUM_BEAMS}", NUM_BEAMS)):
        log(f"patches, vocab {vocab_size}: {name}, batch {n}")
        rate, seconds, tokens, _ = bench_case(model, embeds, beams, args, device, 1)
        out[f"{name}_batch{n}_captions_per_s"] = rate
        out[f"{name}_batch{n}_s_per_batch"] = seconds
        out[f"{name}_batch{n}_mean_generated_tokens"] = tokens
    log(f"patches, vocab {vocab_size}: beam {NUM_BEAMS} with output_attentions, batch {n}")
    seconds, _ = timed(
        lambda: model.generate(
            image_embeds=embeds,
            num_beams=NUM_BEAMS,
            max_new_tokens=args.max_new_tokens,
            return_dict_in_generate=True,
            output_attentions=True,
        ),
        device,
    )
    out[f"beam{NUM_BEAMS}_batch{n}_with_attentions_s_per_batch"] = seconds
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    ticks_at_start = cpu_ticks()
    results = {
        "benchmark": "generate",
        "device": device_info(device),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "settings": {
            "num_images": args.num_images,
            "max_new_tokens": args.max_new_tokens,
            "vocab_sizes": args.vocab_sizes,
            "embed_dim": 512,
            "hidden_size": 512,
            "num_layers": args.num_layers,
            "num_beams": NUM_BEAMS,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "reference_images": args.reference_images,
            "eos_bias": args.eos_bias,
            "quick": args.quick,
            "seed": args.seed,
            "weights": "random",
            "reference_algorithm": "per image, per beam, batch-1 LSTM step, top-k per beam, .item() per candidate; "
            "finished hypotheses leave the beam; best by sum of log-probs / generated tokens",
            "timing": "batch-1 cases: median of `repeats` after a warm-up; batched cases and the reference: one "
            "run after a warm-up; device synchronised before each timer read",
            "note": "random weights never write EOS, so captions run to max_new_tokens (see *_mean_generated_tokens): "
            "the headline figures are the worst case",
        },
        "image_embeds": {
            f"vocab_{v}": with_others_share(bench_vocab, v, args, device, dtype) for v in args.vocab_sizes
        },
        "original_size_reference": None
        if args.quick
        else with_others_share(bench_original_reference, args, device, dtype),
        "vit_b32_pixel_values": None if args.skip_vit else with_others_share(bench_vit, args, device, dtype),
        "patch_tokens": None
        if args.skip_patches
        else {
            f"vocab_{v}": with_others_share(bench_patches, v, args, device, dtype) for v in args.vocab_sizes
        },
    }
    if device.type == "cpu":
        results["device"]["others_cpu_share_during_run"] = others_cpu_share(ticks_at_start, cpu_ticks())
    results["targets"] = evaluate_targets(results)
    return emit(results, args.output)


if __name__ == "__main__":
    main()
