"""Images in every PIL mode, the two tokenizers, and ClipLstmProcessor."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_CAPTIONS, TINY_VISION, tiny_processor, tiny_tokenizer
from transformers import CLIPTokenizer, CLIPVisionConfig
from transformers.convert_slow_tokenizer import bytes_to_unicode

import processing
from processing import (
    ClipLstmProcessor,
    ImageLoadError,
    build_caption_tokenizer,
    image_processor_for,
    load_clip_tokenizer,
    load_image,
    to_rgb,
)

# ----------------------------------------------------------------------------- images


def test_transparent_pixels_are_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = to_rgb(rgba)
    assert (
        rgb.mode == "RGB" and rgb.getpixel((1, 1)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)
    )
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    rgb = to_rgb(Image.fromarray(values))
    assert [rgb.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "YCbCr", "RGB"])
def test_plain_modes_convert_to_rgb(mode):
    image = Image.new("RGB", (6, 6), (250, 250, 250)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (6, 6)
    assert min(rgb.getpixel((0, 0))) > 200  # a near-white image stays near white


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": phones store portrait photos like this
    path = tmp_path / "phone.jpg"
    wide.save(path, exif=exif)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "not an image"), (b"this is text, not a photo", "not an image"), (None, "no such image")],
)
def test_unreadable_files_raise_one_line_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "broken.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value) and reason in str(info.value) and "\n" not in str(info.value)


def test_truncated_jpeg_raises(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        buffer, "JPEG"
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(path)


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path):
    """A 48-megapixel PNG (a few kB on disk) is refused from its header, in one line naming it."""
    path = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(path)
    assert processing.MAX_IMAGE_PIXELS < 8000 * 6000
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: too large to decode (8000×6000") and "40 megapixels" in message
    assert "\n" not in message
    with pytest.raises(ImageLoadError, match="upload.png: too large to decode"):
        load_image(path.read_bytes(), name="upload.png")  # encoded bytes (datasets, the Space) alike


def test_decompression_bombs_are_one_line_image_errors(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(path)  # 400 MP of zeros: PIL's own guard refuses it at open
    with pytest.raises(ImageLoadError, match=r"bomb.png: too large to decode") as info:
        load_image(path)
    assert "\n" not in str(info.value)


def test_large_jpegs_are_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    """A JPEG above the limit is decoded at 1/2, 1/4 or 1/8 scale (draft mode), just under the limit."""
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "photo.jpg"
    coloured = Image.new("RGB", (400, 300), (240, 240, 240))
    coloured.paste((200, 30, 30), (0, 0, 200, 300))  # left half red
    coloured.save(path, quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (100, 75)  # 1/4: 7,500 pixels; 1/2 would be 30,000
    red, grey = image.getpixel((20, 37)), image.getpixel((80, 37))
    assert red[0] > 150 > red[1] and min(grey) > 200
    small = tmp_path / "small.png"
    Image.new("RGB", (90, 90)).save(small)  # 8,100 pixels: under the limit, decoded as it is
    assert load_image(small).size == (90, 90)
    Image.new("RGB", (120, 90)).save(small)  # 10,800 pixels, not a JPEG: refused
    with pytest.raises(ImageLoadError, match="small.png: too large to decode"):
        load_image(small)


def test_processor_reads_files_arrays_and_pil_images(tmp_path):
    processor = tiny_processor()
    path = tmp_path / "a.png"
    Image.new("RGBA", (50, 30), (10, 200, 10, 255)).save(path)
    array = np.full((30, 50, 3), 7, dtype=np.uint8)
    batch = processor(images=[str(path), array, Image.new("I;16", (50, 30))], return_tensors="pt")
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(ImageLoadError, match="missing.png"):
        processor(images=[str(tmp_path / "missing.png")])


# ----------------------------------------------------------------------------- caption tokenizer


def test_caption_tokenizer_lowercases_splits_punctuation_and_has_distinct_specials():
    tokenizer = build_caption_tokenizer(["A dog runs.", "a dog sits, happily!", "A cat"], min_frequency=1)
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert ids == [0, 1, 2, 3]
    encoded = tokenizer("A DOG runs, happily.").input_ids
    tokens = tokenizer.convert_ids_to_tokens(encoded)
    assert tokens == ["<bos>", "a", "dog", "runs", ",", "happily", ".", "<eos>"]
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a dog runs, happily."


def test_caption_tokenizer_min_frequency_maps_rare_words_to_unk():
    tokenizer = build_caption_tokenizer(["a dog", "a dog", "a cat"], min_frequency=2)
    assert "cat" not in tokenizer.get_vocab() and "dog" in tokenizer.get_vocab()
    assert tokenizer("a cat").input_ids == [1, tokenizer.convert_tokens_to_ids("a"), 3, 2]
    with pytest.raises(ValueError, match="min_frequency"):
        build_caption_tokenizer(["a b"], min_frequency=5)


def test_processor_text_gives_right_padded_ids_mask_and_labels():
    processor = tiny_processor()
    batch = processor(text=["a red circle", "the blue square is above the red circle"], return_tensors="pt")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[1] == 10  # BOS + 8 words + EOS
    tokenizer = processor.tokenizer
    assert ids[0, 0] == tokenizer.bos_token_id and ids[0, 4] == tokenizer.eos_token_id
    assert torch.equal(mask[0], torch.tensor([1] * 5 + [0] * 5))
    assert torch.equal(labels[0, 5:], torch.full((5,), -100)) and torch.equal(labels[1], ids[1])
    assert torch.equal(ids[0, 5:], torch.full((5,), tokenizer.pad_token_id))


def test_truncation_keeps_eos():
    processor = tiny_processor()
    ids = processor(text=["the blue square is above the red circle"], max_length=5)["input_ids"][0]
    assert len(ids) == 5 and ids[-1] == processor.tokenizer.eos_token_id


def test_batch_decode_gives_clean_captions():
    processor = tiny_processor()
    ids = processor(text=TINY_CAPTIONS[:4])["input_ids"]
    assert processor.batch_decode(ids) == TINY_CAPTIONS[:4]
    assert processor.decode(ids[0]) == TINY_CAPTIONS[0]


def test_processor_needs_something_to_process():
    with pytest.raises(ValueError, match="images=, text="):
        tiny_processor()()


def test_processor_round_trip_saves_tokenizer_json(tmp_path):
    processor = tiny_processor()
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = ClipLstmProcessor.from_pretrained(tmp_path)
    text = ["a small green triangle at the top", "a red circle"]
    assert torch.equal(loaded(text=text)["input_ids"], processor(text=text)["input_ids"])
    image = Image.new("RGB", (64, 48), (90, 20, 200))
    assert torch.equal(loaded(images=image)["pixel_values"], processor(images=image)["pixel_values"])
    assert loaded.max_caption_length == processor.max_caption_length


# ----------------------------------------------------------------------------- CLIP tokenizer


def write_clip_tokenizer(folder, num_merges: int):
    """A CLIP BPE tokenizer with OpenAI's layout: 256 byte symbols, the same with </w>, merges,
    then <|startoftext|> and <|endoftext|>. num_merges=48894 gives CLIP's 49,408 entries."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = []
    for first in symbols:
        for second in symbols + [s + "</w>" for s in symbols]:
            if len(merges) == num_merges:
                break
            merges.append((first, second))
            vocab[first + second] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    return len(vocab)


