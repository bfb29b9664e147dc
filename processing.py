"""Image loading, the caption tokenizer builder and ClipLstmProcessor.

One place for turning user images and captions into model inputs: `load_image` reads any
PIL mode (and phone photos' EXIF orientation) as RGB, `build_caption_tokenizer` makes the
default word-level tokenizer from training captions, `load_clip_tokenizer` loads CLIP's BPE
tokenizer with a pad token distinct from EOS, and `ClipLstmProcessor` bundles a CLIP image
processor with either tokenizer. `word_heatmaps` draws generated attention weights back over
the image (here because the Space, which carries this file but not the package, shows them).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import (
    AutoTokenizer,
    BatchFeature,
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)
from transformers.utils import is_torchvision_available

# Modes whose alpha channel (or transparency entry) must be composited, not dropped:
# dropping alpha turns transparent pixels into whatever colour they stored, often black.
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# 16/32-bit integer greyscale (16-bit PNG, TIFF): PIL's convert("RGB") clips instead of scaling.
_WIDE_INT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
# The most pixels an image file is decoded to. Both captioners look at 224-384 px, and a 144 MP
# PNG (a few hundred kB on disk) took 2.4 GB to decode in full. Above this a JPEG is decoded at
# 1/2, 1/4 or 1/8 scale (PIL's draft mode, which is cheap) and any other format is refused,
# before decoding. 40 MP is above what cameras and phones save by default (12-24 MP, 50 MP in
# full-resolution modes is JPEG and fits after halving). PIL's own guard (~179 MP) still refuses
# bigger files at open, whatever their format.
MAX_IMAGE_PIXELS = 40_000_000
_DRAFT_SCALES = (2, 4, 8)  # the reductions libjpeg decodes directly


class CaptionerError(Exception):
    """A user error (bad argument, input file or setting) whose message is one line naming it.

    Every error type of the project that a user can cause derives from this one, so that each
    command-line tool catches exactly this, prints `<script>: error: <message>` and exits 2.
    It lives here, in a file the Hub carries, because `ImageLoadError` below derives from it.
    """


class ImageLoadError(CaptionerError, ValueError):
    """A file or object that cannot be read as an image; the message names it."""


class VocabularyMismatchError(CaptionerError, ValueError):
    """A tokenizer and a model whose vocabulary sizes differ; the message names both."""


def first_line(error: BaseException) -> str:
    """An exception as one line for a user-facing message: its type and the first line of its text.

    Example:
        >>> first_line(OSError("no route to host\\nretrying..."))
        'OSError: no route to host'
    """
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def is_hub_id(name: str) -> bool:
    """Whether `name` could be a Hub repo id ('name' or 'owner/name') and is not a local path.

    Example:
        >>> is_hub_id("openai/clip-vit-base-patch32"), is_hub_id("outputs/demo/model/extra")
        (True, False)
    """
    if Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, compositing transparency on white.

    Example:
        >>> to_rgb(Image.new("LA", (4, 4), (0, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_INT_MODES:
        values = np.asarray(image, dtype=np.float64)
        # 16-bit data spans 0..65535; scale it to 0..255 rather than clipping at 255.
        scale = 255.0 / 65535.0 if values.max(initial=0) > 255 or image.mode != "I" else 1.0
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) <= 1.0:  # float images are usually 0..1
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_error(name: str, error: BaseException) -> ImageLoadError:
    """The one message for an image that cannot be read, naming it; for every reader in the project.

    Example:
        >>> image_error("cat.jpg", FileNotFoundError(2, "No such file"))
        ImageLoadError('cat.jpg: no such image file')
    """
    if isinstance(error, ImageLoadError):
        return error
    if isinstance(error, FileNotFoundError):
        return ImageLoadError(f"{name}: no such image file")
    if isinstance(error, UnidentifiedImageError):
        return ImageLoadError(f"{name}: not an image file PIL can read")
    if isinstance(error, Image.DecompressionBombError):
        return ImageLoadError(f"{name}: too large to decode ({error})")
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ImageLoadError(f"{name}: unreadable image ({message})")


def _limit_decoded_size(opened: Image.Image, name: str) -> None:
    """Before decoding: make a JPEG above `MAX_IMAGE_PIXELS` decode at a reduced scale that fits,
    and refuse any other image above it (ImageLoadError naming `name` and its size)."""
    width, height = opened.size
    if width * height <= MAX_IMAGE_PIXELS:
        return
    if opened.format == "JPEG":
        for scale in _DRAFT_SCALES:
            if -(-width // scale) * -(-height // scale) <= MAX_IMAGE_PIXELS:
                # draft() picks the strongest reduction that still gives at least the requested size
                opened.draft(None, (-(-width // scale), -(-height // scale)))
                return
    raise ImageLoadError(
        f"{name}: too large to decode ({width}×{height}, {width * height / 1e6:.0f} megapixels; above "
        f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels only a JPEG is read, at a reduced size)"
    )


def load_image(
    image: str | os.PathLike | bytes | Image.Image | np.ndarray, name: str | None = None
) -> Image.Image:
    """Read a path, encoded bytes, PIL image or HxWxC uint8 array as an upright RGB PIL image.

    EXIF orientation is applied (phone photos are stored sideways with a rotation tag).
    A file that is missing, empty, truncated or not an image raises `ImageLoadError`
    with a one-line message naming it (`name`, else the path). Files are never decoded to more
    than `MAX_IMAGE_PIXELS`: a larger JPEG is read at 1/2..1/8 scale, anything else is refused
    (as is a decompression bomb); PIL images and arrays, already decoded, are taken as they are.

    Example:
        >>> load_image(np.zeros((4, 6, 3), dtype=np.uint8)).size
        (6, 4)
        >>> load_image(b"not an image", name="upload.png")
        Traceback (most recent call last):
        ...
        processing.ImageLoadError: upload.png: not an image file PIL can read
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ImageLoadError(f"array image must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
        return to_rgb(Image.fromarray(image))
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image))
    source = io.BytesIO(image) if isinstance(image, bytes) else Path(image)
    name = name or str(image if not isinstance(image, bytes) else "image bytes")
    try:
        with Image.open(source) as opened:  # reads the header only
            _limit_decoded_size(opened, name)
            opened.load()  # decode now, so a truncated file fails here and not later
            upright = ImageOps.exif_transpose(opened)
            return to_rgb(upright).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise image_error(name, error) from None


