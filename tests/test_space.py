"""The Gradio Space, launched on 127.0.0.1 with tiny models the tests build, driven by gradio_client
and by a real headless Chromium.

The app module reads MODEL_ID / BLIP_MODEL_ID at import, so the fixture sets them and (re)imports it.
Random BLIP ignores the image: its captions are only checked to be there, never compared per image.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image
from tiny import (
    PROJECT_MODULES,
    caption_files,
    coloured_image,
    run_fresh,
    save_peaked_captioner,
    save_tiny_blip,
)

pytest.importorskip("gradio", reason="gradio is not installed (pip install '.[space]')")
from gradio.utils import get_upload_folder as gradio_upload_folder  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO_ROOT / "test-artifacts" / "space-screenshot.png"
BEAMS, MAX_NEW_TOKENS = 3, 8
NOT_UPLOADED_NOTICE = (
    "⚠️ Not an uploaded image: upload it through the app (with gradio_client: handle_file(path))."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("space")
    images = root / "images"
    images.mkdir()
    paths = {"ours": save_peaked_captioner(root / "ours"), "blip": save_tiny_blip(root / "blip")}
    paths["patches"] = save_peaked_captioner(root / "patches", image_feature="patches")
    for name, colour in (("red", (200, 30, 30)), ("blue", (30, 40, 210))):
        paths[name] = images / f"{name}.png"
        coloured_image(colour, size=(64, 48)).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def app(folders):
    """space_app imported with MODEL_ID / BLIP_MODEL_ID pointing at the tiny models, launched."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MODEL_ID", str(folders["ours"]))
        env.setenv("BLIP_MODEL_ID", str(folders["blip"]))
        module = (
            importlib.reload(sys.modules["space_app"])
            if "space_app" in sys.modules
            else importlib.import_module("space_app")
        )
    port = free_port()
    module.demo.queue(max_size=module.QUEUE_SIZE).launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    try:
        yield module, f"http://127.0.0.1:{port}"
    finally:
        module.demo.close()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app[1], verbose=False)


def expected_caption(folder: Path, image_path: Path, num_beams=BEAMS, max_new_tokens=MAX_NEW_TOKENS) -> str:
    """Our caption computed directly with the project's classes, for comparison with the app."""
    return caption_files(folder, [image_path], num_beams=num_beams, max_new_tokens=max_new_tokens)[0]


def ask(client: Client, image, num_beams=BEAMS, show_beams=False, show_heatmaps=False) -> dict:
    notice, ours, ours_status, beams, blip, blip_status, heatmaps = client.predict(
        image, num_beams, MAX_NEW_TOKENS, show_beams, show_heatmaps, api_name="/caption"
    )
    return dict(
        notice=notice,
        ours=ours,
        ours_status=ours_status,
        beams=beams,
        blip=blip,
        blip_status=blip_status,
        heatmaps=heatmaps,
    )


def test_import_builds_the_demo_and_loads_both_models_once(app):
    module, _ = app
    assert module.OURS.model is not None and module.BLIP.model is not None, (
        module.OURS.error,
        module.BLIP.error,
    )
    assert {"caption"} <= {fn.api_name for fn in module.demo.fns.values()}
    missing = module.load_ours(None)
    assert missing.model is None and "python train_accelerate.py --demo" in missing.error


def test_caption_matches_the_model_and_shows_beams_and_latency(client, folders):
    answer = ask(client, handle_file(folders["red"]), show_beams=True)
    assert answer["notice"] == ""
    assert answer["ours"] == expected_caption(folders["ours"], folders["red"]) and answer["ours"]
    assert answer["blip"] and " ms " in answer["blip_status"] and " ms " in answer["ours_status"]
    rows = answer["beams"]["value"]["data"]
    assert len(rows) == BEAMS and rows[0][1] == answer["ours"]
    scores = [row[2] for row in rows]
    assert scores == sorted(scores, reverse=True)


def test_twenty_concurrent_requests_are_all_answered_correctly(client, folders):
    expected = {name: expected_caption(folders["ours"], folders[name]) for name in ("red", "blue")}
    names = ["red", "blue"] * 10
    jobs = [
        client.submit(handle_file(folders[name]), BEAMS, MAX_NEW_TOKENS, False, api_name="/caption")
        for name in names
    ]
    answers = [job.result(timeout=120) for job in jobs]
    assert [answer[1] for answer in answers] == [expected[name] for name in names]
    assert all(answer[4] for answer in answers)  # BLIP answered each one too


