"""The CLIP embedding cache: the frozen tower runs once per image, dataset and encoder.

`cache_image_embeds` adds an `image_embeds` column to a split, stored as a datasets cache file
named by `embedding_fingerprint` (rows, image files, encoder weights, feature choice,
preprocessing), so a second run reads it back and any change computes a new one. One vector per
image (`pooled`, `projected`) is stored as (N, D) float32; the tower's final tokens (`patches`) as
(N, P, D) float16: at ViT-B/32 size 77 kB per image, 9 GB for COCO. So the features never sit in
memory whole: each process writes its share of the images, batch by batch, into one temporary
.npy file beside the cache, and the main process writes the cache file from a memory map of it.
`image_embeds_of` reads the column without copying it out of the memory-mapped cache file, so
memory does not grow with the number of images.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import torch

from .distributed import share_of, workers_per_process
from .files import default_cache_dir
from .images import check_policy, pixel_batches

# Stands in for an Accelerator when the caller passes none: one process does everything.
ONE_PROCESS = SimpleNamespace(
    num_processes=1, process_index=0, is_main_process=True, wait_for_everyone=lambda: None
)


def feature_layout(config) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and stored dtype of one image's cached feature: (D,) float32, or (P, D) float16 for patches.

    Patch tokens are P times the size of one vector (50 at ViT-B/32), so they are kept in half
    precision; the model casts cached features to float32 itself.

    >>> from configuration_clip_lstm import ClipLstmConfig
    >>> feature_layout(ClipLstmConfig(image_feature="patches"))  # ViT-B/32
    ((50, 768), dtype('float16'))
    >>> feature_layout(ClipLstmConfig())
    ((768,), dtype('float32'))
    """
    dtype = np.float16 if config.image_feature == "patches" else np.float32
    return tuple(config.image_feature_shape), np.dtype(dtype)


class _RowWriter:
    """Writes one process's rows of the (N, *shape) features file, in order; rows not given are NaN.

    NaN marks an image that was skipped. Positional file writes rather than a shared memory map:
    two processes' rows can share a page, and on a shared file system pages written through
    separate maps can overwrite each other's bytes.
    """

    def __init__(self, path: Path, rows: range):
        header = np.load(path, mmap_mode="r")  # for its header only: offset, row shape, dtype
        self.row_shape, self.dtype = header.shape[1:], header.dtype
        self.row_bytes = self.dtype.itemsize * math.prod(self.row_shape)
        self.start, self.num_rows, self.written = header.offset + rows.start * self.row_bytes, len(rows), 0
        self.file = open(path, "r+b")  # noqa: SIM115 (closed by __exit__)

    def __enter__(self) -> _RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def write(self, rows: list[int], features: np.ndarray) -> None:
        """`features` (len(rows), *shape) of the share's `rows` (increasing, each after those written)."""
        block = np.full((rows[-1] + 1 - self.written, *self.row_shape), np.nan, self.dtype)
        block[np.asarray(rows) - self.written] = _stored(features, self.dtype)
        self._put(block)

    def finish(self) -> None:
        """NaN for the share's last rows if their images were skipped, a bounded block at a time."""
        while self.written < self.num_rows:
            self._put(np.full((min(self.num_rows - self.written, 256), *self.row_shape), np.nan, self.dtype))

    def _put(self, block: np.ndarray) -> None:
        self.file.seek(self.start + self.written * self.row_bytes)
        self.file.write(block.data)
        self.written += len(block)


