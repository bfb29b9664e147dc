"""Tiny, deterministic builders shared by the tests: configs, models, tokenizers, images.

Everything here is offline: random CLIP towers from configs, tokenizers trained on strings
the tests write, images drawn with PIL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessorPil,
    BlipProcessor,
    CLIPVisionConfig,
)

from configuration_clip_lstm import ClipLstmConfig
from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import ClipLstmProcessor, build_caption_tokenizer, image_processor_for

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)
PAD, BOS, EOS = 0, 1, 2
TINY_BLOCK = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
# Tiny BLIP: its default token ids index outside a tiny vocabulary, so they are set explicitly.
BLIP_BOS, BLIP_EOS = 30, 2

TINY_CAPTIONS = [
    "a red circle on the left",
    "a big blue square in the middle",
    "a small green triangle at the top",
    "two shapes: a red circle and a blue square",
    "a yellow circle next to a purple triangle",
    "the blue square is above the red circle",
]


def tiny_config(**overrides) -> ClipLstmConfig:
    """A ClipLstmConfig with a 32-wide, 2-layer CLIP tower and a 24-wide decoder (2 attention heads)."""
    values = dict(
        vision_config=dict(TINY_VISION),
        vocab_size=12,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        embed_dim=16,
        hidden_size=24,
        num_layers=2,
        dropout=0.1,
        attention_heads=2,  # patches models: every attention test runs with several heads
        layout_dim=3,  # and with the layout summary
    )
    values.update(overrides)
    return ClipLstmConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> ClipLstmForImageCaptioning:
    torch.manual_seed(seed)
    return ClipLstmForImageCaptioning(tiny_config(**overrides)).eval()


def peaked_model(seed: int = 0, scale: float = 6.0, eos_bias: float = 2.0, **overrides):
    """A tiny model whose next-token distributions are peaked and depend on image and prefix
    (large random decoder weights), with `eos_bias` added to the EOS logit to end beams earlier
    or later, so that beam search has real decisions to make."""
    model = tiny_model(seed, **overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    decoder = model.decoder

    def fill(param, std):
        param.copy_(torch.randn(param.shape, generator=gen) * std)

    with torch.no_grad():
        fill(decoder.embed_tokens.weight, 1.0)
        fill(decoder.image_projection.weight, 3.0)
        for param in decoder.lstm.parameters():
            fill(param, 1.5 / decoder.lstm.hidden_size**0.5)
        fill(decoder.lm_head.weight, scale / decoder.lm_head.in_features**0.5)
        fill(decoder.lm_head.bias, 0.5)
        decoder.lm_head.bias[model.config.eos_token_id] += eos_bias
        if decoder.attention is not None:  # peaked attention too, so that where it looks matters
            for param in decoder.attention.parameters():
                fill(param, 3.0 / param.shape[-1] ** 0.5)
    return model


def image_embeds(
    batch: int, dim: int = TINY_VISION["hidden_size"], seed: int = 0, feature: str = "pooled"
) -> torch.Tensor:
    """Random raw CLIP features: (batch, dim), or (batch, tokens, dim) for `feature="patches"`."""
    tokens = 1 + (TINY_VISION["image_size"] // TINY_VISION["patch_size"]) ** 2
    shape = (batch, tokens, dim) if feature == "patches" else (batch, dim)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tiny_tokenizer():
    return build_caption_tokenizer(TINY_CAPTIONS, min_frequency=1)


def tiny_processor() -> ClipLstmProcessor:
    return ClipLstmProcessor(image_processor_for(CLIPVisionConfig(**TINY_VISION)), tiny_tokenizer())


def model_for_tokenizer(tokenizer, seed: int = 0, **overrides) -> ClipLstmForImageCaptioning:
    """A tiny model whose vocabulary and special ids follow `tokenizer`."""
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tiny_model(seed, **ids, **overrides)


def peaked_captioner(seed: int = 0, eos_bias: float = -1.0, **overrides):
    """A peaked (image-dependent) tiny model and its processor; captions are rarely empty.
    `overrides` are config fields (e.g. `image_feature="patches"`)."""
    processor = tiny_processor()
    tokenizer = processor.tokenizer
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return peaked_model(seed, eos_bias=eos_bias, vocab_size=len(tokenizer), **ids, **overrides), processor


def save_peaked_captioner(folder: Path, **overrides) -> Path:
    model, processor = peaked_captioner(**overrides)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def caption_files(model_dir: Path, paths: Iterable, **generate_kwargs) -> list[str]:
    """Captions of the image files `paths`, in one batch, from the model saved in `model_dir`, loaded
    with the project's own classes: what a script or the app should print for them."""
    model = ClipLstmForImageCaptioning.from_pretrained(model_dir).eval()
    processor = ClipLstmProcessor.from_pretrained(
        model_dir, trust_remote_code=False
    )  # our classes, no prompt
    ids = model.generate(**processor(images=list(paths)), **generate_kwargs)
    return processor.batch_decode(ids)


def coloured_image(colour=(200, 30, 30), size=(40, 30)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste(colour, (size[0] // 4, size[1] // 4, size[0] * 3 // 4, size[1] * 3 // 4))
    return image


def save_tiny_blip(folder: Path) -> Path:
    """A random 2-layer BLIP with a 100-word WordPiece tokenizer, saved to `folder`.

    The EOS logit is pushed down so that captions are never empty (a random model may stop at once).
    """
    vocab = ["[PAD]", "[UNK]", "[SEP]", "[CLS]", "[MASK]"] + ["a", "dog", "cat", "runs", "on", "the", "grass"]
    vocab += [f"word{i}" for i in range(BLIP_BOS - len(vocab))] + ["[DEC]"]
    vocab += [f"more{i}" for i in range(100 - len(vocab))]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)
    text = dict(
        TINY_BLOCK, vocab_size=100, bos_token_id=BLIP_BOS, eos_token_id=BLIP_EOS, sep_token_id=BLIP_EOS
    )
    config = BlipConfig(
        text_config=dict(text, pad_token_id=0, max_position_embeddings=64),
        vision_config=dict(TINY_BLOCK, image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[BLIP_EOS] = -100.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


PROJECT_MODULES = (
    "configuration_clip_lstm",
    "modeling_clip_lstm",
    "processing",
    "clip_lstm_captioner",
    "train_accelerate",
)


def block_imports(*modules: str) -> str:
    """Python source to start a script run in a fresh interpreter with: `modules` cannot be imported
    there (the project is installed in editable mode, so leaving PYTHONPATH out is not enough)."""
    return textwrap.dedent(
        f"""
        import importlib.abc, sys
        class _Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {set(modules)!r}:
                    raise ImportError(f"{{name}} is blocked in this test")
        sys.meta_path.insert(0, _Blocked())
        """
    )


def run_fresh(
    source: str,
    *args,
    cwd: Path,
    env: dict | None = None,
    hidden: Iterable[str] = PROJECT_MODULES,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run Python `source` (dedented) with `args` in a fresh interpreter in `cwd`, where the modules
    `hidden` cannot be imported; stdout and stderr are captured as text.

    `env` is the whole environment (default: this one); PYTHONPATH is always left out.
    """
    environment = dict(os.environ if env is None else env)
    environment.pop("PYTHONPATH", None)
    command = [sys.executable, "-c", block_imports(*hidden) + textwrap.dedent(source), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
