"""Hub-native behaviour: save/load round trips, auto classes from a fresh process, the real-size default."""

import json

import pytest
import torch
from tiny import coloured_image, model_for_tokenizer, peaked_model, run_fresh, tiny_processor

from configuration_clip_lstm import ClipLstmConfig
from modeling_clip_lstm import ClipLstmForImageCaptioning, ClipLstmGenerateOutput
from processing import ClipLstmProcessor, build_caption_tokenizer


def saved_pair(tmp_path):
    processor = tiny_processor()
    model = model_for_tokenizer(processor.tokenizer, seed=3)
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(30)  # peaked, so captions are not all the same
    model.fit_image_statistics(torch.randn(20, 32))
    model.generation_config.num_beams = 3
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return model, processor


def test_round_trip_gives_identical_logits_and_captions(tmp_path):
    model, processor = saved_pair(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = ClipLstmForImageCaptioning.from_pretrained(tmp_path)
    loaded_processor = ClipLstmProcessor.from_pretrained(tmp_path)
    images = [coloured_image((200, 30, 30)), coloured_image((30, 30, 200), size=(60, 20))]
    inputs = processor(images=images, text=["a red circle", "a blue square"])
    loaded_inputs = loaded_processor(images=images, text=["a red circle", "a blue square"])
    assert all(torch.equal(inputs[k], loaded_inputs[k]) for k in inputs)
    torch.testing.assert_close(loaded(**loaded_inputs).logits, model(**inputs).logits, rtol=0, atol=0)
    assert torch.equal(loaded.decoder.image_embeds_std, model.decoder.image_embeds_std)
    assert loaded.generation_config.num_beams == 3 and loaded.generation_config.max_new_tokens == 7
    ours = processor.batch_decode(model.generate(pixel_values=inputs["pixel_values"]))
    theirs = loaded_processor.batch_decode(loaded.generate(pixel_values=loaded_inputs["pixel_values"]))
    assert ours == theirs and all(ours)


# Run where the project cannot be imported: everything has to come from the saved folder.
FRESH_PROCESS = """
    import json, socket, sys
    # Nor may loading touch the network: any connection attempt is recorded and refused.
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network blocked by the test")
    socket.socket.connect = refuse
    socket.create_connection = refuse

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoProcessor
    folder = sys.argv[1]
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    images = [Image.open(path) for path in sys.argv[2:]]
    ids = model.generate(**processor(images=images, return_tensors="pt"))
    print(json.dumps({
        "config": type(config).__module__ + "." + type(config).__name__,
        "model": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__module__,
        "captions": processor.batch_decode(ids),
        "network_attempts": attempts,
    }))
"""


def test_auto_classes_load_in_a_fresh_process_without_the_project_or_network(tmp_path):
    model_dir = tmp_path / "model"
    model, processor = saved_pair(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_clip_lstm.ClipLstmConfig",
        "AutoModel": "modeling_clip_lstm.ClipLstmForImageCaptioning",
    }
    assert (
        json.loads((model_dir / "processor_config.json").read_text())["auto_map"]["AutoProcessor"]
        == "processing.ClipLstmProcessor"
    )
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        paths.append(tmp_path / f"image{i}.png")
        coloured_image(colour).save(paths[-1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
    }  # no HF_HUB_OFFLINE
    result = run_fresh(FRESH_PROCESS, model_dir, *paths, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"].startswith("transformers_modules.") and report["model"].endswith(
        "ClipLstmForImageCaptioning"
    )
    assert report["config"].startswith("transformers_modules.") and report["processor"].startswith(
        "transformers_modules."
    )
    assert report["network_attempts"] == []
    inputs = processor(images=[p for p in paths])
    assert report["captions"] == processor.batch_decode(model.generate(pixel_values=inputs["pixel_values"]))


def test_real_size_default_runs_offline():
    config = ClipLstmConfig()  # ViT-B/32 tower, 768-d pooled feature, CLIP's vocabulary plus a pad token
    torch.manual_seed(0)
    model = ClipLstmForImageCaptioning(config).eval()
    tower_params = sum(p.numel() for p in model.vision_tower.parameters())
    assert 87_000_000 < tower_params < 89_000_000  # ViT-B/32's vision tower
    assert model.decoder.lm_head.out_features == 49409 and model.decoder.image_projection.in_features == 768
    pixels = torch.randn(1, 3, 224, 224)
    features = model.get_image_features(pixels)
    assert features.shape == (1, 768)
    ids = torch.tensor([[config.bos_token_id, 320, 1929, config.eos_token_id]])
    out = model(pixel_values=pixels, input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 4, 49409) and torch.isfinite(out.loss)
    sequences = model.generate(image_embeds=features, num_beams=2, max_new_tokens=3)
    assert sequences.shape[0] == 1 and sequences[0, 0] == config.bos_token_id and sequences.shape[1] <= 4


def test_generation_defaults_travel_with_the_model(tmp_path):
    model = peaked_model()
    model.generation_config.update(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=2)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["num_beams"] == 4 and saved["length_penalty"] == 0.6 and saved["pad_token_id"] == 0
    loaded = ClipLstmForImageCaptioning.from_pretrained(tmp_path)
    feats = torch.randn(3, 32)
    assert torch.equal(
        loaded.generate(image_embeds=feats),
        model.generate(image_embeds=feats, num_beams=4, length_penalty=0.6, no_repeat_ngram_size=2),
    )
    # a saved generation_config.json alone never sends the call to transformers' slower search
    assert isinstance(
        loaded.generate(image_embeds=feats, return_dict_in_generate=True), ClipLstmGenerateOutput
    )


def test_load_captioner_refuses_a_tokenizer_smaller_than_the_vocabulary(tmp_path):
    from clip_lstm_captioner.cli import load_captioner
    from clip_lstm_captioner.errors import UsageError

    processor = tiny_processor()
    model = model_for_tokenizer(processor.tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    load_captioner(str(tmp_path))  # a matching pair loads
    small = build_caption_tokenizer(
        ["a b c d e f g h"], min_frequency=1
    )  # 12 entries: ids >= 12 decode to ""
    ClipLstmProcessor(processor.image_processor, small).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=f"{len(small)}.*{len(processor.tokenizer)}") as info:
        load_captioner(str(tmp_path))
    assert "\n" not in str(info.value)


PIPELINE_PROCESS = """
    import json, sys
    from transformers import pipeline
    folder, paths = sys.argv[1], sys.argv[2:]
    captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
    print(json.dumps({
        "batch": captioner(paths),
        "one": captioner(paths[0], max_new_tokens=3),
        "inferred_task": pipeline(model=folder, trust_remote_code=True)(paths[0]),
        "class": type(captioner).__module__ + "." + type(captioner).__name__,
    }))
"""


def test_pipeline_captions_images_from_a_saved_folder_without_the_project(tmp_path):
    model_dir = tmp_path / "model"
    model, processor = saved_pair(model_dir)
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        paths.append(tmp_path / f"image{i}.png")
        coloured_image(colour, size=(50 + 10 * i, 40)).save(paths[-1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    result = run_fresh(PIPELINE_PROCESS, model_dir, *paths, cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.")
    pixel_values = processor(images=paths)["pixel_values"]
    expected = processor.batch_decode(model.generate(pixel_values))  # the saved generation settings
    assert [row[0]["generated_text"] for row in report["batch"]] == expected and all(expected)
    assert report["inferred_task"] == [{"generated_text": expected[0]}]
    short = processor.batch_decode(model.generate(pixel_values[:1], max_new_tokens=3))
    assert report["one"] == [{"generated_text": short[0]}]


def test_declared_transformers_versions_agree_and_admit_the_one_that_saved_the_model(tmp_path):
    from pathlib import Path

    import tomllib
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    space_lines = (root / "space" / "requirements.txt").read_text().splitlines()
    declared = [
        Requirement(line) for line in [*dependencies, *space_lines] if line.startswith("transformers")
    ]
    assert len(declared) == 2 and declared[0].specifier == declared[1].specifier
    peaked_model().save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["transformers_version"]
    assert declared[0].specifier.contains(written)
    # generate()'s `cache` argument (the fallback search) is 5.24's; CLIPImageProcessorPil is 5.4's
    assert not declared[0].specifier.contains("5.23.0") and not declared[0].specifier.contains("5.0.0")
