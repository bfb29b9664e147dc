"""ClipLstmConfig and ClipLstmForImageCaptioning.forward: shapes, alignment, loss, frozen tower."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tiny import BOS, EOS, PAD, TINY_VISION, image_embeds, tiny_config, tiny_model
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from configuration_clip_lstm import ClipLstmConfig
from modeling_clip_lstm import ClipLstmAttention, ClipLstmForImageCaptioning

# ----------------------------------------------------------------------------- config


def test_default_config_is_vit_b32_with_clip_vocabulary():
    config = ClipLstmConfig()
    vision = config.vision_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (
        224,
        32,
        768,
        12,
    )
    assert config.image_feature == "pooled" and config.image_feature_dim == 768
    assert config.vocab_size == 49409 and config.pad_token_id not in (
        config.eos_token_id,
        config.bos_token_id,
    )
    assert ClipLstmConfig(image_feature="projected").image_feature_dim == 512


def test_config_round_trip_keeps_every_hyperparameter(tmp_path):
    config = tiny_config(image_feature="projected", normalize_image_embeds=False, dropout=0.3, num_layers=3)
    config.save_pretrained(tmp_path)
    loaded = ClipLstmConfig.from_pretrained(tmp_path)
    for name in (
        "image_feature",
        "normalize_image_embeds",
        "dropout",
        "num_layers",
        "embed_dim",
        "vocab_size",
    ):
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert isinstance(config.to_dict()["vision_config"], dict)


def test_pad_equal_to_eos_is_rejected():
    with pytest.raises(ValueError, match="pad_token_id and eos_token_id are both 2"):
        tiny_config(pad_token_id=EOS)


@pytest.mark.parametrize(
    "overrides, named",
    [
        (dict(image_feature="tokens"), "image_feature"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(dropout=1.5), "dropout"),
        (dict(bos_token_id=99), "bos_token_id"),
        (dict(bos_token_id=PAD), "bos_token_id"),
        (dict(vision_config=3), "vision_config"),
        (dict(attention_heads=0), "attention_heads"),
        (dict(image_feature="patches", attention_heads=3), "attention_heads"),  # 3 does not divide 16
        (dict(image_feature="patches", layout_dim=-1), "layout_dim"),
        (dict(image_feature="patches", layout_dim=2.5), "layout_dim"),
    ],
)
def test_bad_config_values_raise_naming_the_value(overrides, named):
    with pytest.raises(ValueError, match=named):
        tiny_config(**overrides)


def test_a_config_saved_before_attention_heads_existed_loads_with_one_head(tmp_path):
    tiny_config(image_feature="patches").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["attention_heads"]  # as written by the release that introduced patches
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert ClipLstmConfig.from_pretrained(tmp_path).attention_heads == 1


def test_a_patches_model_saved_before_the_layout_summary_existed_loads_and_captions_unchanged(tmp_path):
    torch.manual_seed(0)
    model = ClipLstmForImageCaptioning(tiny_config(image_feature="patches", layout_dim=0)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["layout_dim"]  # as written by the releases before it
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = ClipLstmForImageCaptioning.from_pretrained(tmp_path).eval()
    assert loaded.config.layout_dim == 0 and loaded.decoder.layout is None
    assert not any("layout" in name for name in loaded.state_dict())
    embeds = torch.randn(3, *model.config.image_feature_shape)
    torch.testing.assert_close(
        loaded.generate(image_embeds=embeds, num_beams=3), model.generate(image_embeds=embeds, num_beams=3)
    )


def test_the_layout_summary_tells_where_the_tokens_sit_which_attention_alone_does_not():
    # Attention is a weighted average: moving patch tokens to other grid cells changes nothing.
    # The layout summary reads each cell with its own weights, so the same move changes the logits.
    torch.manual_seed(0)
    embeds = torch.randn(2, *tiny_config(image_feature="patches").image_feature_shape)
    moved = torch.cat([embeds[:, :1], embeds[:, 1:].roll(1, dims=1)], dim=1)  # CLS stays first
    ids = torch.tensor([[BOS, 5, 6, 7]] * 2)
    for layout_dim, moves in ((0, False), (3, True)):
        model = tiny_model(image_feature="patches", layout_dim=layout_dim, initializer_range=0.5)
        with torch.no_grad():
            before = model(image_embeds=embeds, input_ids=ids).logits
            after = model(image_embeds=moved, input_ids=ids).logits
        assert (not torch.allclose(before, after, rtol=1e-4, atol=1e-5)) == moves, layout_dim


def test_each_attention_head_reads_its_own_slice_of_the_tokens():
    # the batched multi-head attention against a per-head loop written from the definition
    torch.manual_seed(0)
    config = tiny_config(image_feature="patches", attention_heads=4, attention_dim=8)
    attention = ClipLstmAttention(config)
    batch, group, steps, tokens = 2, 3, 4, 5
    hidden = torch.randn(batch * group, steps, config.hidden_size)
    values = torch.randn(batch, tokens, config.embed_dim)
    keys = attention.key(values)
    layout = torch.randn(batch, config.embed_dim)  # the layout summary: one vector per image
    attended, weights = attention(hidden, values, keys, layout)
    queries = attention.query(hidden)
    for row in range(batch * group):
        image = row // group
        contexts, head_weights = [], []
        for head in range(4):
            q = queries[row, :, 2 * head : 2 * head + 2]  # attention_dim 8 / 4 heads
            k = keys[image, :, 2 * head : 2 * head + 2]
            v = values[image, :, 4 * head : 4 * head + 4]  # embed_dim 16 / 4 heads
            w = (q @ k.T / math.sqrt(2)).softmax(-1)
            contexts.append(w @ v)
            head_weights.append(w)
        summary = layout[image].expand(steps, -1)
        expected = torch.tanh(attention.output(torch.cat([hidden[row], *contexts, summary], dim=-1)))
        torch.testing.assert_close(attended[row], expected)
        torch.testing.assert_close(weights[row], torch.stack(head_weights).mean(0))


# ----------------------------------------------------------------------------- forward

IDS = torch.tensor([[BOS, 5, 6, 7, EOS], [BOS, 8, EOS, PAD, PAD], [BOS, 9, 10, EOS, PAD]])
MASK = (IDS != PAD).long()
LABELS = IDS.masked_fill(MASK == 0, -100)


def test_logits_align_with_input_ids_and_loss_is_shifted_cross_entropy():
    model = tiny_model()
    feats = image_embeds(3)
    out = model(image_embeds=feats, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    assert out.logits.shape == (3, 5, 12) and out.image_embeds.shape == (3, 32)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 12), LABELS[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    # logits[:, t] depends on input_ids[:, :t+1] only: changing a later token leaves it unchanged
    changed = IDS.clone()
    changed[0, 3] = 11
    out2 = model(image_embeds=feats, input_ids=changed)
    torch.testing.assert_close(out2.logits[0, :3], out.logits[0, :3])
    assert not torch.allclose(out2.logits[0, 3], out.logits[0, 3])


def test_eos_is_a_target_and_padding_is_not():
    model = tiny_model()
    feats = image_embeds(3)
    base = model(image_embeds=feats, input_ids=IDS, attention_mask=MASK, labels=IDS).loss
    # labels given without -100 at padding: the mask still keeps padding out of the loss
    torch.testing.assert_close(
        base, model(image_embeds=feats, input_ids=IDS, attention_mask=MASK, labels=LABELS).loss
    )
    # changing what sits in padded positions changes nothing
    other_pad = IDS.masked_fill(MASK == 0, 11)
    torch.testing.assert_close(
        base, model(image_embeds=feats, input_ids=other_pad, attention_mask=MASK, labels=other_pad).loss
    )
    # the EOS label is scored: replacing it changes the loss
    no_eos = LABELS.clone()
    no_eos[1, 2] = 4
    assert not torch.isclose(
        base, model(image_embeds=feats, input_ids=IDS, attention_mask=MASK, labels=no_eos).loss
    )


def test_batch_is_cut_to_its_longest_caption():
    model = tiny_model()
    feats = image_embeds(2)
    short = IDS[1:]  # longest caption: 4 tokens, one pad column
    padded = torch.cat(
        [short, torch.full((2, 72), PAD)], dim=1
    )  # 77-token padding, as the original project did
    out = model(image_embeds=feats, input_ids=padded, attention_mask=(padded != PAD).long(), labels=padded)
    assert out.logits.shape == (2, 4, 12)
    ref = model(
        image_embeds=feats,
        input_ids=short[:, :4],
        attention_mask=(short[:, :4] != PAD).long(),
        labels=short[:, :4],
    )
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.logits, ref.logits)


def test_training_path_without_logits_gives_the_same_loss_and_gradients():
    model = tiny_model(dropout=0.0).train()
    feats = image_embeds(3)
    full = model(image_embeds=feats, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    full.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    lean = model(image_embeds=feats, input_ids=IDS, attention_mask=MASK, labels=LABELS, return_logits=False)
    lean.loss.backward()
    assert lean.logits is None
    torch.testing.assert_close(lean.loss, full.loss)
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name])


def test_left_padding_is_rejected():
    model = tiny_model()
    ids = torch.tensor([[PAD, BOS, 5, EOS]])
    with pytest.raises(ValueError, match="right-padded"):
        model(image_embeds=image_embeds(1), input_ids=ids, attention_mask=(ids != PAD).long())


def test_pixel_values_and_image_embeds_paths_agree():
    model = tiny_model()
    pixels = torch.randn(2, 3, 32, 32)
    feats = model.get_image_features(pixels)
    assert feats.shape == (2, 32)
    a = model(pixel_values=pixels, input_ids=IDS[:2]).logits
    b = model(image_embeds=feats, input_ids=IDS[:2]).logits
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        model(pixel_values=pixels, image_embeds=feats, input_ids=IDS[:2])
    with pytest.raises(ValueError, match=r"image_embeds must be \(batch, 32\)"):
        model(image_embeds=torch.randn(2, 16), input_ids=IDS[:2])


def test_projected_feature_uses_clip_projection():
    model = tiny_model(image_feature="projected")
    pixels = torch.randn(2, 3, 32, 32)
    expected = model.vision_tower(pixel_values=pixels).image_embeds
    torch.testing.assert_close(model.get_image_features(pixels), expected)
    assert model(image_embeds=expected, input_ids=IDS[:2]).logits.shape == (2, 5, 12)


def test_normalisation_is_a_config_flag_applied_inside_the_model():
    feats = image_embeds(3)
    normalised = tiny_model(normalize_image_embeds=True)
    raw = tiny_model(normalize_image_embeds=False)
    torch.testing.assert_close(
        normalised(image_embeds=feats, input_ids=IDS).logits,
        normalised(image_embeds=3 * feats, input_ids=IDS).logits,
    )
    assert not torch.allclose(
        raw(image_embeds=feats, input_ids=IDS).logits, raw(image_embeds=3 * feats, input_ids=IDS).logits
    )


def test_vision_tower_is_frozen_and_stays_in_eval_mode():
    model = tiny_model().train()
    assert not model.vision_tower.training and model.decoder.training
    out = model(pixel_values=torch.randn(3, 3, 32, 32), input_ids=IDS, attention_mask=MASK, labels=LABELS)
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.vision_tower.parameters())
    assert model.decoder.lm_head.weight.grad is not None


def test_forward_needs_input_ids():
    with pytest.raises(ValueError, match="input_ids"):
        tiny_model()(image_embeds=image_embeds(1))


# ----------------------------------------------------------------------------- from_clip


def test_from_clip_loads_pretrained_tower_weights_once(tmp_path):
    torch.manual_seed(3)
    clip = CLIPModel(
        CLIPConfig(
            vision_config=TINY_VISION,
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=50,
            ),
            projection_dim=16,
        )
    )
    clip.save_pretrained(tmp_path / "clip")  # a full CLIP checkpoint, like openai/clip-vit-base-patch32
    for feature in ("pooled", "projected"):
        model = ClipLstmForImageCaptioning.from_clip(
            str(tmp_path / "clip"),
            image_feature=feature,
            vocab_size=12,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            embed_dim=16,
            hidden_size=24,
        )
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = (
                clip.get_image_features(pixel_values=pixels)
                if feature == "projected"
                else (clip.vision_model(pixel_values=pixels).pooler_output)
            )
        expected = getattr(expected, "pooler_output", expected)
        torch.testing.assert_close(model.get_image_features(pixels), expected)
        assert model.config.vision_config.hidden_size == 32
        assert not any(p.requires_grad for p in model.vision_tower.parameters())


def test_from_clip_accepts_a_vision_only_folder(tmp_path):
    torch.manual_seed(4)
    tower = CLIPVisionModel(tiny_config().vision_config)
    tower.save_pretrained(tmp_path / "tower")
    model = ClipLstmForImageCaptioning.from_clip(
        str(tmp_path / "tower"), vocab_size=12, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS
    )
    for (name, a), b in zip(
        tower.state_dict().items(), model.vision_tower.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_from_clip_offline_hub_id_fails_in_one_line():
    with pytest.raises(OSError) as info:
        ClipLstmForImageCaptioning.from_clip(
            "openai/clip-vit-base-patch32",
            vocab_size=12,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
        )
    message = str(info.value)
    assert "\n" not in message and "openai/clip-vit-base-patch32" in message and "local folder" in message