def _stored(features: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`features` in the stored dtype; a finite value that half precision cannot hold is an error, not a NaN row."""
    with np.errstate(over="ignore"):
        stored = features.astype(dtype, copy=False)
    if dtype == np.float16 and not np.array_equal(np.isfinite(stored), np.isfinite(features)):
        largest = float(np.abs(features[np.isfinite(features)]).max())
        raise ValueError(
            f"a CLIP patch token value {largest:g} is beyond float16's range (65504), which the cache "
            "keeps patch tokens in: use image_feature 'pooled' or 'projected' with this tower"
        )
    return stored


def _embed_images(sources, model, image_processor, batch_size: int, num_workers: int, on_bad_image: str, out):
    """Write the CLIP features of `sources` through `out` (a `_RowWriter`); rows of skipped images are NaN."""
    batches = pixel_batches(
        sources,
        image_processor,
        batch_size=batch_size,
        num_workers=num_workers,
        on_bad_image=on_bad_image,
        desc="CLIP embeddings",
    )
    for pixels, rows in batches:
        out.write(rows, model.get_image_features(pixels).cpu().numpy())
    out.finish()


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

    The feature choice keeps pooled, projected and patch caches of one tower apart; their shapes
    follow from it and the weights, and a file is read back only with the column type it was
    written with (see `_write_cache`).

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
    changing any of them computes a new one. The column holds (D,) float32 per image, or (P, D)
    float16 with `image_feature="patches"` (see `feature_layout`). Unreadable images stop with
    their path (`on_bad_image="error"`) or are dropped ("skip"). Pass `encoder_digest=weights_digest(
    model.vision_tower)` when caching several splits with one encoder, to hash its weights (350 MB
    for ViT-B/32) once instead of per split.

    Under `accelerate launch`, pass the `accelerator` (or accelerate's `PartialState`) and call it
    on every process: each encodes a contiguous run of whole batches (the same batches one process
    would run, so the values are identical) into its rows of one temporary file beside the cache,
    and the main process writes the one cache file from it, under the same name a single process
    writes. `cache_dir` must be shared by the processes (one machine, or a shared file system).
    The cache file appears only complete, so a crash of any process leaves nothing a later run
    would read; the next run with the same key replaces the temporary file a crash left. Decoding
    workers default to the CPU cores shared out between the processes.

    Example:
        test = cache_image_embeds(splits["test"], model, processor.image_processor)
        image_embeds_of(test).shape
        # -> torch.Size([250, 768]), or torch.Size([250, 50, 768]) with patches
    """
    check_policy(on_bad_image)
    processes = accelerator or ONE_PROCESS
    key = embedding_fingerprint(dataset, model, image_processor, encoder_digest)
    folder = Path(cache_dir or default_cache_dir()) / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    undecoded = dataset.cast_column("image", datasets.Image(decode=False))
    layout = feature_layout(model.config)
    if not _main_says_cached(folder / f"{key}.arrow", processes):
        workers = workers_per_process(num_workers, processes.num_processes)
        encode = (model, image_processor, batch_size, workers, on_bad_image)  # _embed_images' arguments
        _encode_into_cache(undecoded, encode, folder, key, layout, processes)
    with_embeds = _write_cache(undecoded, None, folder, key, layout)  # read back
    with_embeds = with_embeds.cast_column("image", datasets.Image())
    finite = _finite_rows(image_embeds_of(with_embeds))
    return with_embeds if finite.all() else with_embeds.select(np.flatnonzero(finite).tolist())


def _main_says_cached(path: Path, processes) -> bool:
    """Whether the cache file exists, as the main process saw it, so all processes take one branch."""
    found = [path.is_file()]
    if processes.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(found, from_process=0)
    return found[0]


def _encode_into_cache(undecoded, encode: tuple, folder: Path, key: str, layout, processes) -> None:
    """Every process writes its share's features into `.<key>.features.npy`; the main process then
    writes the cache file `<key>.arrow` from a memory map of it.

    `encode` holds `_embed_images`' arguments between the images and the writer. The features
    file is created by the main process at full size (sparse: disk is taken as rows are written)
    and removed once the cache file is written, or when the main process fails. Its name is fixed
    by the key, so a file left by a killed run is replaced by the next run; nothing reads it but
    the run that wrote it.
    """
    path, (shape, dtype), num_rows = folder / f".{key}.features.npy", layout, undecoded.num_rows
    if processes.is_main_process:
        path.unlink(missing_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(num_rows, *shape))  # header + N rows
    processes.wait_for_everyone()
    try:
        model, image_processor, batch_size, num_workers, on_bad_image = encode
        rows = share_of(num_rows, processes, block=batch_size)  # whole batches, as one process runs them
        sources = undecoded.select(rows)["image"] if len(rows) else []
        with _RowWriter(path, rows) as out:
            _embed_images(sources, model, image_processor, batch_size, num_workers, on_bad_image, out)
        processes.wait_for_everyone()  # every share written and closed
        if processes.is_main_process:
            _write_cache(undecoded, np.load(path, mmap_mode="r"), folder, key, layout)
    finally:
        if processes.is_main_process:
            path.unlink(missing_ok=True)
    processes.wait_for_everyone()


def _column_feature(layout) -> datasets.List:
    """The datasets feature of the column: fixed-size lists of float32 (D) or of float16 (P x D)."""
    shape, dtype = layout
    feature = datasets.Value(str(dtype))
    for size in reversed(shape):
        feature = datasets.List(feature, length=size)
    return feature


def _arrow_column(image_embeds: np.ndarray) -> pa.Array:
    """(N, *shape) -> nested fixed-size lists over the same bytes: a memory map is not copied."""
    values = pa.py_buffer(np.ascontiguousarray(image_embeds))
    column = pa.Array.from_buffers(pa.from_numpy_dtype(image_embeds.dtype), image_embeds.size, [None, values])
    for size in reversed(image_embeds.shape[1:]):
        column = pa.FixedSizeListArray.from_arrays(column, size)
    return column


def _write_cache(
    undecoded: datasets.Dataset, image_embeds: np.ndarray | None, folder: Path, key: str, layout
) -> datasets.Dataset:
    """The split with its `image_embeds` column as the datasets cache file `<key>.arrow`.

    With `image_embeds` None the file must exist already and is read back; a file whose column
    is not of `layout` (shape, dtype) is refused by datasets, so a reader never gets another
    feature's shape. The column is written as one record batch, so `image_embeds_of` can view it
    as one array without a copy; it goes to the file straight from `image_embeds` (a memory map of
    the features file): memory does not grow with N. datasets writes the file under a temporary
    name and renames it when complete.
    """

    def add_column(batch: pa.Table) -> pa.Table:
        if image_embeds is None:
            raise FileNotFoundError(
                f"{folder / key}.arrow: the main process did not write the embedding cache"
            )
        return batch.append_column("image_embeds", _arrow_column(image_embeds))

    features = undecoded.features.copy()
    features["image_embeds"] = _column_feature(layout)
    with_embeds = undecoded.with_format("arrow").map(
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
    form = undecoded.format  # the caller's format, as before ("arrow" above is only for writing)
    return with_embeds.with_format(
        form["type"], form["columns"], form["output_all_columns"], **form["format_kwargs"]
    )


def _finite_rows(image_embeds: torch.Tensor) -> np.ndarray:
    """(N,) bool: rows whose features are all finite (NaN marks a skipped image), read in bounded chunks."""
    step = max(1, (1 << 22) // math.prod(image_embeds.shape[1:]))  # ~4M values at a time
    chunks = [chunk.reshape(len(chunk), -1).isfinite().all(dim=1) for chunk in image_embeds.split(step)]
    return torch.cat(chunks).numpy() if chunks else np.ones(0, dtype=bool)


def image_embeds_of(split: datasets.Dataset) -> torch.Tensor:
    """The `image_embeds` column of a cached split: (N, D) float32, or (N, P, D) float16 for patches.

    Read straight from the memory-mapped cache file, without a copy, when the split is the file's
    rows in order (a cache written by `cache_image_embeds`, or a contiguous `select` of one):
    resident memory then holds only the pages read, which the system can drop and reread. Such a
    tensor is read-only: never write into it. Any other split (rows picked by `select`, an older
    cache file in several record batches) gets a copy of its rows, in the stored dtype.

    Example:
        image_embeds_of(test).shape
        # -> torch.Size([250, 768])
    """
    column = split.data.column("image_embeds")
    if split._indices is None and column.num_chunks == 1 and column.null_count == 0:
        return _as_tensor(column.chunk(0), copy=False)  # FixedSizeListArray over the memory-mapped file
    picked = split.with_format("arrow", columns=["image_embeds"])[:]["image_embeds"]
    return _as_tensor(picked.combine_chunks(), copy=True)


def _as_tensor(array: pa.FixedSizeListArray, copy: bool) -> torch.Tensor:
    """Nested fixed-size lists -> (N, *shape) tensor; a view of the Arrow buffer unless `copy`."""
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        shape.append(array.type.list_size)
        array = array.flatten()  # honours a slice's offset
    values = array.to_numpy(zero_copy_only=not copy, writable=copy)
    with warnings.catch_warnings():  # torch warns that a view's buffer is read-only: we never write it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values.reshape(shape))