# ----------------------------------------------------------------------------- tokenizers

CAPTION_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
CLIP_PAD_TOKEN = "<|pad|>"
DEFAULT_MAX_CAPTION_LENGTH = 64
_SPACE_BEFORE_PUNCTUATION = re.compile(r" ([.,!?:;](?:\s|$))")


def build_caption_tokenizer(
    captions: Iterable[str], min_frequency: int = 5, max_length: int = DEFAULT_MAX_CAPTION_LENGTH
) -> PreTrainedTokenizerFast:
    """Word-level caption tokenizer trained on `captions` with the `tokenizers` library.

    Lower-cased words with punctuation split off; words seen fewer than `min_frequency` times
    become `<unk>`. Ids 0-3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`; every encoding is
    `<bos> words <eos>`.

    Example:
        >>> tokenizer = build_caption_tokenizer(["A dog runs.", "a dog sits"], min_frequency=1)
        >>> tokenizer("A dog sits.").input_ids
        [1, 4, 5, 8, 6, 2]
    """
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    specials = list(CAPTION_SPECIAL_TOKENS.values())  # ids 0..3 in this order
    core = Tokenizer(WordLevel(unk_token=CAPTION_SPECIAL_TOKENS["unk_token"]))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(), normalizers.Strip()])
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = WordLevelTrainer(min_frequency=min_frequency, special_tokens=specials, show_progress=False)
    core.train_from_iterator(captions, trainer=trainer)
    if core.get_vocab_size() <= len(specials):
        raise ValueError(
            f"no word occurs {min_frequency} times in the training captions; lower min_frequency"
        )
    bos, eos = CAPTION_SPECIAL_TOKENS["bos_token"], CAPTION_SPECIAL_TOKENS["eos_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, core.token_to_id(bos)), (eos, core.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=max_length,
        clean_up_tokenization_spaces=True,
        **CAPTION_SPECIAL_TOKENS,
    )


