"""Image files for the whole project: cheap checks when a dataset loads, and one batch iterator.

`image_problem` clears a file in a fraction of a decode (header, size, end-of-stream marker);
`check_images` applies the `--on_bad_image` policy to a set of files; `pixel_batches` decodes
images in DataLoader workers into CLIP pixel batches for the embedding cache, the evaluation and
caption_images.py. Every unreadable image gets the message of `processing.image_error`.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from processing import ImageLoadError, image_error, load_image

logger = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("skip", "error")
SKIP_HINT = "(pass --on_bad_image skip to leave unreadable images out)"


def check_policy(on_bad_image: str) -> None:
    """Refuse an unknown `--on_bad_image` value, naming it."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")


# ----------------------------------------------------------------------------- cheap checks


def _tail(source: Path | bytes, size: int = 64) -> bytes:
    if isinstance(source, bytes):
        return source[-size:]
    with open(source, "rb") as file:
        file.seek(max(0, source.stat().st_size - size))
        return file.read()


def image_problem(source: Path | bytes, name: str | None = None) -> str | None:
    """Say in one line why `source` (a file or encoded bytes) is not a usable image, or return None.

    Cheap enough for every Flickr8k image: a header parse, a size check and, for JPEG, a
    look at the end-of-image marker (a truncated download lacks it); PNG CRCs are verified.
    Only a JPEG without the marker (or an unusual format) is decoded in full.

    >>> image_problem(b"", "empty.jpg")
    'empty.jpg: empty file (0 bytes)'
    >>> image_problem(Path("/no/such/file.jpg"))
    '/no/such/file.jpg: no such image file'
    """
    name = name or str(source)
    try:
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        if size == 0:
            return f"{name}: empty file (0 bytes)"
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if min(image.size) < 1:
                return f"{name}: image of size {image.size}"
            if image.format == "JPEG":
                # Trailing padding after the EOI marker is legal, so strip it before looking.
                if _tail(source).rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
                    return None
            elif image.format == "PNG":
                image.verify()
                return None
        load_image(source, name)  # the rare case the cheap checks cannot clear: decode it all
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return str(image_error(name, error))
    return None


def apply_bad_image_policy(problems: dict, on_bad_image: str, items: dict) -> dict:
    """`items` without the keys whose `problems` entry is set ("skip", with a logged count), or raise."""
    bad = [problem for problem in problems.values() if problem]
    if not bad:
        return items
    if on_bad_image == "error":
        raise ImageLoadError(f"{bad[0]} {SKIP_HINT}")
    logger.warning("skipped %d unreadable image%s, e.g. %s", len(bad), "s" * (len(bad) > 1), bad[0])
    return {key: value for key, value in items.items() if not problems[key]}


def check_images(paths: dict[str, Path], on_bad_image: str) -> dict[str, Path]:
    """Return `paths` without unreadable images (on_bad_image="skip") or raise ImageLoadError."""
    # Threads overlap the file reads (slow on cold or network disks); chunks of 64 keep the
    # per-task overhead below the cost of the check itself when files are in the page cache.
    files = list(paths.values())
    chunks = [files[start : start + 64] for start in range(0, len(files), 64)]
    with ThreadPoolExecutor(4) as pool:
        results = tqdm(
            pool.map(lambda chunk: [image_problem(f) for f in chunk], chunks),
            total=len(chunks),
            desc="checking images",
            unit="x64 images",
            disable=len(files) < 2000,
            leave=False,
        )
        problems = [problem for chunk in results for problem in chunk]
    return apply_bad_image_policy(dict(zip(paths, problems, strict=True)), on_bad_image, paths)


# ----------------------------------------------------------------------------- pixel batches


class ImageFiles(torch.utils.data.Dataset):
    """Images (dicts with "path" and/or "bytes", undecoded) -> CLIP pixel tensors, in DataLoader workers.

    A bad image becomes (None, message) so the main process decides: skip or stop. Batch with
    `collate_fn=collate_pixels`, or use `pixel_batches`, which does both.
    """

    def __init__(self, sources: list[dict], image_processor):
        self.sources, self.image_processor = sources, image_processor

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source = self.sources[index]
        name = source.get("path") or f"image #{index}"
        try:
            image = load_image(source.get("bytes") or source["path"], name)
        except ImageLoadError as error:
            return None, str(error)
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return pixels, None


def collate_pixels(items):
    """Stack the readable images; keep the messages of the unreadable ones with their position."""
    good = [i for i, (pixels, _) in enumerate(items) if pixels is not None]
    pixels = torch.stack([items[i][0] for i in good]) if good else None
    return pixels, good, [(i, message) for i, (_, message) in enumerate(items) if message is not None]


def pixel_batches(
    sources,
    image_processor,
    *,
    batch_size: int,
    num_workers: int,
    on_bad_image: str = "error",
    desc: str | None = None,
    on_skip=None,
):
    """Yield (pixel_values (B, 3, H, W), row indices into `sources`), images decoded in DataLoader workers.

    `sources` are dicts with "path" and/or "bytes" (a datasets `Image(decode=False)` column). An
    unreadable image stops with an `ImageLoadError` naming it (`on_bad_image="error"`) or is left
    out ("skip"): `on_skip(message)` is called for each, and the log gets a count at the end.
    `desc` shows a progress bar.

    >>> from transformers import CLIPImageProcessor
    >>> image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    >>> sources = [{"bytes": b"not an image"}, {"path": "/no/such.jpg"}]
    >>> list(pixel_batches(sources, image_processor, batch_size=8, num_workers=0, on_bad_image="skip"))
    []
    """
    check_policy(on_bad_image)
    loader = torch.utils.data.DataLoader(
        ImageFiles(sources, image_processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_pixels,
        pin_memory=torch.cuda.is_available(),
    )
    bad, start = [], 0
    for pixels, good, problems in tqdm(loader, desc=desc, unit="batch", disable=desc is None):
        if problems and on_bad_image == "error":
            raise ImageLoadError(f"{problems[0][1]} {SKIP_HINT}")
        for _, message in problems:
            bad.append(message)
            if on_skip is not None:
                on_skip(message)
        if pixels is not None:
            yield pixels, [start + i for i in good]
        start += len(good) + len(problems)
    if bad:
        logger.warning("skipped %d unreadable image%s, e.g. %s", len(bad), "s" * (len(bad) > 1), bad[0])
