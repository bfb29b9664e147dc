"""The CLIP embedding cache: computed once, reused, recomputed when anything it depends on changes."""

import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny import model_for_tokenizer, tiny_model, tiny_processor

from clip_lstm_captioner import embedding_cache
from clip_lstm_captioner.data import load_caption_dataset
from clip_lstm_captioner.embedding_cache import (
    cache_image_embeds,
    embedding_fingerprint,
    image_embeds_of,
    weights_digest,
)
from clip_lstm_captioner.shapes import make_shapes_dataset
from evaluate_model import _embeds_batches
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


def inside_the_file_of(split):
    """Whether a tensor's memory lies in the buffer of the split's memory-mapped `image_embeds` values."""
    column = split.data.column("image_embeds").chunk(0)
    while column.type.num_fields:  # nested fixed-size lists down to the float values
        column = column.values
    buffer = column.buffers()[1]
    return lambda tensor: buffer.address <= tensor.data_ptr() < buffer.address + buffer.size


def cache_files(cache_dir) -> list[str]:
    return sorted(path.name for path in (cache_dir / "embeddings").iterdir())


def test_patch_tokens_are_cached_in_half_precision_and_read_memory_mapped(
    tmp_path, shapes_folder, monkeypatch
):
    # ViT-B/32 patch tokens are 50 x 768 per image: 9 GB for COCO even in float16, never copied into RAM.
    split = load_caption_dataset(shapes_folder)["train"]
    model = tiny_model(image_feature="patches")
    calls = count_tower_calls(model, monkeypatch)
    cached = embed(split, model, tmp_path / "cache", batch_size=4)  # several batches
    image_embeds = image_embeds_of(cached)
    assert model.config.image_feature_shape == (17, 32)  # CLS + 4 x 4 patches, 32 wide
    assert image_embeds.shape == (split.num_rows, 17, 32)
    assert image_embeds.dtype == torch.float16 and cached.features["image"] == split.features["image"]
    pixels = tiny_processor()(images=[row["image"] for row in split])["pixel_values"]
    expected = model.get_image_features(pixels)
    assert torch.equal(image_embeds, expected.half())  # the float32 features, rounded once
    torch.testing.assert_close(image_embeds.float(), expected, rtol=1e-3, atol=1e-3)

    assert isinstance(cached.data, datasets.table.MemoryMappedTable)
    inside_the_file = inside_the_file_of(cached)
    assert inside_the_file(image_embeds)  # a view of the read-only mapped file, no copy
    assert inside_the_file(image_embeds_of(cached.select(range(3, 9))))  # a contiguous selection too
    assert torch.equal(image_embeds_of(cached.select(range(3, 9))), image_embeds[3:9])
    picked = image_embeds_of(cached.select([4, 1]))  # rows out of order: a copy of those rows
    assert torch.equal(picked, image_embeds[[4, 1]]) and picked.dtype == torch.float16
    assert not inside_the_file(picked)

    encoded = calls["images"]
    again = embed(split, model, tmp_path / "cache", batch_size=4)
    assert calls["images"] == encoded == 2 * split.num_rows  # read back: CLIP ran only for `expected`
    assert torch.equal(image_embeds_of(again), image_embeds)
    key = embedding_fingerprint(split, model, image_processor_for(model.config.vision_config))
    assert cache_files(tmp_path / "cache") == [f"{key}.arrow"]  # the features file is gone


def test_pooled_and_patch_caches_of_one_tower_coexist(tmp_path, shapes_folder, monkeypatch):
    split = load_caption_dataset(shapes_folder)["test"]
    pooled, patches = tiny_model(), tiny_model(image_feature="patches")
    patches.vision_tower.load_state_dict(pooled.vision_tower.state_dict())
    assert weights_digest(patches.vision_tower) == weights_digest(pooled.vision_tower)
    pooled_calls = count_tower_calls(pooled, monkeypatch)
    patch_calls = count_tower_calls(patches, monkeypatch)
    for _ in range(2):  # the second time both are read back, each with its own shape
        assert image_embeds_of(embed(split, pooled, tmp_path / "cache")).shape == (split.num_rows, 32)
        assert image_embeds_of(embed(split, patches, tmp_path / "cache")).shape == (split.num_rows, 17, 32)
    assert pooled_calls["images"] == patch_calls["images"] == split.num_rows
    assert len(cache_files(tmp_path / "cache")) == 2
    # The pooled feature is the CLS token after the final layer norm: the two files hold different data.
    pooled_embeds = image_embeds_of(embed(split, pooled, tmp_path / "cache"))
    cls_token = image_embeds_of(embed(split, patches, tmp_path / "cache"))[:, 0].float()
    post_layernorm = pooled.vision_tower.post_layernorm
    torch.testing.assert_close(post_layernorm(cls_token), pooled_embeds, rtol=1e-2, atol=1e-2)