def load_clip_tokenizer(name_or_path: str, max_length: int = 77) -> PreTrainedTokenizerBase:
    """CLIP's BPE tokenizer (Hub id or folder) with a pad token distinct from EOS.

    CLIP pads with `<|endoftext|>`, its EOS; a loss that ignores padding would then never learn
    to stop. We add `<|pad|>`, so the vocabulary grows by one (49,408 -> 49,409 for OpenAI CLIP).

    Example:
        len(load_clip_tokenizer("openai/clip-vit-base-patch32"))
        # -> 49409
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise OSError(
            f"cannot load a CLIP tokenizer from {name_or_path!r} ({first_line(error)}); offline, pass a local tokenizer "
            "folder or use the caption tokenizer (--tokenizer captions)"
        ) from None
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": CLIP_PAD_TOKEN})
    tokenizer.model_max_length = max_length
    return tokenizer


def image_processor_for(vision_config):
    """CLIP preprocessing (resize shortest edge, centre crop, CLIP mean/std) at the tower's image size.

    Without torchvision (see DESIGN.md) this is the PIL implementation directly, which saves as
    the same `CLIPImageProcessor` type and gives the same pixels, without a fallback warning.
    """
    size = vision_config.image_size
    image_processor_class = CLIPImageProcessor if is_torchvision_available() else CLIPImageProcessorPil
    return image_processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# ----------------------------------------------------------------------------- where it looked

# Longest side of one word's heatmap: small enough for a row of them under a caption.
HEATMAP_PIXELS = 128
# Blue (least attention) -> cyan -> yellow -> red (most), evenly spaced: numpy only, because the
# Space, which imports this file, carries no matplotlib.
_HEAT_COLOURS = np.array([[0, 0, 170], [0, 200, 255], [255, 230, 0], [215, 0, 0]], dtype=np.float64)


def _processed_geometry(image_size: tuple[int, int], image_processor) -> tuple[tuple[int, int], tuple]:
    """What `image_processor` does to an image of `image_size` (width, height): the size it resizes
    it to and the box (left, top, right, bottom) it then crops, both in resized pixels. Follows
    transformers' resize (`get_resize_output_image_size`, shortest edge) and `center_crop`."""
    width, height = image_size
    size, crop = image_processor.size, image_processor.crop_size
    resized_width, resized_height = width, height
    if image_processor.do_resize and size.get("shortest_edge"):
        short = size.get("shortest_edge")
        if width <= height:
            resized_width, resized_height = short, int(short * height / width)
        else:
            resized_width, resized_height = int(short * width / height), short
    elif image_processor.do_resize and size.get("height") and size.get("width"):
        resized_width, resized_height = size.get("width"), size.get("height")
    left, top, right, bottom = 0, 0, resized_width, resized_height
    if image_processor.do_center_crop and crop and crop.get("height") and crop.get("width"):
        # a crop larger than the resized image pads it with black: all of the image is then seen
        top = max((resized_height - crop["height"]) // 2, 0)
        left = max((resized_width - crop["width"]) // 2, 0)
        bottom, right = min(top + crop["height"], resized_height), min(left + crop["width"], resized_width)
    return (resized_width, resized_height), (left, top, right, bottom)


def seen_region(image_size: tuple[int, int], image_processor) -> tuple[float, float, float, float]:
    """The part of an image of `image_size` (width, height) that `image_processor` keeps, as a box
    (left, top, right, bottom) in the image's pixels.

    CLIP's processor resizes the shortest side to the tower's size and centre-crops a square, so
    the model sees the middle of a wide or tall image, never its sides.

    Example:
        >>> clip = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        >>> seen_region((300, 200), clip)
        (50.0, 0.0, 250.0, 200.0)
    """
    resized, (left, top, right, bottom) = _processed_geometry(image_size, image_processor)
    x_scale, y_scale = image_size[0] / resized[0], image_size[1] / resized[1]
    return (left * x_scale, top * y_scale, right * x_scale, bottom * y_scale)


def _heat_colours(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in 0..1 -> (H, W, 3) RGB floats on the blue-to-red colour map."""
    anchors = np.linspace(0.0, 1.0, len(_HEAT_COLOURS))
    return np.stack([np.interp(heat, anchors, _HEAT_COLOURS[:, channel]) for channel in range(3)], axis=-1)


def _patch_grids(attentions) -> np.ndarray:
    """(L, P) weights over CLS + grid x grid patch tokens -> (L, grid, grid) patch weights, CLS left out."""
    if hasattr(attentions, "detach"):  # a torch tensor, possibly bf16 or on a GPU
        attentions = attentions.detach().float().cpu().numpy()
    weights = np.asarray(attentions, dtype=np.float64)
    grid = int(round((weights.shape[-1] - 1) ** 0.5)) if weights.ndim == 2 else 0
    if weights.ndim != 2 or grid < 1 or grid * grid != weights.shape[1] - 1:
        raise ValueError(
            f"attentions must be (L, 1 + grid**2): one caption's weights over CLS and the patches, "
            f"got shape {weights.shape}"
        )
    return weights[:, 1:].reshape(len(weights), grid, grid)  # CLIP orders patches row by row


def word_heatmaps(
    image: Image.Image,
    attentions,
    tokens: list[str | None],
    image_processor,
    size: int = HEATMAP_PIXELS,
) -> list[tuple[Image.Image, str]]:
    """One small picture per word of a caption, showing where the model looked as it wrote it.

    `attentions` (L, P) are one caption's rows of `generate(..., output_attentions=True).attentions`
    and `tokens` its L labels from `ClipLstmProcessor.token_labels` (None for BOS, EOS and padding,
    which get no picture). For each word, the weights on the patch tokens are laid out on the
    tower's grid, scaled so that the word's most-watched patch is hottest (uniform weights show no
    hot spot), upsampled smoothly (bicubic) over the part of `image` the model saw
    (`seen_region`), coloured blue to red and blended with it. The CLS token's weight is left
    out: it summarises the whole image and has no place on it. Returns (picture, label) pairs,
    `size` px on the longest side, as a `gr.Gallery` takes them.

    Example:
        >>> clip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        >>> weights = np.zeros((4, 17))  # BOS, two words, EOS; CLS + a 4 x 4 grid of 8 px patches
        >>> weights[1, 1] = weights[2, 16] = 1.0  # "red": the top-left patch; "circle": the bottom-right
        >>> pictures = word_heatmaps(Image.new("RGB", (64, 48), "grey"), weights, [None, "red", "circle", None], clip)
        >>> [(label, picture.size) for picture, label in pictures]
        [('red', (128, 128)), ('circle', (128, 128))]
        >>> (r, g, b), (r_far, g_far, b_far) = pictures[0][0].getpixel((8, 8)), pictures[0][0].getpixel((120, 120))
        >>> r > 150 > b, b_far > r_far  # "red": red at the top left, the cold blue tint far from it
        (True, True)
    """
    grids = _patch_grids(attentions)
    if len(tokens) != len(grids):
        raise ValueError(f"tokens has {len(tokens)} labels but attentions has {len(grids)} rows")
    _, (left, top, right, bottom) = _processed_geometry(image.size, image_processor)
    scale = size / max(right - left, bottom - top)  # the crop's shape as the model saw it (square for CLIP)
    shape = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))  # (W, H)
    box = seen_region(image.size, image_processor)
    seen = image.convert("RGB").resize(shape, Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    pixels = np.asarray(seen, dtype=np.float64)  # (H, W, 3)
    pictures = []
    for grid, label in zip(grids, tokens, strict=True):
        if label is None:
            continue
        spread = grid.max() - grid.min()
        heat = (grid - grid.min()) / spread if spread > 1e-9 else np.zeros_like(grid)
        smooth = Image.fromarray(heat.astype(np.float32)).resize(shape, Image.Resampling.BICUBIC)
        heat = np.clip(np.asarray(smooth, dtype=np.float64), 0.0, 1.0)  # bicubic overshoots a little
        alpha = (0.25 + 0.55 * heat)[..., None]  # the hot spot is more colour, the rest more image
        blended = pixels * (1.0 - alpha) + _heat_colours(heat) * alpha
        pictures.append((Image.fromarray(np.rint(blended).astype(np.uint8)), label))
    return pictures


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Refuse a tokenizer whose size differs from the model's vocabulary, naming both sizes.

    A smaller tokenizer decodes the ids it lacks to nothing (silently empty captions); a larger
    one encodes ids the model has no embedding for.

    Example:
        >>> check_vocabulary(build_caption_tokenizer(["a dog"], min_frequency=1), 9)
        Traceback (most recent call last):
        ...
        processing.VocabularyMismatchError: the tokenizer has 6 entries but the model's vocabulary has 9 (config.vocab_size); save the model with the tokenizer it was trained with
    """
    if len(tokenizer) != vocab_size:
        raise VocabularyMismatchError(
            f"the tokenizer has {len(tokenizer)} entries but the model's vocabulary has {vocab_size} "
            "(config.vocab_size); save the model with the tokenizer it was trained with"
        )


# ----------------------------------------------------------------------------- processor


class ClipLstmProcessor(ProcessorMixin):
    """A CLIP image processor and a caption tokenizer: images -> `pixel_values`, captions ->
    `input_ids`, `attention_mask`, `labels`; generated ids -> clean captions.

    Example:
        processor = ClipLstmProcessor(image_processor_for(config.vision_config), tokenizer)
        batch = processor(images=["dog.jpg"], text=["A dog runs."], return_tensors="pt")
        sorted(batch)
        # -> ['attention_mask', 'input_ids', 'labels', 'pixel_values']
    """

    def __init__(
        self, image_processor=None, tokenizer=None, max_caption_length: int = DEFAULT_MAX_CAPTION_LENGTH
    ):
        self.max_caption_length = max_caption_length
        super().__init__(image_processor, tokenizer)

    def __call__(
        self,
        images=None,
        text=None,
        return_tensors: str | None = "pt",
        max_length: int | None = None,
        **kwargs,
    ):
        """Process `images` (path, PIL image, array or a list of them) and/or `text` (str or list).

        Captions are padded to the longest in the batch (right padding) and truncated to
        `max_length` (default `max_caption_length`) with EOS kept; `labels` are `input_ids`
        with padding set to -100.
        """
        if images is None and text is None:
            raise ValueError("ClipLstmProcessor needs images=, text= or both")
        batch = {}
        if images is not None:
            images = images if isinstance(images, (list, tuple)) else [images]
            pixels = self.image_processor(
                [load_image(image) for image in images], return_tensors=return_tensors, **kwargs
            )
            batch["pixel_values"] = pixels["pixel_values"]
        if text is not None:
            batch.update(self.encode_captions(text, max_length=max_length, return_tensors=return_tensors))
        return BatchFeature(batch, tensor_type=return_tensors)

    def encode_captions(
        self, text, max_length: int | None = None, return_tensors: str | None = "pt"
    ) -> BatchFeature:
        """Tokenise captions into right-padded `input_ids`, `attention_mask` and `labels` (pad -> -100)."""
        text = [text] if isinstance(text, str) else list(text)
        encoded = self.tokenizer(
            text,
            padding="longest",
            truncation=True,
            max_length=max_length or self.max_caption_length,
            return_token_type_ids=False,
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        labels = [
            [token if keep else -100 for token, keep in zip(ids, mask, strict=True)]
            for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        columns = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return BatchFeature(columns, tensor_type=return_tensors)

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        """Generated ids (B, L) -> captions, without BOS/EOS/PAD.

        A word the vocabulary lacks stays visible as the tokenizer's unknown token (`<unk>` for the
        caption tokenizer): dropping it would silently turn "a zebra runs" into "a runs". Pass
        `skip_special_tokens=False` to see every special token.
        """
        if skip_special_tokens:
            sequences = [self._words_and_unknowns(ids) for ids in sequences]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=False, **kwargs)
        # word-level and BPE decoders leave "dog ." and "shapes :"; captions read "dog." and "shapes:"
        return [_SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split())) for text in texts]

    def _hidden_ids(self) -> set[int]:
        """The special tokens a caption does not show: all but the unknown token, unless that is also
        EOS (CLIP's BPE uses `<|endoftext|>` for both; it never needs `<unk>`, having byte fallback)."""
        tokenizer = self.tokenizer
        hidden = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        return hidden | {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}

    def _words_and_unknowns(self, ids) -> list[int]:
        """One id sequence without the special tokens a caption does not show (`_hidden_ids`)."""
        hidden = self._hidden_ids()
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return [token for token in ids if token not in hidden]

    def token_labels(self, sequence) -> list[str | None]:
        """A label for each position of one generated id sequence, for `word_heatmaps`: the token as
        text (a word for the caption tokenizer, a word piece such as 'ele' or 'phant' for CLIP's
        BPE), None for BOS, EOS and padding, which are not part of the caption.

        Example:
            processor.token_labels([1, 4, 5, 2, 0])  # <bos> a dog <eos> <pad>
            # -> [None, 'a', 'dog', None, None]
        """
        hidden = self._hidden_ids()
        ids = sequence.tolist() if hasattr(sequence, "tolist") else list(sequence)
        decode = self.tokenizer.decode
        return [
            None
            if token in hidden
            else decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False).strip()
            or self.tokenizer.convert_ids_to_tokens(token)
            for token in ids
        ]

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs) -> str:
        """One generated id sequence -> one caption."""
        return self.batch_decode([sequence], skip_special_tokens=skip_special_tokens, **kwargs)[0]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ProcessorMixin.from_pretrained` without the custom-code prompt: our tokenizer is a plain
        fast tokenizer, but AutoTokenizer would otherwise follow config.json's auto_map and ask."""
        kwargs.setdefault("trust_remote_code", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask", "labels"]


# processor_config.json gets an auto_map, so AutoProcessor(..., trust_remote_code=True) finds this class.
ClipLstmProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ClipLstmProcessor",
    "build_caption_tokenizer",
    "load_clip_tokenizer",
    "load_image",
    "check_vocabulary",
    "seen_region",
    "word_heatmaps",
    "ImageLoadError",
    "VocabularyMismatchError",
]
