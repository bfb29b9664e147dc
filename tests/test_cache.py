"""The CLIP embedding cache: computed once, reused, recomputed when anything it depends on changes."""

import os

import datasets
import pytest
import torch
from PIL import Image
from tiny import tiny_model, tiny_processor

from clip_lstm_captioner import embedding_cache
from clip_lstm_captioner.data import load_caption_dataset
from clip_lstm_captioner.embedding_cache import cache_image_embeds, image_embeds_of, weights_digest
from clip_lstm_captioner.shapes import make_shapes_dataset
from processing import ImageLoadError, image_processor_for
from train_accelerate import CaptionPairs


@pytest.fixture()
def shapes_folder(tmp_path):
    return make_shapes_dataset(tmp_path / "set", num_images=30, seed=2)


def count_tower_calls(model, monkeypatch) -> dict:
    calls = {"images": 0}
    original = model.get_image_features

    def counting(pixel_values):
        calls["images"] += pixel_values.shape[0]
        return original(pixel_values)

    monkeypatch.setattr(model, "get_image_features", counting)
    return calls


def embed(split, model, cache_dir, **kwargs):
    processor = kwargs.pop("image_processor", None) or image_processor_for(model.config.vision_config)
    return cache_image_embeds(split, model, processor, cache_dir=cache_dir, num_workers=0, **kwargs)


def test_embeddings_are_the_towers_raw_features(tmp_path, shapes_folder):
    split = load_caption_dataset(shapes_folder)["train"]
    model = tiny_model()
    cached = embed(split, model, tmp_path / "cache")
    pixels = tiny_processor()(images=[row["image"] for row in split])["pixel_values"]
    torch.testing.assert_close(image_embeds_of(cached), model.get_image_features(pixels))
    assert cached["image_id"] == split["image_id"] and cached.features["image"] == split.features["image"]


def test_second_run_reuses_the_cache_and_other_settings_recompute(tmp_path, shapes_folder, monkeypatch):
    split = load_caption_dataset(shapes_folder)["test"]
    model = tiny_model()
    calls = count_tower_calls(model, monkeypatch)
    first = embed(split, model, tmp_path / "cache")
    assert calls["images"] == split.num_rows
    again = embed(split, model, tmp_path / "cache")
    assert calls["images"] == split.num_rows  # read back, CLIP did not run
    embed(split, model, tmp_path / "cache", encoder_digest=weights_digest(model.vision_tower))
    assert calls["images"] == split.num_rows  # a digest computed beforehand names the same cache
    assert torch.equal(image_embeds_of(first), image_embeds_of(again))

    other_encoder = tiny_model(seed=9)  # same shapes, different weights
    other_calls = count_tower_calls(other_encoder, monkeypatch)
    recomputed = embed(split, other_encoder, tmp_path / "cache")
    assert other_calls["images"] == split.num_rows
    assert not torch.allclose(image_embeds_of(recomputed), image_embeds_of(first))

    projected = tiny_model(image_feature="projected")
    projected_calls = count_tower_calls(projected, monkeypatch)
    assert image_embeds_of(embed(split, projected, tmp_path / "cache")).shape == (split.num_rows, 16)
    assert projected_calls["images"] == split.num_rows

    resized = tiny_processor().image_processor
    resized.size = {"shortest_edge": 40}  # different preprocessing, same encoder
    embed(split, model, tmp_path / "cache", image_processor=resized)
    assert calls["images"] == 2 * split.num_rows


def test_an_edited_image_is_embedded_again(tmp_path, shapes_folder, monkeypatch):
    split = load_caption_dataset(shapes_folder)["test"]
    model = tiny_model()
    calls = count_tower_calls(model, monkeypatch)
    embed(split, model, tmp_path / "cache")
    path = image_path(split, 0)
    Image.new("RGB", (96, 96), (0, 0, 0)).save(path)
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock says
    edited = embed(split, model, tmp_path / "cache")
    assert calls["images"] == 2 * split.num_rows
    assert edited.num_rows == split.num_rows


def image_path(split, index: int) -> str:
    return split.cast_column("image", datasets.Image(decode=False))[index]["image"]["path"]


def test_unreadable_image_stops_or_is_skipped(tmp_path, shapes_folder):
    split = load_caption_dataset(shapes_folder)["validation"]
    path = image_path(split, 1)
    with open(path, "wb") as file:  # broken after the dataset was listed and checked
        file.write(b"not a jpeg any more")
    model = tiny_model()
    with pytest.raises(ImageLoadError, match=os.path.basename(path)):
        embed(split, model, tmp_path / "cache", on_bad_image="error")
    skipped = embed(split, model, tmp_path / "cache", on_bad_image="skip")
    assert skipped.num_rows == split.num_rows - 1
    assert path not in [image_path(skipped, i) for i in range(skipped.num_rows)]
    assert torch.isfinite(image_embeds_of(skipped)).all()


def test_a_crash_while_caching_leaves_no_cache_behind(tmp_path, shapes_folder, monkeypatch):
    split = load_caption_dataset(shapes_folder)["test"]
    model = tiny_model()

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-cache")

    monkeypatch.setattr(embedding_cache, "_embed_images", crash)
    with pytest.raises(RuntimeError, match="killed"):
        embed(split, model, tmp_path / "cache")
    monkeypatch.undo()
    calls = count_tower_calls(model, monkeypatch)
    result = embed(split, model, tmp_path / "cache")
    assert calls["images"] == split.num_rows and torch.isfinite(image_embeds_of(result)).all()


def test_caption_pairs_use_every_reference_and_pad_per_batch(tmp_path, shapes_folder):
    split = embed(load_caption_dataset(shapes_folder)["train"], tiny_model(), tmp_path / "cache")
    tokenizer = tiny_processor().tokenizer
    pairs = CaptionPairs.from_split(split, tokenizer)
    assert len(pairs) == sum(len(captions) for captions in split["captions"]) == 5 * split.num_rows
    batch = pairs.__getitems__([0, 7])
    expected = [tokenizer(split["captions"][0][0]).input_ids, tokenizer(split["captions"][1][2]).input_ids]
    lengths = [len(ids) for ids in expected]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    torch.testing.assert_close(batch["image_embeds"][1], image_embeds_of(split)[1])  # caption 7 is image 1's
    assert [batch["input_ids"][row, : lengths[row]].tolist() for row in range(2)] == expected
    assert pairs[7]["input_ids"].tolist() == expected[1]  # a single item is trimmed to its own length


def test_training_reads_the_cache_memory_mapped_without_a_copy(tmp_path, shapes_folder):
    # At COCO size a copied (N, 768) column is 380 MB per copy; the cache file's pages are shared instead.
    split = embed(load_caption_dataset(shapes_folder)["train"], tiny_model(), tmp_path / "cache")
    assert isinstance(split.data, datasets.table.MemoryMappedTable)
    buffer = split.data.column("image_embeds").chunk(0).values.buffers()[1]  # the float32 values in the file
    inside_the_file = lambda tensor: buffer.address <= tensor.data_ptr() < buffer.address + buffer.size  # noqa: E731
    assert inside_the_file(image_embeds_of(split))
    assert inside_the_file(image_embeds_of(split.select(range(3, 9))))  # a contiguous selection too
    assert torch.equal(image_embeds_of(split.select(range(3, 9))), image_embeds_of(split)[3:9])
    pairs = CaptionPairs.from_split(split, tiny_processor().tokenizer)
    assert inside_the_file(pairs.image_embeds)
    picked = split.select([4, 1])  # rows picked out of order: a copy of those rows only
    assert torch.equal(image_embeds_of(picked), image_embeds_of(split)[[4, 1]])
