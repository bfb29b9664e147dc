"""Publishing: a fake Hub on 127.0.0.1 receives the commit; the uploaded files, in a fresh folder,
load with AutoModel / AutoProcessor and trust_remote_code in a Python that cannot import this project,
and caption exactly as the original model does.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from tiny import coloured_image, peaked_captioner, run_fresh

from clip_lstm_captioner.publishing import model_index, publish, save_for_hub, write_model_card
from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import ClipLstmProcessor

REPO_ID = "tester/tiny-captioner"
GENERATE = dict(num_beams=3, max_new_tokens=8)
REPORT = {
    "dataset": "jxie/flickr8k",
    "split": "test",
    "num_images": 1000,
    "models": {
        "ours": {"bleu_1": 0.61, "bleu_4": 0.2134567, "meteor": 0.2, "rouge_l": 0.45, "cider": 0.52},
        "blip": {"bleu_4": 0.3, "cider": 0.9},
    },
    "generation": {"num_beams": 5, "max_new_tokens": 30},
}
TRAINING_ARGS = {
    "dataset": "jxie/flickr8k",
    "learning_rate": 0.001,
    "num_epochs": 20,
    "vision_model": "openai/clip-vit-base-patch32",
}
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "configuration_clip_lstm.py",
    "modeling_clip_lstm.py",
    "processing.py",
}


# ----------------------------------------------------------------------------- a fake Hub


class FakeHub(ThreadingHTTPServer):
    """The part of the Hub API that create_repo + upload_folder use; files are kept in memory."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[str] = []
        self.requests: list[str] = []


class HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # keep the test output clean
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.server.requests.append(f"GET {self.path}")
        self._reply(404, {"error": f"the fake Hub does not serve GET {self.path}"})

    def do_POST(self):
        path = self.path.split("?")[0]
        self.server.requests.append(f"POST {path}")
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[5] == "main":
            repo_id = "/".join(parts[2:4])
            if repo_id not in self.server.repos:
                return self._reply(404, {"error": f"Repository {repo_id} not found"})
            if parts[4] == "preupload":
                return self._preupload(json.loads(body))
            if parts[4] == "commit":
                return self._commit(repo_id, body)
        self._reply(404, {"error": f"the fake Hub does not serve POST {path}"})

    def _create(self, payload: dict) -> None:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.server.repos:
            return self._reply(
                409, {"error": "You already created this model repo", "url": f"{self.server.url}/{repo_id}"}
            )
        self.server.repos[repo_id] = {}
        self._reply(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        text = payload["content"]
        try:
            assert text.startswith("---\n"), "README.md has no YAML front matter"
            yaml.safe_load(text.split("---\n")[1])
        except (AssertionError, yaml.YAMLError) as error:
            return self._reply(400, {"errors": [{"message": str(error)}]})
        self._reply(200, {"errors": [], "warnings": []})

    def _preupload(self, payload: dict) -> None:
        # "regular" for every file: contents come base64-encoded inside the commit (no LFS / Xet storage here).
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
            for f in payload["files"]
        ]
        self._reply(200, {"files": files, "commitOid": "0" * 40})

    def _commit(self, repo_id: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._reply(400, {"error": "the commit payload must start with a header line"})
        for line in lines[1:]:
            if line["key"] != "file":
                return self._reply(
                    400, {"error": f"the fake Hub takes regular files only, got {line['key']}"}
                )
            self.server.repos[repo_id][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        oid = f"{len(self.server.commits) + 1:040x}"
        self.server.commits.append(lines[0]["value"]["summary"])
        self._reply(
            200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}
        )


@pytest.fixture
def hub(monkeypatch):
    """A running fake Hub, with offline mode lifted and every connection outside 127.0.0.1 refused."""
    real_getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"test guard: no network outside 127.0.0.1 (tried {host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    # conftest sets HF_HUB_OFFLINE=1; huggingface_hub reads it once, into this constant, checked per request.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def model_and_processor():
    return peaked_captioner()


@pytest.fixture
def images(tmp_path) -> list[Path]:
    paths = []
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 40, 210)), ("green", (30, 160, 40))):
        paths.append(tmp_path / f"{name}.png")
        coloured_image(colour, size=(48, 40)).save(paths[-1])
    return paths