def test_a_crash_mid_write_leaves_nothing_a_later_run_trusts(tmp_path, shapes_folder, monkeypatch):
    split = load_caption_dataset(shapes_folder)["train"]
    model = tiny_model(image_feature="patches")
    original = model.get_image_features
    batches = []

    def dies_on_the_second_batch(pixel_values):
        batches.append(len(pixel_values))
        if len(batches) == 2:
            raise RuntimeError("killed mid-cache")
        return original(pixel_values).fill_(7.0)  # what a later run must never read

    monkeypatch.setattr(model, "get_image_features", dies_on_the_second_batch)
    with pytest.raises(RuntimeError, match="killed"):
        embed(split, model, tmp_path / "cache", batch_size=4)
    assert cache_files(tmp_path / "cache") == []  # no cache file, and the features file removed

    # A killed process runs no cleanup: it leaves its features file, which the next run replaces.
    key = embedding_fingerprint(split, model, image_processor_for(model.config.vision_config))
    stale = tmp_path / "cache" / "embeddings" / f".{key}.features.npy"
    np.save(stale, np.full((split.num_rows, 17, 32), 7.0, dtype=np.float16))
    monkeypatch.undo()
    calls = count_tower_calls(model, monkeypatch)
    result = image_embeds_of(embed(split, model, tmp_path / "cache", batch_size=4))
    assert calls["images"] == split.num_rows and result.shape[0] == split.num_rows
    assert not (result == 7.0).all(dim=(1, 2)).any()
    assert cache_files(tmp_path / "cache") == [f"{key}.arrow"]


def test_a_patch_value_beyond_half_precision_stops_instead_of_dropping_the_image(
    tmp_path, shapes_folder, monkeypatch
):
    split = load_caption_dataset(shapes_folder)["test"]
    model = tiny_model(image_feature="patches")
    original = model.get_image_features
    monkeypatch.setattr(model, "get_image_features", lambda pixels: original(pixels) * 1e5)
    with pytest.raises(ValueError, match="float16"):
        embed(split, model, tmp_path / "cache")
    assert cache_files(tmp_path / "cache") == []


def test_training_and_evaluation_read_a_patch_cache(tmp_path, shapes_folder):
    tokenizer = tiny_processor().tokenizer
    model = model_for_tokenizer(tokenizer, image_feature="patches")
    split = embed(load_caption_dataset(shapes_folder)["train"], model, tmp_path / "cache")
    image_embeds = image_embeds_of(split)
    model.fit_image_statistics(image_embeds)  # float16, read-only, memory-mapped
    standardised = model.decoder.prepare_image_embeds(image_embeds)  # (N, P, D) float32
    assert standardised.dtype == torch.float32
    assert standardised.reshape(-1, standardised.shape[-1]).mean(0).abs().max() < 1e-3  # over every token

    pairs = CaptionPairs.from_split(split, tokenizer)
    batch = pairs.__getitems__([0, 7])
    assert batch["image_embeds"].shape == (2, 17, 32) and batch["image_embeds"].dtype == torch.float16
    assert torch.equal(batch["image_embeds"][1], image_embeds[1])  # caption 7 is image 1's
    assert torch.isfinite(model(**batch).loss)

    inputs, rows = next(_embeds_batches(split, 8))
    assert inputs["image_embeds"].shape == (8, 17, 32) and rows == list(range(8))
    assert model.generate(**inputs, num_beams=2, max_new_tokens=4).shape[0] == 8