def test_bad_uploads_and_settings_get_one_line_messages(client, folders, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a picture")
    answer = ask(client, handle_file(text_file))
    assert answer["notice"].startswith("⚠️ notes.txt:") and "not an image" in answer["notice"]
    assert answer["ours"] == "" and answer["blip"] == ""
    assert "Upload an image" in ask(client, None)["notice"]
    assert "beam width must be 1 to 8" in ask(client, handle_file(folders["red"]), num_beams=99)["notice"]


def test_huge_images_are_downscaled_and_bombs_refused(client, tmp_path):
    wide = tmp_path / "wide.png"
    coloured_image((30, 150, 45), size=(5000, 1000)).save(wide)
    answer = ask(client, handle_file(wide))
    assert answer["notice"] == "Downscaled from 5000×1000 to 4096×819 before captioning."
    assert answer["ours"] and answer["blip"]
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)  # 48 MP, not a JPEG: refused before decoding
    answer = ask(client, handle_file(huge))
    assert answer["notice"].startswith("⚠️ huge.png: too large to decode (8000×6000") and answer["ours"] == ""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 MP of zeros: a few kB on disk
    answer = ask(client, handle_file(bomb))
    assert answer["notice"].startswith("⚠️ bomb.png: too large to decode") and answer["ours"] == ""


def heatmap_labels(answer: dict) -> list[str]:
    """The words under the 'where it looked' pictures, after checking that each picture opens."""
    gallery = answer["heatmaps"]
    for item in gallery["value"]:
        with Image.open(item["image"]) as picture:
            assert picture.size == (128, 128), picture.size  # the tiny tower's square crop, 128 px
    return [item["caption"] for item in gallery["value"]]


def test_where_it_looked_shows_one_picture_per_word_of_a_patches_model(app, client, folders, monkeypatch):
    module, _ = app
    monkeypatch.setattr(module, "OURS", module.load_ours(str(folders["patches"])))
    assert module.heatmaps_unavailable(module.OURS) == ""
    answer = ask(client, handle_file(folders["red"]), show_heatmaps=True)
    expected = expected_caption(folders["patches"], folders["red"])
    assert answer["notice"] == "" and answer["ours"] == expected and answer["heatmaps"]["visible"] is True
    words = module.OURS.processor.tokenizer.tokenize(expected)
    assert words and heatmap_labels(answer) == words  # one picture per word, labelled with it
    plain = ask(client, handle_file(folders["red"]))  # the option off: the same caption, no pictures
    assert plain["ours"] == expected and heatmap_labels(plain) == [] and plain["heatmaps"]["visible"] is False


def test_where_it_looked_is_harmless_for_a_pooled_model(app, client, folders):
    module, _ = app
    reason = module.heatmaps_unavailable(module.OURS)  # the checkbox's one line, and it is not clickable
    assert reason.startswith("Not available for this model") and "\n" not in reason
    answer = ask(client, handle_file(folders["red"]), show_beams=True, show_heatmaps=True)
    assert answer["notice"] == "" and answer["ours"] == expected_caption(folders["ours"], folders["red"])
    assert len(answer["beams"]["value"]["data"]) == BEAMS and heatmap_labels(answer) == []


def test_an_unavailable_model_leaves_the_other_captioning(app, client, folders, tmp_path, monkeypatch):
    module, _ = app
    monkeypatch.setattr(module, "BLIP", module.load_blip(str(tmp_path / "no-blip-here")))
    answer = ask(client, handle_file(folders["red"]))
    assert answer["ours"] == expected_caption(folders["ours"], folders["red"])
    assert answer["blip"] == "" and answer["blip_status"].startswith("BLIP unavailable")
    assert "\n" not in answer["blip_status"]
    monkeypatch.setattr(module, "OURS", module.load_ours(str(tmp_path / "no-model-here")))
    answer = ask(client, handle_file(folders["red"]))
    assert answer["ours"] == "" and answer["ours_status"].startswith("Could not load our model")


# ----------------------------------------------------------------------------- hostile API callers


