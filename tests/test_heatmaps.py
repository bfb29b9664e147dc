"""processing.word_heatmaps and its parts: where a patches model looked, drawn over what it saw.

Hand-made weights on synthetic images check the geometry on pixel values; a tiny patches model
checks the whole way from generate(output_attentions=True) to one picture per word.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_processing import write_clip_tokenizer
from tiny import TINY_VISION, peaked_captioner, tiny_processor
from transformers import CLIPVisionConfig

from processing import (
    HEATMAP_PIXELS,
    ClipLstmProcessor,
    image_processor_for,
    load_clip_tokenizer,
    seen_region,
    word_heatmaps,
)

GRID = TINY_VISION["image_size"] // TINY_VISION["patch_size"]  # 4 x 4 patches
TOKENS = 1 + GRID * GRID  # CLS first
# patch index (after CLS) of each corner of the grid, and the matching quarter of a picture
CORNERS = {"top-left": 0, "top-right": GRID - 1, "bottom-left": GRID * (GRID - 1), "bottom-right": TOKENS - 2}


def quarters(heat: np.ndarray) -> dict[str, float]:
    """Mean of a (H, W) map over each quarter of the picture."""
    h, w = heat.shape[0] // 2, heat.shape[1] // 2
    return {
        "top-left": heat[:h, :w].mean(),
        "top-right": heat[:h, w:].mean(),
        "bottom-left": heat[h:, :w].mean(),
        "bottom-right": heat[h:, w:].mean(),
    }


def redness(picture: Image.Image) -> np.ndarray:
    """Red minus blue per pixel: high where the colour map is hot, low where it is cold (grey image)."""
    pixels = np.asarray(picture, dtype=np.float64)
    return pixels[..., 0] - pixels[..., 2]


def test_the_hot_spot_is_where_the_weight_is_one_picture_per_word():
    image = Image.new("RGB", (90, 60), (128, 128, 128))  # wide: the model sees its middle square
    weights = np.zeros((len(CORNERS) + 3, TOKENS))  # BOS, four words, a CLS-only word, EOS
    for row, patch in enumerate(CORNERS.values(), start=1):
        weights[row, 1 + patch] = 0.9
        weights[row, 0] = 0.1  # some weight on CLS, which is not drawn
    weights[5, 0] = 1.0  # a word written from CLS alone: no patch stands out
    weights[6, 1:] = 1 / (TOKENS - 1)  # EOS: no picture
    labels = [None, *CORNERS, "whole", None]
    pictures = word_heatmaps(image, weights, labels, tiny_processor().image_processor)
    assert [label for _, label in pictures] == [*CORNERS, "whole"]  # one per word, none for BOS/EOS
    assert all(picture.size == (HEATMAP_PIXELS, HEATMAP_PIXELS) for picture, _ in pictures)  # square crop
    for (picture, corner), patch in zip(pictures[:4], CORNERS.values(), strict=True):
        heat = redness(picture)
        means = quarters(heat)
        assert max(means, key=means.get) == corner, (corner, means)
        row, column = np.unravel_index(heat.argmax(), heat.shape)
        # the hottest pixel lies in the patch's own cell of the grid
        cell = HEATMAP_PIXELS // GRID
        assert (row // cell, column // cell) == divmod(patch, GRID), (corner, row, column)
    flat = redness(pictures[4][0])
    assert flat.max() - flat.min() < 1.0  # CLS only: an even tint, no spot


def test_pictures_show_the_crop_the_model_saw_not_the_stretched_image():
    """Left and right thirds of a wide image are cut off by CLIP's centre crop: they must not show."""
    image = Image.new("RGB", (90, 30), (20, 20, 220))  # blue sides...
    image.paste((20, 220, 20), (30, 0, 60, 30))  # ...and a green middle square, the part the model sees
    weights = np.zeros((1, TOKENS))
    weights[0, 1:] = 1 / (TOKENS - 1)  # uniform: the picture is the image under an even tint
    ((picture, _),) = word_heatmaps(image, weights, ["a"], tiny_processor().image_processor)
    pixels = np.asarray(picture, dtype=np.float64)[:, 8:-8]  # the outer pixels blend across the border
    assert (pixels[..., 1] > pixels[..., 2] + 40).all()  # green throughout: stretched, a third would be blue


