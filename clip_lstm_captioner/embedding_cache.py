"""The CLIP embedding cache: the frozen tower runs once per image, dataset and encoder.

`cache_image_embeds` adds an `image_embeds` column to a split, stored as a datasets cache file
named by `embedding_fingerprint` (rows, image files, encoder weights, feature choice,
preprocessing), so a second run reads it back and any change computes a new one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import datasets
import numpy as np
import torch

from .files import default_cache_dir
from .images import check_policy, pixel_batches


def _embed_images(sources, model, image_processor, batch_size: int, num_workers: int, on_bad_image: str):
    """(N, D) float32 CLIP features of `sources`; rows of skipped images are NaN."""
    features = np.full((len(sources), model.config.image_feature_dim), np.nan, dtype=np.float32)
    batches = pixel_batches(
        sources,
        image_processor,
        batch_size=batch_size,
        num_workers=num_workers,
        on_bad_image=on_bad_image,
        desc="CLIP embeddings",
    )
    for pixels, rows in batches:
        features[rows] = model.get_image_features(pixels).cpu().numpy()
    return features


def weights_digest(module: torch.nn.Module) -> str:
    """Identity of a module's weights: a hash of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _files_digest(dataset: datasets.Dataset) -> str:
    """Size and modification time of every image file, so an edited image is re-embedded."""
    digest = hashlib.blake2b(digest_size=16)
    for source in dataset.cast_column("image", datasets.Image(decode=False))["image"]:
        path = source.get("path")
        if path and not source.get("bytes") and os.path.exists(path):
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def embedding_fingerprint(
    dataset: datasets.Dataset, model, image_processor, encoder_digest: str | None = None
) -> str:
    """The cache key: the dataset's rows and files, the encoder's weights, the feature choice, preprocessing.

    Example:
        embedding_fingerprint(splits["test"], model, processor.image_processor)
        # -> 'clip-embeds-3f2a9c...'
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in (
        dataset._fingerprint,
        _files_digest(dataset),
        encoder_digest or weights_digest(model.vision_tower),
        model.config.image_feature,
        image_processor.to_json_string(),
    ):
        digest.update(str(part).encode())
    return f"clip-embeds-{digest.hexdigest()}"


def cache_image_embeds(
    dataset: datasets.Dataset,
    model,
    image_processor,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
    on_bad_image: str = "error",
    encoder_digest: str | None = None,
) -> datasets.Dataset:
    """Add an `image_embeds` column: each image's raw (unnormalised) CLIP feature, computed once.

    The frozen tower of `model` (a ClipLstmForImageCaptioning) runs inside one `datasets.map`
    call, with images decoded in parallel by DataLoader workers (forked `num_proc` workers do
    not mix with CUDA), in bfloat16 on CUDA. The result is a datasets cache file named by
    `embedding_fingerprint`: a second run with the same data, encoder, feature and preprocessing
    reads it back instead of running CLIP; changing any of them computes a new one. Under
    several processes call it inside `accelerator.main_process_first()` so it runs once.
    Unreadable images stop with their path (`on_bad_image="error"`) or are dropped ("skip").
    Pass `encoder_digest=weights_digest(model.vision_tower)` when caching several splits with
    one encoder, to hash its weights (350 MB for ViT-B/32) once instead of per split.

    Example:
        test = cache_image_embeds(splits["test"], model, processor.image_processor)
        test.with_format("torch")["image_embeds"].shape
        # -> torch.Size([250, 768])
    """
    check_policy(on_bad_image)
    key = embedding_fingerprint(dataset, model, image_processor, encoder_digest)
    folder = Path(cache_dir or default_cache_dir()) / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    features = undecoded.features.copy()
    features["image_embeds"] = datasets.List(datasets.Value("float32"), length=model.config.image_feature_dim)
    with_embeds = undecoded.map(
        lambda batch: {
            "image_embeds": _embed_images(
                batch["image"], model, image_processor, batch_size, workers, on_bad_image
            )
        },
        batched=True,
        batch_size=None,  # one call: the DataLoader inside does the batching and the parallel decoding
        features=features,
        cache_file_name=str(folder / f"{key}.arrow"),
        new_fingerprint=key,
        load_from_cache_file=True,
        desc="caching CLIP embeddings",
    )
    with_embeds = with_embeds.cast_column("image", datasets.Image())
    finite = torch.isfinite(image_embeds_of(with_embeds)).all(dim=1)
    return with_embeds if finite.all() else with_embeds.select(torch.nonzero(finite).flatten().tolist())


def image_embeds_of(split: datasets.Dataset) -> torch.Tensor:
    """The `image_embeds` column of a cached split as one (N, D) float32 tensor.

    Example:
        image_embeds_of(test).shape
        # -> torch.Size([250, 768])
    """
    return split.with_format("torch", columns=["image_embeds"])[:]["image_embeds"].float()