def call_raw(base: str, data: list, deadline_s: float = 30.0) -> tuple[str, list | None, float]:
    """POST /gradio_api/call/caption as a raw HTTP client would, then read the event stream until its
    `complete` or `error` event: (event name, its data, seconds taken). Bounded by `deadline_s`."""
    start = time.monotonic()
    request = urllib.request.Request(
        f"{base}/gradio_api/call/caption",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        event_id = json.load(response)["event_id"]
    event = None
    # Each read waits at most 10 s; gradio's heartbeats keep a stalled stream alive, so the deadline
    # is checked between lines as well.
    with urllib.request.urlopen(f"{base}/gradio_api/call/caption/{event_id}", timeout=10) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = line.split(":", 1)[1].strip()
                return event, json.loads(payload) if payload != "null" else None, time.monotonic() - start
            if time.monotonic() - start > deadline_s:
                break
    raise TimeoutError(f"no answer to {data[0]!r} within {deadline_s} s")


@pytest.fixture
def fifo(tmp_path):
    """A named pipe nobody writes to: opening it for reading blocks until a writer comes."""
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    try:
        yield path
    finally:
        # Release a reader the app may have left blocked (the bug), so the other tests can run.
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def server_paths(folders: dict, tmp_path: Path, fifo: Path) -> dict[str, str]:
    """Paths on the server that a caller names without uploading them; none may be opened."""
    upload_dir = Path(gradio_upload_folder())
    upload_dir.mkdir(parents=True, exist_ok=True)
    link = upload_dir / f"link-to-passwd-{os.getpid()}.png"  # inside the upload folder, pointing out of it
    link.unlink(missing_ok=True)
    link.symlink_to("/etc/passwd")
    return {
        "a system file": "/etc/passwd",
        "a missing file": "/etc/nope",
        "a directory": str(tmp_path),
        "a named pipe": str(fifo),
        "an image elsewhere on the server": str(folders["red"]),
        "a link out of the upload folder": str(link),
        "the upload folder itself": str(upload_dir),
    }


def test_only_uploaded_files_are_opened_whatever_path_a_caller_sends(app, client, folders, tmp_path, fifo):
    _, base = app
    for what, path in server_paths(folders, tmp_path, fifo).items():
        event, answer, seconds = call_raw(base, [{"path": path}, BEAMS, MAX_NEW_TOKENS, False, False])
        assert event == "complete", (what, event, answer)
        notice, ours, _, _, blip, _, _ = answer
        assert notice == NOT_UPLOADED_NOTICE, (what, notice)
        assert ours == "" and blip == "" and seconds < 15, (what, ours, seconds)
    # The same through gradio_client, with an untagged dict as the image.
    assert ask(client, {"path": "/etc/passwd"})["notice"] == NOT_UPLOADED_NOTICE
    # The server still answers, and a real upload still captions.
    answer = ask(client, handle_file(folders["red"]))
    assert answer["notice"] == "" and answer["ours"] == expected_caption(folders["ours"], folders["red"])


def test_asking_where_it_looked_opens_no_file_that_was_not_uploaded(app, client, folders, monkeypatch):
    """The option adds a second use of the image (the pictures): still only uploads are opened."""
    module, base = app
    monkeypatch.setattr(module, "OURS", module.load_ours(str(folders["patches"])))
    for path in ("/etc/passwd", str(folders["red"])):  # a system file; an image elsewhere on the server
        event, answer, seconds = call_raw(base, [{"path": path}, BEAMS, MAX_NEW_TOKENS, False, True])
        notice, ours, _, _, blip, _, heatmaps = answer
        assert event == "complete" and notice == NOT_UPLOADED_NOTICE, (path, answer)
        assert ours == "" and blip == "" and heatmaps["value"] == [] and seconds < 15
    assert ask(client, {"path": str(folders["red"])}, show_heatmaps=True)["notice"] == NOT_UPLOADED_NOTICE
    assert heatmap_labels(ask(client, handle_file(folders["red"]), show_heatmaps=True))  # an upload: pictures


# ----------------------------------------------------------------------------- the deployed shape

# What space/README.md tells users to upload: Space file name -> file in this repo.
SPACE_FILES = {
    "README.md": "space/README.md",
    "requirements.txt": "space/requirements.txt",
    "space_app.py": "space_app.py",
    "configuration_clip_lstm.py": "configuration_clip_lstm.py",
    "modeling_clip_lstm.py": "modeling_clip_lstm.py",
    "processing.py": "processing.py",
}
# Run in the Space folder, where the rest of the project (training script, package) is hidden.
SPACE_HIDDEN = tuple(name for name in PROJECT_MODULES if f"{name}.py" not in SPACE_FILES)
# A stand-in for the `spaces` package of a ZeroGPU Space: `spaces.GPU` records each call it wraps.
FAKE_SPACES = """
import functools
calls = []
def GPU(function):
    @functools.wraps(function)
    def on_gpu(*args, **kwargs):
        calls.append(function.__name__)
        return function(*args, **kwargs)
    return on_gpu
"""
SPACE_IMPORT = r"""
import json, os, shutil, sys
import space_app, spaces
uploads = os.environ["GRADIO_TEMP_DIR"]  # where gradio would have put the upload
os.makedirs(uploads, exist_ok=True)
upload = shutil.copy(sys.argv[1], uploads)
answer = space_app.caption({"path": upload, "orig_name": "red.png"}, 3, 8, False)
refused = space_app.caption({"path": sys.argv[1]}, 3, 8, False)[0]
print("RESULT " + json.dumps([space_app.OURS.error, space_app.BLIP.error, answer[1], answer[4], refused, spaces.calls]))
"""


def with_planted_code(model_dir: Path, folder: Path, marker: Path) -> Path:
    """A copy of `model_dir` whose code files (config.json's auto_map points at them) write `marker`
    when run: what a changed model repo could do to a Space that trusts remote code."""
    shutil.copytree(model_dir, folder)
    for name in ("configuration_clip_lstm.py", "modeling_clip_lstm.py", "processing.py"):
        with open(folder / name, "a") as file:
            file.write(f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text({name!r})\n")
    return folder


def test_space_metadata_and_the_uploaded_files_alone_run_the_app(folders, tmp_path):
    metadata = yaml.safe_load((REPO_ROOT / "space" / "README.md").read_text().split("---\n")[1])
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "space_app.py"
    assert int(metadata["sdk_version"].split(".")[0]) >= 5 and len(metadata["short_description"]) <= 60
    # Spaces document 3.10 as the default python_version, and ZeroGPU runs 3.10 (or 3.12).
    assert metadata["python_version"] in ("3.10", "3.12")
    space = tmp_path / "space-repo"
    space.mkdir()
    for name, source in SPACE_FILES.items():
        shutil.copy(REPO_ROOT / source, space / name)
    (space / "spaces.py").write_text(FAKE_SPACES)  # as on a ZeroGPU Space
    marker = tmp_path / "model-repo-code-ran"
    env = os.environ | {
        "MODEL_ID": str(with_planted_code(folders["ours"], tmp_path / "model-repo", marker)),
        "BLIP_MODEL_ID": str(folders["blip"]),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "GRADIO_TEMP_DIR": str(tmp_path / "gradio-uploads"),
    }
    done = run_fresh(SPACE_IMPORT, folders["red"], cwd=space, env=env, hidden=SPACE_HIDDEN, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    result = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    ours_error, blip_error, ours, blip, refused, gpu_calls = json.loads(result[len("RESULT ") :])
    assert ours_error == "" and blip_error == "" and blip
    assert ours == expected_caption(folders["ours"], folders["red"])
    assert refused == NOT_UPLOADED_NOTICE  # a file outside the upload folder is not opened
    assert gpu_calls == ["caption", "caption"]  # each request ran under spaces.GPU
    assert not marker.exists(), f"the model repo's {marker.read_text()} ran in the Space"


def test_hub_revisions_are_pinned_from_the_environment(app, monkeypatch):
    """MODEL_REVISION / BLIP_REVISION reach every from_pretrained call (offline: the calls are recorded)."""
    module, _ = app
    seen = []

    class Loaded:
        def to(self, device):
            return self

        def eval(self):
            return self

    def record(name):
        def from_pretrained(source, **kwargs):
            seen.append((name, kwargs.get("revision")))
            return Loaded()

        return from_pretrained

    for cls in (
        "ClipLstmForImageCaptioning",
        "ClipLstmProcessor",
        "BlipForConditionalGeneration",
        "BlipProcessor",
    ):
        monkeypatch.setattr(getattr(module, cls), "from_pretrained", record(cls))
    assert module.load_ours("me/clip-lstm", "0123abc").error == ""
    assert module.load_blip("Salesforce/blip-image-captioning-base", "fedcba9").error == ""
    assert seen == [
        ("ClipLstmForImageCaptioning", "0123abc"),
        ("ClipLstmProcessor", "0123abc"),
        ("BlipForConditionalGeneration", "fedcba9"),
        ("BlipProcessor", "fedcba9"),
    ]


# ----------------------------------------------------------------------------- a real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
]


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "Debian chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_browser_uploads_an_image_and_reads_both_captions(app, browser, folders):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(app[1])
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
    upload.send_keys(str(folders["blue"]))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#input-image img")))  # uploaded and shown
    browser.find_element(By.CSS_SELECTOR, "#caption-button").click()

    def caption_of(elem_id: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea").get_attribute("value")

    wait.until(lambda _: caption_of("ours-caption") and caption_of("blip-caption"))
    SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    module = app[0]  # the page starts with the sliders at their defaults
    expected = expected_caption(
        folders["ours"], folders["blue"], module.DEFAULT_BEAMS, module.DEFAULT_MAX_NEW_TOKENS
    )
    assert caption_of("ours-caption") == expected
    assert caption_of("blip-caption")
    assert " ms " in browser.find_element(By.CSS_SELECTOR, "#ours-status").text