@pytest.mark.parametrize("size", [(90, 60), (60, 90), (33, 200), (32, 32)])
def test_seen_region_is_what_the_processor_feeds_the_model(size):
    width, height = size
    ramp_x = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    ramp_y = np.linspace(0, 255, height)[:, None].repeat(width, axis=1)
    image = Image.fromarray(np.stack([ramp_x, ramp_y, 255 - ramp_x], axis=-1).astype(np.uint8))
    processor = tiny_processor().image_processor
    pixel_values = processor(image, return_tensors="np")["pixel_values"][0]  # (3, 32, 32), normalised
    mean, std = np.array(processor.image_mean)[:, None, None], np.array(processor.image_std)[:, None, None]
    fed = (pixel_values * std + mean).transpose(1, 2, 0) * 255.0  # (32, 32, 3) as the model saw it
    side = TINY_VISION["image_size"]
    box = seen_region(image.size, processor)
    ours = np.asarray(image.resize((side, side), Image.Resampling.BICUBIC, box=box), dtype=np.float64)
    stretched = np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(ours - fed).mean() < 2.0
    if width != height:  # the check could fail: the whole image, squeezed, is clearly different
        assert np.abs(stretched - fed).mean() > 5.0


def test_bad_weights_are_refused_naming_the_shape():
    processor = tiny_processor().image_processor
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match=r"1 \+ grid\*\*2.*\(3, 16\)"):
        word_heatmaps(image, np.zeros((3, 16)), ["a", "b", "c"], processor)
    with pytest.raises(ValueError, match="tokens has 2 labels but attentions has 3 rows"):
        word_heatmaps(image, np.zeros((3, TOKENS)), ["a", "b"], processor)


def test_token_labels_of_the_word_tokenizer_and_of_clip_bpe_pieces(tmp_path):
    processor = tiny_processor()
    ids = processor(text=["two shapes: a red circle", "a red circle"])["input_ids"]
    assert processor.token_labels(ids[0]) == [None, "two", "shapes", ":", "a", "red", "circle", None]
    assert processor.token_labels(ids[1])[-2:] == [None, None]  # EOS, then padding
    write_clip_tokenizer(tmp_path, num_merges=300)  # few merges: words split into several pieces
    bpe = ClipLstmProcessor(
        image_processor_for(CLIPVisionConfig(**TINY_VISION)), load_clip_tokenizer(str(tmp_path))
    )
    caption = "a small elephant"
    labels = bpe.token_labels(bpe(text=[caption])["input_ids"][0])
    pieces = [label for label in labels if label is not None]
    assert labels[0] is None and labels[-1] is None and len(pieces) > len(caption.split())
    assert "".join(pieces) == caption.replace(" ", "")  # each piece labelled with its own text


def test_a_patches_model_gets_one_picture_per_word_of_its_caption():
    model, processor = peaked_captioner(image_feature="patches")
    image = Image.new("RGB", (70, 50), (230, 230, 225))
    image.paste((200, 30, 30), (10, 10, 35, 35))
    inputs = processor(images=[image])
    out = model.generate(
        **inputs, num_beams=3, max_new_tokens=8, return_dict_in_generate=True, output_attentions=True
    )
    caption = processor.batch_decode(out.sequences)[0]
    labels = processor.token_labels(out.sequences[0])
    pictures = word_heatmaps(image, out.attentions[0], labels, processor.image_processor)
    assert caption and [label for _, label in pictures] == processor.tokenizer.tokenize(caption)
    # bf16 weights (a model run in bf16 on a GPU) draw the same pictures, to rounding
    again = word_heatmaps(image, out.attentions[0].to(torch.bfloat16), labels, processor.image_processor)
    for (picture, _), (other, _) in zip(pictures, again, strict=True):
        assert np.abs(np.asarray(picture, dtype=int) - np.asarray(other, dtype=int)).max() <= 8
