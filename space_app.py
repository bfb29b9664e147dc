"""Gradio Space: caption an image with our CLIP-LSTM model and with BLIP, side by side.

    MODEL_ID=me/clip-lstm-flickr8k python space_app.py      # or a local folder; see space/README.md

`import space_app` loads both models and builds `demo` without launching it (the tests do this).
Settings come from the environment:
    MODEL_ID       our model: a Hub id or a folder saved with save_pretrained. Unset: the offline
                   demo's folder (`python train_accelerate.py --demo`) when it exists.
    MODEL_REVISION our model's Hub revision (a commit hash, branch or tag) to pin; default: main.
    BLIP_MODEL_ID  the baseline, `Salesforce/blip-image-captioning-base` by default.
    BLIP_REVISION  BLIP's Hub revision to pin; default: main.
A model that cannot be loaded leaves its panel saying why; the other one still captions.
"Show where it looked" adds one small heatmap per word of our caption (a model trained with
image_feature="patches" only: a pooled one reads a single vector per image and has nowhere to look),
drawn by processing.word_heatmaps: the Space carries processing.py, not the project's package.

Our model is loaded with the project's own classes from the files shipped beside this one
(configuration_clip_lstm.py, modeling_clip_lstm.py, processing.py), never with trust_remote_code:
no code from a model repo runs here. On a ZeroGPU Space (the `spaces` package is importable) the
captioning function asks for a GPU per call with `spaces.GPU`; elsewhere that decorator is a no-op.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # a ZeroGPU Space: `spaces` must be imported before torch touches CUDA
    import spaces

    gpu = spaces.GPU
except ImportError:  # a CPU or ordinary GPU Space, or a checkout

    def gpu(function):
        """No-op stand-in for `spaces.GPU` where the `spaces` package is not installed."""
        return function


import gradio as gr
import torch
from gradio.utils import get_upload_folder
from PIL import Image, ImageDraw
from transformers import BlipForConditionalGeneration, BlipProcessor

from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import ClipLstmProcessor, ImageLoadError, first_line, load_image, word_heatmaps

try:  # in a checkout, the offline demo's trained model; a Space carries only the model's own files
    from clip_lstm_captioner.cli import DEMO_MODEL_DIR
except ImportError:
    DEMO_MODEL_DIR = None

# Copied from clip_lstm_captioner.cli.DEMO_COMMAND
DEMO_COMMAND = "python train_accelerate.py --demo"
DEFAULT_BLIP_MODEL_ID = "Salesforce/blip-image-captioning-base"
MODEL_ID = os.getenv("MODEL_ID") or (
    str(DEMO_MODEL_DIR) if DEMO_MODEL_DIR and Path(DEMO_MODEL_DIR).is_dir() else None
)
BLIP_MODEL_ID = os.getenv("BLIP_MODEL_ID") or DEFAULT_BLIP_MODEL_ID
# Hub revisions to pin (commit hashes are safest); None loads the default branch.
MODEL_REVISION = os.getenv("MODEL_REVISION") or None
BLIP_REVISION = os.getenv("BLIP_REVISION") or None
# Copied from clip_lstm_captioner.cli.default_device (a Space carries no package)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

MAX_BEAMS = 8
DEFAULT_BEAMS = 5
MAX_NEW_TOKENS = 60
DEFAULT_MAX_NEW_TOKENS = 30
# Bigger uploads are downscaled before captioning: both models look at 224-384 px anyway.
MAX_SIDE = 4096
MAX_PIXELS = 40_000_000
QUEUE_SIZE = 64
EXAMPLES_DIR = Path(tempfile.gettempdir()) / "clip-lstm-space-examples"
BEAM_HEADERS = ["rank", "caption", "score"]
HEATMAP_PIXELS = 128  # each word's heatmap, longest side

TITLE = "CLIP-LSTM captioner vs BLIP"
DESCRIPTION = f"""# {TITLE}
Upload an image (or pick an example) and press **Caption**: our small CLIP + LSTM captioner and
[BLIP](https://huggingface.co/{DEFAULT_BLIP_MODEL_ID}) caption it side by side, each with its latency.
Both use the beam width and maximum length below.
"""

logger = logging.getLogger(__name__)


@dataclass
class Captioner:
    """A loaded model with its processor, or the one-line reason it could not be loaded."""

    model: Any = None
    processor: Any = None
    error: str = ""


def load_ours(model_id: str | None, revision: str | None = None) -> Captioner:
    """Load our captioner from a Hub id or folder (at `revision`); a failure becomes the panel's message.

    Example:
        load_ours(None).error.startswith("No model")
        # -> True
    """
    if not model_id:
        return Captioner(
            error="No model to load: set MODEL_ID to a Hub model id or a local folder, "
            f"or make the offline demo model with `{DEMO_COMMAND}`."
        )
    try:
        # The project's own classes, shipped with the Space: the code files in the model repo are not
        # run (no trust_remote_code), so a changed repo cannot run code here at start-up.
        model = ClipLstmForImageCaptioning.from_pretrained(model_id, revision=revision)
        processor = ClipLstmProcessor.from_pretrained(model_id, revision=revision)
    except Exception as error:  # any failure (missing, offline, bad files) is shown, not raised
        return Captioner(error=f"Could not load our model {model_id!r}: {first_line(error)}")
    return Captioner(model.to(DEVICE).eval(), processor)


def heatmaps_unavailable(captioner: Captioner) -> str:
    """Why "show where it looked" cannot work with `captioner`, in one line; '' when it can.

    Example:
        heatmaps_unavailable(load_ours("me/clip-lstm-patches"))
        # -> ''
    """
    if captioner.model is None:
        return "Not available: our model is not loaded."
    feature = captioner.model.config.image_feature
    if feature != "patches":
        return (
            f"Not available for this model: it reads one {feature!r} vector per image; only a model "
            "trained with image_feature='patches' looks at parts of it."
        )
    return ""


def load_blip(model_id: str, revision: str | None = None) -> Captioner:
    """Load BLIP (Hub id or folder, at `revision`); offline or missing, the panel says why.

    Example:
        load_blip("Salesforce/blip-image-captioning-base").model is not None  # needs the Hub
        # -> True
    """
    try:
        model = BlipForConditionalGeneration.from_pretrained(model_id, revision=revision)
        processor = BlipProcessor.from_pretrained(model_id, revision=revision)
    except Exception as error:  # the Space still serves our model without the baseline
        reason = first_line(error).rstrip(".")
        return Captioner(
            error=f"BLIP unavailable ({model_id!r}): {reason}. Offline, set BLIP_MODEL_ID to a local folder."
        )
    return Captioner(model.to(DEVICE).eval(), processor)


# Loaded once, when the module is imported; every request shares them.
OURS = load_ours(MODEL_ID, MODEL_REVISION)
BLIP = load_blip(BLIP_MODEL_ID, BLIP_REVISION)


# ----------------------------------------------------------------------------- example images

# (shape, colour, box at 192 px): in the style of the project's synthetic `shapes` set, so the
# offline demo model has something it knows; drawn at start-up, so the repo ships no pictures.
EXAMPLE_SCENES = {
    "red-circle.png": [("circle", (215, 30, 30), (16, 60, 92, 136))],
    "blue-square-yellow-triangle.png": [
        ("square", (35, 75, 215), (70, 20, 130, 80)),
        ("triangle", (240, 205, 15), (120, 130, 160, 170)),
    ],
    "green-diamond.png": [("diamond", (30, 150, 45), (56, 56, 136, 136))],
}


def _draw_scene(objects: list[tuple[str, tuple, tuple]], size: int = 192) -> Image.Image:
    image = Image.new("RGB", (size, size), (236, 236, 228))
    draw = ImageDraw.Draw(image)
    for shape, colour, (x0, y0, x1, y1) in objects:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
        else:  # diamond
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    return image


def example_images(folder: Path = EXAMPLES_DIR) -> list[str]:
    """Draw the example scenes into `folder` (once) and return their paths.

    Example:
        [Path(p).name for p in example_images()][0]
        # -> 'red-circle.png'
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, objects in EXAMPLE_SCENES.items():
        path = folder / name
        if not path.exists():
            _draw_scene(objects).save(path)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- captioning

NOT_UPLOADED = "Not an uploaded image: upload it through the app (with gradio_client: handle_file(path))."


def uploaded_file(image: Any) -> Path | None:
    """The file gradio itself received as an upload, from the Caption button's raw payload; else None.

    With `preprocess=False` (see caption()) gradio hands the request's payload over unchecked, so a
    caller could name any path on the server, or a named pipe that blocks the only worker for good.
    Only a regular file inside gradio's upload folder (symlinks resolved) is accepted, and deciding
    that never opens the file: `stat` answers at once even for a pipe.

    Example:
        uploaded_file({"path": "/etc/passwd"}) is None
        # -> True
    """
    path = image.get("path") if isinstance(image, dict) else None
    if not isinstance(path, str):
        return None
    try:
        real = Path(os.path.realpath(path))
        upload_folder = Path(os.path.realpath(get_upload_folder()))  # GRADIO_TEMP_DIR, else <tmp>/gradio
        if real.is_relative_to(upload_folder) and stat.S_ISREG(real.stat().st_mode):
            return real
    except (OSError, ValueError):  # no such file, a NUL byte in the path, a loop of links
        return None
    return None


def read_image(path: str, name: str | None = None) -> tuple[Image.Image, str]:
    """Read an uploaded file as RGB, downscaled above MAX_SIDE px or MAX_PIXELS; returns the image and
    a note ('' or what was done). Anything unreadable raises `ImageLoadError` naming the file.

    Example:
        image, note = read_image("huge.png")
        note
        # -> 'Downscaled from 6000×3000 to 4096×2048 before captioning.'
    """
    name = name or Path(path).name
    try:
        with warnings.catch_warnings():
            # PIL warns above ~89 MP; we downscale those below, so the warning says nothing new.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = load_image(path)
    except ImageLoadError as error:  # includes PIL's decompression-bomb guard (~179 MP)
        raise ImageLoadError(str(error).replace(str(path), name)) from None
    width, height = image.size
    scale = min(1.0, MAX_SIDE / max(width, height), (MAX_PIXELS / (width * height)) ** 0.5)
    if scale == 1.0:
        return image, ""
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return image, f"Downscaled from {width}×{height} to {size[0]}×{size[1]} before captioning."


def _check_settings(num_beams, max_new_tokens) -> tuple[int, int]:
    """The sliders' values as ints; API callers can send anything, so check the ranges here."""
    try:
        num_beams, max_new_tokens = int(num_beams), int(max_new_tokens)
    except (TypeError, ValueError):
        raise ValueError(
            f"beam width and maximum length must be numbers, got {num_beams!r}, {max_new_tokens!r}"
        ) from None
    if not 1 <= num_beams <= MAX_BEAMS:
        raise ValueError(f"beam width must be 1 to {MAX_BEAMS}, got {num_beams}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"maximum length must be 1 to {MAX_NEW_TOKENS} tokens, got {max_new_tokens}")
    return num_beams, max_new_tokens


def _latency(seconds: float, num_beams: int) -> str:
    return f"{seconds * 1000:.0f} ms on {DEVICE} · beam width {num_beams}"


def caption_ours(
    image: Image.Image, num_beams: int, max_new_tokens: int, show_beams: bool, show_heatmaps: bool = False
) -> tuple[str, str, list, list]:
    """Our caption, its status line, the top beams [rank, caption, score] (or [] if not asked) and the
    caption's per-word heatmaps [(picture, word)] (or [] if not asked or the model has none)."""
    if OURS.model is None:
        return "", OURS.error, [], []
    heatmaps = bool(show_heatmaps) and not heatmaps_unavailable(OURS)  # asked of a pooled model: ignored
    start = time.perf_counter()
    inputs = OURS.processor(images=[image], return_tensors="pt").to(DEVICE)
    output = OURS.model.generate(
        **inputs,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_beams if show_beams else 1,  # beam search keeps num_beams finished ones
        return_dict_in_generate=True,
        output_scores=True,
        output_attentions=heatmaps,
    )
    captions = OURS.processor.batch_decode(output.sequences)
    elapsed = time.perf_counter() - start
    scores = output.sequences_scores.tolist()
    beams = [
        [rank, text, round(score, 4)]
        for rank, (text, score) in enumerate(zip(captions, scores, strict=True), 1)
    ]
    pictures = []
    if heatmaps:  # the best caption's words, each over the part of the image the model saw
        labels = OURS.processor.token_labels(output.sequences[0])
        processor = OURS.processor.image_processor
        pictures = word_heatmaps(image, output.attentions[0], labels, processor, size=HEATMAP_PIXELS)
    status = _latency(elapsed, num_beams)
    return captions[0] or "(empty caption)", status, beams if show_beams else [], pictures


def caption_blip(image: Image.Image, num_beams: int, max_new_tokens: int) -> tuple[str, str]:
    """BLIP's caption and its status line."""
    if BLIP.model is None:
        return "", BLIP.error
    start = time.perf_counter()
    inputs = BLIP.processor(images=image, return_tensors="pt").to(DEVICE)
    ids = BLIP.model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens)
    text = BLIP.processor.decode(ids[0], skip_special_tokens=True).strip()
    return text or "(empty caption)", _latency(time.perf_counter() - start, num_beams)


def _model_line(model_id: str | None, captioner: Captioner) -> str:
    return captioner.error or f"Model: `{model_id}`"


def _guarded(run, *args) -> tuple:
    """Run one model's captioning; an unexpected failure becomes its panel's message, not a traceback."""
    try:
        return run(*args)
    except Exception as error:
        logger.exception("captioning failed")
        failed = ("", f"Captioning failed: {first_line(error)}")
        return failed + ([], []) if run is caption_ours else failed


@gpu  # ZeroGPU: a GPU is attached for each call (a no-op elsewhere)
def caption(
    image: dict | None, num_beams: int, max_new_tokens: int, show_beams: bool, show_heatmaps: bool = False
) -> tuple[str, str, str, gr.Dataframe, str, str, gr.Gallery]:
    """The Caption button: (notice, our caption, our status, our beams, BLIP caption, BLIP status, our
    per-word heatmaps).

    `image` is gradio's raw upload record ({"path": ..., "orig_name": ...}): the button skips gr.Image's
    own preprocessing, which opens the file with PIL and turns a non-image into an opaque server error.
    Only files gradio received as uploads are opened (`uploaded_file`). `show_heatmaps` is ignored
    for a model without attention (the checkbox says why it is off).
    """
    empty_beams = gr.Dataframe(value=[], visible=bool(show_beams))
    no_heatmaps = gr.Gallery(value=[], visible=False)
    ours_line, blip_line = _model_line(MODEL_ID, OURS), _model_line(BLIP_MODEL_ID, BLIP)

    def refused(notice: str) -> tuple:
        return notice, "", ours_line, empty_beams, "", blip_line, no_heatmaps

    if not isinstance(image, dict) or not image.get("path"):
        return refused("Upload an image or pick an example first.")
    path = uploaded_file(image)
    if path is None:
        return refused(f"⚠️ {NOT_UPLOADED}")
    name = " ".join(str(image.get("orig_name") or path.name).split())  # a caller's text: kept to one line
    try:
        num_beams, max_new_tokens = _check_settings(num_beams, max_new_tokens)
        picture, note = read_image(str(path), name)
    except ValueError as error:  # bad settings, or ImageLoadError (a ValueError): one line either way
        return refused(f"⚠️ {error}")
    with torch.inference_mode():
        ours_caption, ours_status, beams, heatmaps = _guarded(
            caption_ours, picture, num_beams, max_new_tokens, bool(show_beams), bool(show_heatmaps)
        )
        blip_caption, blip_status = _guarded(caption_blip, picture, num_beams, max_new_tokens)
    beam_table = gr.Dataframe(value=beams, headers=BEAM_HEADERS, visible=bool(show_beams))
    gallery = gr.Gallery(value=heatmaps, visible=bool(heatmaps))
    return note, ours_caption, ours_status, beam_table, blip_caption, blip_status, gallery


def toggle_beams(show_beams: bool) -> gr.Dataframe:
    """The 'show top beams' checkbox: show or hide the beam table."""
    return gr.Dataframe(visible=show_beams)


def hide_heatmaps(show_heatmaps: bool) -> gr.Gallery:
    """The 'show where it looked' checkbox: unticked, the heatmaps go; ticked, the next caption brings them."""
    return gr.Gallery() if show_heatmaps else gr.Gallery(value=[], visible=False)


# ----------------------------------------------------------------------------- layout

# delete_cache: uploads older than a day are removed every day, so a long-running Space does not fill its disk.
with gr.Blocks(title=TITLE, delete_cache=(86400, 86400)) as demo:
    gr.Markdown(DESCRIPTION)
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                type="filepath",
                label="Image",
                sources=["upload", "clipboard"],
                height=360,
                elem_id="input-image",
            )
            with gr.Row():
                num_beams = gr.Slider(1, MAX_BEAMS, value=DEFAULT_BEAMS, step=1, label="Beam width")
                max_new_tokens = gr.Slider(
                    1, MAX_NEW_TOKENS, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Maximum length (tokens)"
                )
            show_beams = gr.Checkbox(
                label="Show our top beams with their scores (length-normalised log-probability)"
            )
            show_heatmaps = gr.Checkbox(
                label="Show where it looked: one small image per word of our caption",
                info=heatmaps_unavailable(OURS) or None,
                interactive=not heatmaps_unavailable(OURS),
                elem_id="show-heatmaps",
            )
            run_button = gr.Button("Caption", variant="primary", elem_id="caption-button")
        with gr.Column():
            notice = gr.Markdown(elem_id="notice")
            ours_caption = gr.Textbox(label="CLIP-LSTM (ours)", interactive=False, elem_id="ours-caption")
            ours_status = gr.Markdown(_model_line(MODEL_ID, OURS), elem_id="ours-status")
            ours_beams = gr.Dataframe(
                headers=BEAM_HEADERS, label="Our top beams", visible=False, interactive=False
            )
            ours_heatmaps = gr.Gallery(
                label="Where it looked, word by word (red: most attention)",
                visible=False,
                columns=5,
                height="auto",
                object_fit="contain",
                format="png",
                interactive=False,
                elem_id="ours-heatmaps",
            )
            blip_caption = gr.Textbox(label="BLIP", interactive=False, elem_id="blip-caption")
            blip_status = gr.Markdown(_model_line(BLIP_MODEL_ID, BLIP), elem_id="blip-status")
    gr.Examples(
        examples=[[path] for path in example_images()], inputs=image, label="Examples (drawn by the app)"
    )

    run_button.click(
        caption,
        inputs=[image, num_beams, max_new_tokens, show_beams, show_heatmaps],
        outputs=[notice, ours_caption, ours_status, ours_beams, blip_caption, blip_status, ours_heatmaps],
        api_name="caption",
        preprocess=False,  # see caption(): we read the upload ourselves, to answer bad files in one line
    )
    show_beams.change(toggle_beams, inputs=show_beams, outputs=ours_beams, api_visibility="private")
    show_heatmaps.change(hide_heatmaps, inputs=show_heatmaps, outputs=ours_heatmaps, api_visibility="private")


if __name__ == "__main__":
    demo.queue(max_size=QUEUE_SIZE).launch()