def generate_ids(model, processor, images) -> list[list[int]]:
    return model.generate(**processor(images=[str(p) for p in images]), **GENERATE).tolist()


# Run in a fresh interpreter, cwd elsewhere, where the project's modules cannot be imported.
LOAD_ELSEWHERE = r"""
import json, sys
try:
    import processing  # noqa: F401
    raise SystemExit("the project's processing.py is importable: the check would prove nothing")
except ImportError:
    pass
folder, generate, snippet, images = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:]
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
ids = model.generate(**processor(images=images), **generate).tolist()
result = {"ids": ids, "modules": [type(model).__module__, type(processor).__module__], "dtype": str(model.dtype)}
print("RESULT " + json.dumps(result))
exec(compile(snippet, "model card snippet", "exec"), {})
"""


def card_snippet(readme: str) -> str:
    return readme.split("```python\n")[1].split("```")[0]


def run_elsewhere(folder: Path, snippet: str, images: list[Path], cwd: Path) -> tuple[dict, str]:
    env = os.environ | {"HF_MODULES_CACHE": str(cwd / "modules")}  # a fresh dynamic-module cache
    done = run_fresh(
        LOAD_ELSEWHERE, folder, json.dumps(GENERATE), snippet, *images, cwd=cwd, env=env, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT ") :])
    return result, lines[-1]


# ----------------------------------------------------------------------------- tests


def test_published_repo_is_complete_and_captions_identically_without_the_project(
    hub, model_and_processor, images, tmp_path
):
    model, processor = model_and_processor
    run = tmp_path / "run"
    model.save_pretrained(run)
    processor.save_pretrained(run)
    (run / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    (run / "report.json").write_text(json.dumps(REPORT))

    commit = publish(run, REPO_ID, endpoint=hub.url, token="hf_fake_token", commit_message="first upload")

    assert commit.commit_url.startswith(f"{hub.url}/{REPO_ID}/commit/") and hub.commits == ["first upload"]
    # A set: without hf_xet, huggingface_hub validates the YAML twice (upload_folder, then create_commit).
    assert set(hub.requests) == {
        "POST /api/repos/create",
        "POST /api/validate-yaml",
        f"POST /api/models/{REPO_ID}/preupload/main",
        f"POST /api/models/{REPO_ID}/commit/main",
    }
    uploaded = hub.repos[REPO_ID]
    assert set(uploaded) == EXPECTED_FILES
    config = json.loads(uploaded["config.json"])
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel"}
    assert (
        json.loads(uploaded["processor_config.json"])["auto_map"]["AutoProcessor"]
        == "processing.ClipLstmProcessor"
    )

    fresh, elsewhere = tmp_path / "downloaded", tmp_path / "elsewhere"
    fresh.mkdir()
    elsewhere.mkdir()
    for name, content in uploaded.items():
        (fresh / name).write_bytes(content)
    readme = uploaded["README.md"].decode()
    assert f'"{REPO_ID}"' in card_snippet(readme)
    # The card's snippet, as written, with the repo id pointing at the downloaded folder and an example.jpg.
    snippet = card_snippet(readme).replace(f'"{REPO_ID}"', repr(str(fresh)))
    coloured_image((200, 30, 30)).save(elsewhere / "example.jpg")
    result, snippet_output = run_elsewhere(fresh, snippet, images, elsewhere)

    assert result["ids"] == generate_ids(model, processor, images)
    assert all(module.startswith("transformers_modules.") for module in result["modules"]), result["modules"]
    assert result["dtype"] == "torch.float32"
    ids = model.generate(**processor(images=[elsewhere / "example.jpg"]), num_beams=5, max_new_tokens=30)
    assert snippet_output == processor.batch_decode(ids)[0]


def test_model_card_metadata_parses_and_carries_the_evaluation(model_and_processor, tmp_path):
    model, processor = model_and_processor
    names = save_for_hub(
        model, processor, tmp_path, report=REPORT, training_args=TRAINING_ARGS, repo_id=REPO_ID
    )
    assert set(names) == EXPECTED_FILES
    text = (tmp_path / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["license"] == "apache-2.0" and metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-to-text" and metadata["datasets"] == ["jxie/flickr8k"]
    assert metadata["base_model"] == "openai/clip-vit-base-patch32"
    assert metadata["metrics"] == ["bleu", "cider", "meteor", "rouge"]
    results = {
        (r.metric_name, r.metric_value) for r in ModelCard(text).data.eval_results
    }  # the Hub client's parser
    assert ("BLEU-4", 0.2135) in results and ("CIDEr", 0.52) in results and len(results) == 5
    assert (
        "research use only" in text
        and "| learning_rate | 0.001 |" in text
        and "| blip | - | 0.3 | - | - | 0.9 |" in text
    )


def test_model_index_tolerates_missing_keys():
    assert model_index(None, "m") == [] and model_index({"models": {}}, "m") == []
    flat = model_index({"bleu_4": 0.25, "cider": "n/a"}, "m")  # a flat report, a non-number skipped
    (result,) = flat[0]["results"]
    assert result["dataset"] == {"type": "unknown", "name": "unknown"}
    assert result["metrics"] == [{"type": "bleu", "name": "BLEU-4", "value": 0.25, "args": {"max_order": 4}}]
    shapes = model_index({"dataset": "shapes", "models": {"ours": {"meteor": 0.5}}}, "m")
    assert shapes[0]["results"][0]["dataset"]["name"] == "shapes (synthetic)"


def test_card_tells_the_bleu_orders_apart_and_states_its_one_scale(model_and_processor, tmp_path):
    model, processor = model_and_processor
    report = {
        **REPORT,
        "models": {"ours": {"bleu_1": 0.61, "bleu_2": 0.4, "bleu_3": 0.3, "bleu_4": 0.2134567}},
    }
    save_for_hub(model, processor, tmp_path, report=report, repo_id=REPO_ID)
    text = (tmp_path / "README.md").read_text()
    results = ModelCard(text).data.eval_results  # the Hub client's parser
    bleu = {(r.metric_type, json.dumps(r.metric_args)): (r.metric_name, r.metric_value) for r in results}
    assert bleu == {
        ("bleu", '{"max_order": 1}'): ("BLEU-1", 0.61),
        ("bleu", '{"max_order": 2}'): ("BLEU-2", 0.4),
        ("bleu", '{"max_order": 3}'): ("BLEU-3", 0.3),
        ("bleu", '{"max_order": 4}'): ("BLEU-4", 0.2135),
    }
    # the table under "Evaluation" uses the metadata's scale, and the card says which one
    assert "| ours | 0.61 | 0.4 | 0.3 | 0.2135 |" in text and "0-1 scale" in text


def test_card_without_report_or_arguments_states_the_shapes_terms(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path)
    text = write_model_card(tmp_path, training_args={"dataset": "shapes"}).read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert "model-index" not in metadata and "datasets" not in metadata
    assert "project's own synthetic `shapes` set" in text and "No evaluation report" in text


def test_float16_halves_the_weights_and_still_loads_and_captions_on_cpu(
    model_and_processor, images, tmp_path
):
    model, processor = model_and_processor
    full, half = tmp_path / "float32", tmp_path / "float16"
    save_for_hub(model, processor, full)
    save_for_hub(model, processor, half, float16=True)
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.56, ratio
    assert "stored in f16" in (half / "README.md").read_text()

    loaded = ClipLstmForImageCaptioning.from_pretrained(half).eval()
    assert loaded.dtype == torch.float32  # upcast by default: config.json still says float32
    rounded = ClipLstmForImageCaptioning.from_pretrained(full).eval()
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.half().float())
    assert generate_ids(loaded, processor, images) == generate_ids(rounded, processor, images)
    assert ClipLstmForImageCaptioning.from_pretrained(half, dtype=torch.float16).dtype == torch.float16


def test_publish_says_in_one_line_what_is_wrong(model_and_processor, tmp_path):
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):  # conftest keeps the suite offline
        publish(model_and_processor, REPO_ID)
    constants_offline = constants.HF_HUB_OFFLINE
    try:
        constants.HF_HUB_OFFLINE = False
        with pytest.raises(ValueError, match="not a model folder"):
            publish(tmp_path / "nothing", REPO_ID)
    finally:
        constants.HF_HUB_OFFLINE = constants_offline


def test_a_tokenizer_that_does_not_fit_the_model_is_not_published(tmp_path):
    from tiny import tiny_model, tiny_processor

    from processing import VocabularyMismatchError

    model, processor = tiny_model(), tiny_processor()  # a 12-word model with a 30-entry tokenizer
    with pytest.raises(
        VocabularyMismatchError, match="the tokenizer has 30 entries but the model's vocabulary has 12"
    ):
        save_for_hub(model, processor, tmp_path / "upload")
    assert not (tmp_path / "upload").exists()


# ----------------------------------------------------------------------------- an attention model


LOAD_WITH_ATTENTIONS = r"""
import json, sys
try:
    import processing  # noqa: F401
    raise SystemExit("the project's processing.py is importable: the check would prove nothing")
except ImportError:
    pass
folder, images = sys.argv[1], sys.argv[2:]
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
out = model.generate(**processor(images=images), num_beams=3, max_new_tokens=8, return_dict_in_generate=True,
                     output_attentions=True)
print("RESULT " + json.dumps({"ids": out.sequences.tolist(), "attentions": out.attentions.tolist(),
                              "feature": model.config.image_feature,
                              "layout": model.decoder.layout is not None}))
"""


@pytest.fixture(scope="module")
def patches_run(tmp_path_factory):
    """A model trained by train_accelerate.py with `--image_feature patches` on 48 shapes images."""
    from tiny import TINY_VISION

    import train_accelerate
    from clip_lstm_captioner.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("patches")
    dataset = make_shapes_dataset(root / "set", num_images=48, seed=1)
    output_dir = root / "run"
    train_accelerate.main(
        ["--dataset", str(dataset), "--data_cache_dir", str(root / "cache"), "--output_dir", str(output_dir),
         "--vision_model", "random", "--vision_config", json.dumps(TINY_VISION), "--image_feature", "patches",
         "--min_word_frequency", "1", "--embed_dim", "16", "--hidden_size", "24", "--batch_size", "16",
         "--num_epochs", "2", "--learning_rate", "0.01", "--num_workers", "0", "--no_eval"]
    )  # fmt: skip
    return output_dir


def test_a_trained_attention_model_publishes_and_reloads_with_identical_captions_and_attentions(
    hub, patches_run, images, tmp_path
):
    publish(
        patches_run / "model", REPO_ID, endpoint=hub.url, token="hf_fake_token", commit_message="attention"
    )
    fresh, elsewhere = tmp_path / "downloaded", tmp_path / "elsewhere"
    fresh.mkdir()
    elsewhere.mkdir()
    for name, content in hub.repos[REPO_ID].items():
        (fresh / name).write_bytes(content)
    env = os.environ | {"HF_MODULES_CACHE": str(elsewhere / "modules")}
    done = run_fresh(LOAD_WITH_ATTENTIONS, fresh, *images, cwd=elsewhere, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])

    model = ClipLstmForImageCaptioning.from_pretrained(patches_run / "model").eval()
    processor = ClipLstmProcessor.from_pretrained(patches_run / "model")
    out = model.generate(
        **processor(images=[str(p) for p in images]),
        num_beams=3,
        max_new_tokens=8,
        return_dict_in_generate=True,
        output_attentions=True,
    )
    assert result["feature"] == "patches" and result["layout"]  # the script's default layout summary
    assert result["ids"] == out.sequences.tolist()
    assert torch.equal(torch.tensor(result["attentions"]), out.attentions)
    assert out.attentions.shape == (3, out.sequences.shape[1], model.config.num_image_tokens)
