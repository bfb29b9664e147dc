"""clip_lstm_captioner.pretraining: the demo's contrastively pre-trained CLIP tower."""

import json

import pytest
import torch
from tiny import TINY_VISION, tiny_tokenizer
from transformers import CLIPVisionConfig

from clip_lstm_captioner import pretraining as pretrain_clip
from clip_lstm_captioner.data import load_caption_dataset
from clip_lstm_captioner.shapes import make_shapes_dataset
from modeling_clip_lstm import ClipLstmForImageCaptioning


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    return load_caption_dataset(
        make_shapes_dataset(tmp_path_factory.mktemp("pre") / "set", num_images=48, seed=4)
    )["train"]


def test_contrastive_loss_rewards_matching_pairs():
    features = torch.randn(8, 16)
    scale = torch.tensor(2.0)
    matched = pretrain_clip.contrastive_loss(features, features, scale)
    shuffled = pretrain_clip.contrastive_loss(features, features[torch.randperm(8)], scale)
    assert matched < shuffled
    other = torch.randn(8, 16)
    torch.testing.assert_close(
        pretrain_clip.contrastive_loss(features, other, scale),
        pretrain_clip.contrastive_loss(other, features, scale),
    )  # symmetric


def test_pretraining_lowers_the_loss(train_split):
    tokenizer = tiny_tokenizer()
    tower, losses = pretrain_clip.pretrain_vision_tower(
        train_split, tokenizer, CLIPVisionConfig(**TINY_VISION), steps=60, batch_size=16, learning_rate=3e-3
    )
    assert len(losses) == 60 and not tower.training
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2


def test_the_tower_is_cached_and_loads_into_a_captioner(train_split, tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer()
    vision = CLIPVisionConfig(**TINY_VISION)
    folder = pretrain_clip.pretrained_tower_folder(
        train_split, tokenizer, vision, cache_dir=tmp_path, steps=5
    )
    assert len(json.loads((folder / "pretraining_losses.json").read_text())) == 5
    calls = []
    monkeypatch.setattr(pretrain_clip, "pretrain_vision_tower", lambda *a, **k: calls.append(1))
    assert (
        pretrain_clip.pretrained_tower_folder(train_split, tokenizer, vision, cache_dir=tmp_path, steps=5)
        == folder
    )
    assert calls == []  # reused, not trained again
    monkeypatch.undo()
    other = pretrain_clip.pretrained_tower_folder(train_split, tokenizer, vision, cache_dir=tmp_path, steps=6)
    assert other != folder
    assert sorted(p.name for p in (tmp_path / "encoders").iterdir()) == sorted([folder.name, other.name])
    model = ClipLstmForImageCaptioning.from_clip(
        str(folder), vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    assert model.get_image_features(torch.randn(2, 3, 32, 32)).shape == (2, 32)