def test_clip_tokenizer_gets_a_pad_token_distinct_from_eos(tmp_path):
    size = write_clip_tokenizer(tmp_path, num_merges=300)
    tokenizer = load_clip_tokenizer(str(tmp_path))
    assert len(tokenizer) == size + 1
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id not in (
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    )
    processor = ClipLstmProcessor(image_processor_for(CLIPVisionConfig(**TINY_VISION)), tokenizer)
    batch = processor(text=["a dog", "a dog runs on grass"])
    first = batch["input_ids"][0].tolist()
    assert first[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in first
    end = first.index(tokenizer.eos_token_id)
    assert set(first[end + 1 :]) == {tokenizer.pad_token_id}
    assert batch["labels"][0, end] == tokenizer.eos_token_id and (batch["labels"][0, end + 1 :] == -100).all()
    assert processor.batch_decode(batch["input_ids"]) == ["a dog", "a dog runs on grass"]


def test_clip_size_tokenizer_plus_pad_has_49409_entries(tmp_path):
    assert write_clip_tokenizer(tmp_path, num_merges=48894) == 49408
    assert len(load_clip_tokenizer(str(tmp_path))) == 49409


def test_clip_tokenizer_offline_hub_id_fails_in_one_line():
    with pytest.raises(OSError) as info:
        load_clip_tokenizer("openai/clip-vit-base-patch32")
    assert "\n" not in str(info.value) and "--tokenizer captions" in str(info.value)


def test_tiny_tokenizer_covers_the_tiny_captions():
    tokenizer = tiny_tokenizer()
    for caption in TINY_CAPTIONS:
        assert tokenizer.unk_token_id not in tokenizer(caption).input_ids


def test_batch_decode_shows_unknown_words_as_unk():
    processor = tiny_processor()
    ids = processor(text=["a zebra circle on the left"])["input_ids"]  # "zebra" is not in the vocabulary
    assert processor.tokenizer.unk_token_id in ids[0].tolist()
    assert processor.batch_decode(ids) == ["a <unk> circle on the left"]
    assert processor.decode(ids[0]) == "a <unk> circle on the left"
    # what was asked for literally: every special token, BOS and EOS included
    assert processor.decode(ids[0], skip_special_tokens=False).startswith("<bos> a <unk>")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused():
    from processing import check_vocabulary

    processor = tiny_processor()
    check_vocabulary(processor.tokenizer, len(processor.tokenizer))
    for vocab_size in (len(processor.tokenizer) + 10, len(processor.tokenizer) - 1):
        with pytest.raises(ValueError, match=f"{len(processor.tokenizer)}.*{vocab_size}") as info:
            check_vocabulary(processor.tokenizer, vocab_size)
        assert "\n" not in str(info.value)
