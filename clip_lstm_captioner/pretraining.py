"""Contrastive pre-training of a small CLIP vision tower on a caption set: the offline demo's encoder.

The real pipeline freezes OpenAI's CLIP, trained on 400M image-text pairs. Offline there is no
such checkpoint, and a random tower keeps colour but loses shape (the demo's captions then name
the right colour but a random shape). So the demo first trains a small tower the way CLIP was
trained, matching each image to its caption among the others in a batch (symmetric InfoNCE),
on the training split only, then freezes it and trains the LSTM decoder on top, as with the real
CLIP. The text side is a bag of words: it only has to tell the tower which words matter.

    folder = pretrained_tower_folder(splits["train"], tokenizer, CLIPVisionConfig(**DEMO_VISION_CONFIG),
                                     cache_dir=default_cache_dir())
    model = ClipLstmForImageCaptioning.from_clip(str(folder), ...)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from processing import image_processor_for

from .files import write_text_atomic
from .images import pixel_batches


class BagOfWordsText(nn.Module):
    """Caption token ids -> (B, projection_dim): the mean of word embeddings through a small MLP."""

    def __init__(self, vocab_size: int, width: int, projection_dim: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, width, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, projection_dim))

    def forward(self, captions: list[list[int]]) -> torch.Tensor:
        flat = torch.tensor([token for caption in captions for token in caption])
        offsets = torch.tensor([0] + [len(caption) for caption in captions[:-1]]).cumsum(0)
        return self.mlp(self.embed(flat, offsets))


def _all_pixels(split: datasets.Dataset, image_processor) -> torch.Tensor:
    """(N, 3, H, W) preprocessed pixels of every image of the split, decoded once."""
    sources = split.cast_column("image", datasets.Image(decode=False))["image"]
    batches = pixel_batches(sources, image_processor, batch_size=256, num_workers=min(4, os.cpu_count() or 1))
    return torch.cat([pixels for pixels, _ in batches])


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
    """CLIP's symmetric cross-entropy: image i should pick caption i, and caption i image i."""
    image_features, text_features = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * image_features @ text_features.T  # (B, B)
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def pretrain_vision_tower(
    split: datasets.Dataset,
    tokenizer,
    vision_config: CLIPVisionConfig,
    *,
    steps: int = 400,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> tuple[CLIPVisionModelWithProjection, list[float]]:
    """Train a CLIP vision tower from scratch on `split`'s images and captions (one random caption
    of each sampled image per step); returns it in eval mode and the loss of every step.

    Example:
        tower, losses = pretrain_vision_tower(splits["train"], tokenizer, CLIPVisionConfig(image_size=96))
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = _all_pixels(split, image_processor_for(vision_config))
    captions = [tokenizer(texts)["input_ids"] for texts in split["captions"]]
    tower = CLIPVisionModelWithProjection(copy.deepcopy(vision_config))  # saving edits its config
    text = BagOfWordsText(len(tokenizer), vision_config.hidden_size, vision_config.projection_dim)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
    parameters = [*tower.parameters(), *text.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1
    )
    tower.train()
    losses = []
    for _ in tqdm(range(steps), desc="pre-training the demo's CLIP tower", unit="step"):
        images = torch.randint(0, len(captions), (batch_size,), generator=generator).tolist()
        picked = [
            captions[i][int(torch.randint(0, len(captions[i]), (1,), generator=generator))] for i in images
        ]
        loss = contrastive_loss(tower(pixel_values=pixels[images]).image_embeds, text(picked), logit_scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return tower.eval(), losses


def pretrained_tower_folder(
    split, tokenizer, vision_config, *, cache_dir: str | os.PathLike, steps: int = 400, seed: int = 0
) -> Path:
    """A folder holding the pre-trained tower (`save_pretrained`), trained on first use and reused after.

    The folder's name hashes everything the result depends on: the training rows, the caption
    vocabulary, the tower's shape, the steps and the seed. It is written to a temporary folder
    and renamed into place, so an interrupted run leaves nothing that a later run would trust.
    """
    key = hashlib.blake2b(digest_size=12)
    for part in (
        split._fingerprint,
        json.dumps(tokenizer.get_vocab(), sort_keys=True),
        vision_config.to_json_string(),
        steps,
        seed,
    ):
        key.update(str(part).encode())
    folder = Path(cache_dir) / "encoders" / f"shapes-clip-{key.hexdigest()}"
    if (folder / "config.json").exists():
        return folder
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    tower, losses = pretrain_vision_tower(split, tokenizer, vision_config, steps=steps, seed=seed)
    tower.save_pretrained(temporary)
    write_text_atomic(temporary / "pretraining_losses.json", json.dumps(losses))
    os.replace(temporary, folder)
    return folder
