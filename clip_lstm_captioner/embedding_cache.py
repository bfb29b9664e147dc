"""The CLIP embedding cache: the frozen tower runs once per image, dataset and encoder.

`cache_image_embeds` adds an `image_embeds` column to a split, stored as a datasets cache file
named by `embedding_fingerprint` (rows, image files, encoder weights, feature choice,
preprocessing), so a second run reads it back and any change computes a new one. Under
`accelerate launch` every process encodes its own share of the images and the main process
writes the one cache file. `image_embeds_of` reads the column without copying it out of the
memory-mapped file, so memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import torch

from .distributed import share_of, workers_per_process
from .files import atomic_write, default_cache_dir
from .images import check_policy, pixel_batches

# Stands in for an Accelerator when the caller passes none: one process does everything.
ONE_PROCESS = SimpleNamespace(
    num_processes=1, process_index=0, is_main_process=True, wait_for_everyone=lambda: None
)


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
    accelerator=None,
) -> datasets.Dataset:
    """Add an `image_embeds` column: each image's raw (unnormalised) CLIP feature, computed once.

    The frozen tower of `model` (a ClipLstmForImageCaptioning) runs with images decoded in
    parallel by DataLoader workers (forked `num_proc` workers do not mix with CUDA), in bfloat16
    on CUDA. The result is a datasets cache file named by `embedding_fingerprint`: a second run
    with the same data, encoder, feature and preprocessing reads it back instead of running CLIP;
    changing any of them computes a new one. Unreadable images stop with their path
    (`on_bad_image="error"`) or are dropped ("skip"). Pass `encoder_digest=weights_digest(
    model.vision_tower)` when caching several splits with one encoder, to hash its weights (350 MB
    for ViT-B/32) once instead of per split.

    Under `accelerate launch`, pass the `accelerator` (or accelerate's `PartialState`) and call it
    on every process: each encodes a contiguous run of whole batches (the same batches one process
    would run, so the values are identical), saves it beside the cache, and the main process joins
    the parts into the one cache file, under the same name a single process writes. `cache_dir`
    must be shared by the processes (one machine, or a shared file system). The file appears
    only complete, so a crash of any process leaves nothing a later run would read. Decoding
    workers default to the CPU cores shared out between the processes.

    Example:
        test = cache_image_embeds(splits["test"], model, processor.image_processor)
        image_embeds_of(test).shape
        # -> torch.Size([250, 768])
    """
    check_policy(on_bad_image)
    processes = accelerator or ONE_PROCESS
    key = embedding_fingerprint(dataset, model, image_processor, encoder_digest)
    folder = Path(cache_dir or default_cache_dir()) / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    if not _main_says_cached(folder / f"{key}.arrow", processes):
        workers = workers_per_process(num_workers, processes.num_processes)
        rows = share_of(undecoded.num_rows, processes, block=batch_size)
        sources = undecoded.select(rows)["image"] if len(rows) else []
        share = _embed_images(sources, model, image_processor, batch_size, workers, on_bad_image)
        parts = _exchange_parts(share, folder, key, processes)
        if processes.is_main_process:
            _write_cache(undecoded, np.concatenate(parts), folder, key, share.shape[1])
            for part in _part_paths(folder, key, processes.num_processes):
                part.unlink(missing_ok=True)
        processes.wait_for_everyone()
    with_embeds = _write_cache(undecoded, None, folder, key, model.config.image_feature_dim)  # read back
    with_embeds = with_embeds.cast_column("image", datasets.Image())
    finite = np.isfinite(image_embeds_of(with_embeds).numpy()).all(axis=1)
    return with_embeds if finite.all() else with_embeds.select(np.flatnonzero(finite).tolist())


def _main_says_cached(path: Path, processes) -> bool:
    """Whether the cache file exists, as the main process saw it, so all processes take one branch."""
    found = [path.is_file()]
    if processes.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(found, from_process=0)
    return found[0]


def _part_paths(folder: Path, key: str, num_processes: int) -> list[Path]:
    return [folder / f".{key}.part-{rank}-of-{num_processes}.npy" for rank in range(num_processes)]


def _exchange_parts(share: np.ndarray, folder: Path, key: str, processes) -> list[np.ndarray] | None:
    """Every process's (n_i, D) features on the main process, in process order; None elsewhere.

    With several processes each part goes through a file beside the cache (written atomically,
    read after everyone has written): the features of a whole dataset are too big to pickle
    through torch.distributed.
    """
    if processes.num_processes == 1:
        return [share]
    paths = _part_paths(folder, key, processes.num_processes)
    with atomic_write(paths[processes.process_index], "wb") as file:
        np.save(file, share)
    processes.wait_for_everyone()
    return [np.load(path) for path in paths] if processes.is_main_process else None


def _write_cache(
    undecoded: datasets.Dataset, image_embeds: np.ndarray | None, folder: Path, key: str, dim: int
):
    """The split with its `image_embeds` column as the datasets cache file `<key>.arrow`.

    With `image_embeds` None the file must exist already and is read back. The column is written
    as one record batch, so `image_embeds_of` can view it as one (N, D) array without a copy.
    datasets writes the file under a temporary name and renames it when complete.
    """

    def add_column(batch):
        if image_embeds is None:
            raise FileNotFoundError(
                f"{folder / key}.arrow: the main process did not write the embedding cache"
            )
        return {"image_embeds": image_embeds}

    features = undecoded.features.copy()
    features["image_embeds"] = datasets.List(datasets.Value("float32"), length=dim)
    return undecoded.map(
        add_column,
        batched=True,
        batch_size=None,  # one call with every row
        writer_batch_size=max(undecoded.num_rows, 1),  # one record batch: one contiguous column
        features=features,
        cache_file_name=str(folder / f"{key}.arrow"),
        new_fingerprint=key,
        load_from_cache_file=True,
        desc="caching CLIP embeddings",
    )


def image_embeds_of(split: datasets.Dataset) -> torch.Tensor:
    """The `image_embeds` column of a cached split as one (N, D) float32 tensor.

    Read straight from the memory-mapped cache file, without a copy, when the split is the file's
    rows in order (a cache written by `cache_image_embeds`, or a contiguous `select` of one):
    resident memory then holds only the pages read, which the system can drop and reread. Such a
    tensor is read-only: never write into it. Any other split (rows picked by `select`, an older
    cache file in several record batches) gets a copy of its rows.

    Example:
        image_embeds_of(test).shape
        # -> torch.Size([250, 768])
    """
    column = split.data.column("image_embeds")
    if split._indices is None and column.num_chunks == 1 and column.null_count == 0:
        array = column.chunk(0)  # FixedSizeListArray over the memory-mapped file
        values = array.flatten().to_numpy(zero_copy_only=True)  # (N * D,), honours a slice's offset
        with warnings.catch_warnings():  # torch warns that the buffer is read-only: we never write it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(values.reshape(len(array), array.type.list_size))
    return split.with_format("torch", columns=["image_embeds"])[:]["image_embeds"].float()
