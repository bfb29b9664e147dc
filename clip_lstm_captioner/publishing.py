"""Publish a captioner to the Hugging Face Hub as a repo that loads anywhere with `trust_remote_code=True`.

One commit holds the weights (safetensors, optionally float16), `config.json` with its `auto_map`,
`generation_config.json`, the processor and tokenizer files, the three code files and a model card
(`README.md`) with YAML metadata, a usage snippet, evaluation results and the training settings.

    from clip_lstm_captioner.publishing import publish
    publish("outputs/flickr8k", "me/clip-lstm-flickr8k", float16=True)   # report.json, training_args.json: read from the folder

`train_accelerate.py --push_to_hub` and `evaluate_model.py --push_to_hub` both call `publish`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData, constants
from safetensors import safe_open

from modeling_clip_lstm import ClipLstmForImageCaptioning
from processing import ClipLstmProcessor, check_vocabulary, is_hub_id

from .files import write_text_atomic
from .reports import METRICS

CODE_FILES = ("configuration_clip_lstm.py", "modeling_clip_lstm.py", "processing.py")
# Without any of these, AutoModel / AutoProcessor.from_pretrained(repo, trust_remote_code=True) fails.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    *CODE_FILES,
)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
TRAINING_ARGS_FILE = "training_args.json"
REPORT_FILE = "report.json"
DEFAULT_COMMIT_MESSAGE = "Upload CLIP-LSTM captioner"
LICENSE = "apache-2.0"
FLICKR8K_TERMS = (
    "Flickr8k (Hodosh, Young and Hockenmaier, 2013): 8,091 Flickr photos with five crowd-sourced captions "
    "each. The dataset is distributed for research use only and its images belong to their Flickr owners; "
    "check those terms before using this model, or captions it writes, beyond research."
)
SHAPES_TERMS = (
    "the project's own synthetic `shapes` set: scenes of coloured shapes drawn by `clip_lstm_captioner.shapes.make_shapes_dataset` "
    "with template captions. It contains no third-party images or text and is released with the project "
    "(Apache-2.0)."
)


# ----------------------------------------------------------------------------- reading inputs


def _read_json(source: str | os.PathLike | dict | None) -> dict | None:
    """A dict as is, or the JSON object in a file; None stays None."""
    if source is None or isinstance(source, dict):
        return source
    path = Path(source)
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a JSON object ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_json_in(folder: Path | None, name: str) -> dict | None:
    return _read_json(folder / name) if folder is not None and (folder / name).is_file() else None


def _model_and_processor(source) -> tuple[ClipLstmForImageCaptioning, ClipLstmProcessor, Path | None]:
    """(model, processor) as given, or both loaded from a folder saved with save_pretrained."""
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return source[0], source[1], None
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a model folder (no config.json); pass a folder saved with save_pretrained"
        )
    model = ClipLstmForImageCaptioning.from_pretrained(folder)
    # trust_remote_code=False: we load with this project's classes, so no "run custom code?" prompt.
    processor = ClipLstmProcessor.from_pretrained(folder, trust_remote_code=False)
    return model, processor, folder


def describe_dataset(dataset: str | None) -> dict[str, str | None]:
    """Display name, Hub id (None for local data) and licence terms of the training / evaluation data.

    Example:
        >>> describe_dataset("jxie/flickr8k")["name"]
        'Flickr8k'
    """
    text = str(dataset or "")
    hub_id = text if "/" in text and is_hub_id(text) else None  # local data has no Hub id
    if "shapes" in text.lower():
        return {"name": "shapes (synthetic)", "id": hub_id, "slug": "shapes", "terms": SHAPES_TERMS}
    if "flickr" in text.lower():
        return {"name": "Flickr8k", "id": hub_id, "slug": "flickr8k", "terms": FLICKR8K_TERMS}
    name = Path(text).name if text else "unknown"
    terms = f"`{text}`; check its licence before using this model." if text else "not recorded."
    return {"name": name, "id": hub_id, "slug": name.lower(), "terms": terms}


# ----------------------------------------------------------------------------- model card


def _metrics_of(report: dict | None, model_key: str = "ours") -> dict:
    """The metric dict of one model: report["models"][model_key], or the report itself if it is flat."""
    if not report:
        return {}
    models = report.get("models")
    if isinstance(models, dict) and isinstance(models.get(model_key), dict):
        return models[model_key]
    return report if any(key in report for key in METRICS) else {}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_args(key: str) -> dict | None:
    """What tells same-type metrics apart on the Hub: BLEU-n is `bleu` with `max_order: n` (evaluate's name)."""
    return {"max_order": int(key.rsplit("_", 1)[1])} if key.startswith("bleu_") else None


def eval_results(
    report: dict | None, dataset_name: str | None = None, model_key: str = "ours"
) -> list[EvalResult]:
    """huggingface_hub `EvalResult`s for `report["models"][model_key]`, on the report's 0-1 scale.

    Missing keys are skipped: a report without a split gets none, one without metrics gives [].

    Example:
        >>> report = {"dataset": "jxie/flickr8k", "split": "test", "models": {"ours": {"bleu_4": 0.21}}}
        >>> [(r.metric_name, r.metric_type, r.metric_args, r.metric_value) for r in eval_results(report)]
        [('BLEU-4', 'bleu', {'max_order': 4}, 0.21)]
    """
    metrics = _metrics_of(report, model_key)
    data = describe_dataset(dataset_name or (report or {}).get("dataset"))
    split = (report or {}).get("split")
    return [
        EvalResult(
            task_type="image-to-text",
            task_name="Image Captioning",
            dataset_type=data["id"] or data["slug"],
            dataset_name=data["name"],
            dataset_split=str(split) if split else None,
            metric_type=hub_id,
            metric_name=label,
            metric_value=round(float(metrics[key]), 4),
            metric_args=_metric_args(key),
        )
        for key, (label, hub_id) in METRICS.items()
        if _is_number(metrics.get(key))
    ]


def model_index(
    report: dict | None, model_name: str, dataset_name: str | None = None, model_key: str = "ours"
) -> list:
    """The Hub's `model-index` (a list of one entry) for `report["models"][model_key]`; [] without metrics.

    Built by huggingface_hub's `ModelCardData` from `eval_results`.

    Example:
        >>> report = {"dataset": "jxie/flickr8k", "split": "test", "models": {"ours": {"bleu_4": 0.21}}}
        >>> model_index(report, "clip-lstm")[0]["results"][0]["metrics"]
        [{'type': 'bleu', 'value': 0.21, 'name': 'BLEU-4', 'args': {'max_order': 4}}]
    """
    results = eval_results(report, dataset_name, model_key)
    if not results:
        return []
    return ModelCardData(model_name=model_name, eval_results=results).to_dict()["model-index"]


def _table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        text = (
            value if isinstance(value, str) else json.dumps(value, default=str)
        )  # Paths in argparse namespaces
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _usage(repo_id: str) -> str:
    return f"""## Usage

```python
from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)

image = Image.open("example.jpg")
inputs = processor(images=image, return_tensors="pt")
ids = model.generate(**inputs, num_beams=5, max_new_tokens=30)
print(processor.batch_decode(ids)[0])
```

`trust_remote_code=True` runs this repo's `configuration_clip_lstm.py`, `modeling_clip_lstm.py` and
`processing.py`; read them first if you do not know the author."""


def _evaluation(report: dict | None) -> str:
    models = (report or {}).get("models")
    if not isinstance(models, dict) or not models:
        models = {"ours": _metrics_of(report)} if _metrics_of(report) else {}
    if not models:
        return (
            "## Evaluation\n\nNo evaluation report was given; `evaluate_model.py` writes one (`report.json`)."
        )
    keys = [key for key in METRICS if any(_is_number((m or {}).get(key)) for m in models.values())]
    rows = [
        [name] + [round(m[key], 4) if _is_number(m.get(key)) else "-" for key in keys]
        for name, m in models.items()
    ]
    facts = [
        f"{key}: {report[key]}" for key in ("dataset", "split", "num_images") if report.get(key) is not None
    ]
    generation = report.get("generation")
    if isinstance(generation, dict) and generation:
        facts.append("decoding: " + ", ".join(f"{k}={v}" for k, v in generation.items()))
    scale = (
        f"Scores are on a 0-1 scale, as in `{REPORT_FILE}` and this card's metadata (`report.md` and "
        "caption papers print them x100)."
    )
    return "\n\n".join(
        ["## Evaluation", "; ".join(facts), _table(["model"] + [METRICS[k][0] for k in keys], rows), scale]
    )


def _training(training_args: dict | None, dataset: dict) -> str:
    parts = ["## Training", f"Training data: {dataset['terms']}"]
    if training_args:
        rows = [[key, value] for key, value in sorted(training_args.items())]
        parts += [f"Settings (from `{TRAINING_ARGS_FILE}`):", _table(["setting", "value"], rows)]
    else:
        parts.append(
            f"No `{TRAINING_ARGS_FILE}` was found next to the model, so the settings are not recorded here."
        )
    return "\n\n".join(parts)


def _weights_dtype(folder: Path) -> str | None:
    """dtype of the first tensor in model.safetensors, read from its header (no tensor is loaded)."""
    path = folder / "model.safetensors"
    if not path.is_file():
        return None
    with safe_open(path, "pt") as weights:
        name = next(iter(weights.keys()), None)
        return str(weights.get_slice(name).get_dtype()) if name else None


def _architecture(config: dict, weights_dtype: str | None) -> str:
    vision = config.get("vision_config", {})
    lines = [
        f"- vision tower (frozen): CLIP ViT, {vision.get('num_hidden_layers')} layers, hidden size "
        f"{vision.get('hidden_size')}, {vision.get('image_size')} px images in {vision.get('patch_size')} px patches",
        f"- image feature: `{config.get('image_feature')}`, L2-normalised: {config.get('normalize_image_embeds')}",
        f"- decoder: LSTM, {config.get('num_layers')} layer(s), hidden size {config.get('hidden_size')}, "
        f"embeddings {config.get('embed_dim')}, vocabulary {config.get('vocab_size')}",
    ]
    if weights_dtype in ("F16", "BF16"):
        lines.append(
            f"- weights stored in {weights_dtype.lower()} to halve the download; `from_pretrained` loads them "
            "as float32 unless you pass `dtype=torch.float16`"
        )
    return "## Model\n\n" + "\n".join(lines)


def _training_dataset(training_args: dict | None) -> str | None:
    for key in ("dataset", "dataset_name", "data"):
        if isinstance((training_args or {}).get(key), str):
            return training_args[key]
    return None


def _metadata(report: dict | None, training_args: dict | None, dataset: dict, repo_id: str) -> ModelCardData:
    """The card's YAML metadata: licence, pipeline tag, base model, datasets, metrics and model-index."""
    results = eval_results(report, dataset_name=(report or {}).get("dataset"))
    base = next(
        (
            training_args[k]
            for k in ("vision_model", "clip_model")
            if isinstance((training_args or {}).get(k), str)
        ),
        None,
    )
    return ModelCardData(
        license=LICENSE,
        library_name="transformers",
        pipeline_tag="image-to-text",
        tags=["image-captioning", "clip", "lstm", "custom_code"],
        base_model=base if base and "/" in base and is_hub_id(base) else None,
        datasets=[dataset["id"]] if dataset["id"] else None,
        metrics=sorted({result.metric_type for result in results}) or None,
        model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
    )


def write_model_card(
    folder: str | os.PathLike,
    *,
    report: dict | str | os.PathLike | None = None,
    training_args: dict | str | os.PathLike | None = None,
    repo_id: str = "your-name/clip-lstm-captioner",
) -> Path:
    """Write `folder/README.md`: YAML metadata (licence, pipeline tag, datasets, model-index) and the card,
    built with huggingface_hub's `ModelCard` / `ModelCardData` / `EvalResult`.

    `folder` is a saved model (its config.json and weights describe the architecture); `report` is
    evaluate_model.py's report (dict or path), `training_args` the run's saved arguments.

    Example:
        write_model_card("outputs/run", report="outputs/run/report.json", repo_id="me/clip-lstm")
        # -> PosixPath('outputs/run/README.md')
    """
    folder = Path(folder)
    report, training_args = _read_json(report), _read_json(training_args)
    dataset = describe_dataset((report or {}).get("dataset") or _training_dataset(training_args))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    intro = (
        f"# {repo_id.split('/')[-1]}\n\nAn image captioner: a frozen CLIP vision tower turns the image into one "
        "embedding, which is the first input step of an LSTM that writes the caption; beam search picks the "
        f"sentence. Trained on {dataset['name']}."
    )
    sections = [
        intro,
        _usage(repo_id),
        _evaluation(report),
        _training(training_args, dataset),
        _architecture(config, _weights_dtype(folder)),
        "## Limitations\n\nCaptions are short, literal and English; the model knows only what its training data "
        "shows and repeats that data's biases. Compare with BLIP before relying on it.",
    ]
    metadata = _metadata(report, training_args, dataset, repo_id)
    card = ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    path = folder / "README.md"
    write_text_atomic(path, str(card))
    return path


# ----------------------------------------------------------------------------- saving and uploading


def save_for_hub(
    model: ClipLstmForImageCaptioning,
    processor: ClipLstmProcessor,
    folder: str | os.PathLike,
    *,
    float16: bool = False,
    report: dict | str | os.PathLike | None = None,
    training_args: dict | str | os.PathLike | None = None,
    repo_id: str = "your-name/clip-lstm-captioner",
) -> list[str]:
    """Save everything a Hub repo needs into `folder` and return the file names (checked complete).

    `float16=True` stores the floating-point weights in half precision (half the download); config.json
    keeps `dtype: float32`, so `from_pretrained` upcasts them unless the user asks for another dtype.

    Example:
        save_for_hub(model, processor, "to_upload", float16=True)
        # -> ['README.md', 'config.json', ...]
    """
    check_vocabulary(processor.tokenizer, model.config.vocab_size)  # before anything is written
    folder = Path(folder)
    state_dict = None
    if float16:
        state_dict = {
            name: t.half() if t.is_floating_point() else t for name, t in model.state_dict().items()
        }
    # save_pretrained copies the code files and writes auto_map, because the classes are registered for auto classes.
    model.save_pretrained(folder, state_dict=state_dict)
    processor.save_pretrained(folder)
    write_model_card(folder, report=report, training_args=training_args, repo_id=repo_id)
    names = sorted(path.name for path in folder.iterdir())
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing or not any(name in names for name in WEIGHT_FILES):
        raise RuntimeError(
            f"the repo folder lacks {missing or 'weights'}; it would not load with trust_remote_code"
        )
    return names


def publish(
    source: str | os.PathLike | tuple[ClipLstmForImageCaptioning, ClipLstmProcessor],
    repo_id: str,
    *,
    report: dict | str | os.PathLike | None = None,
    training_args: dict | str | os.PathLike | None = None,
    float16: bool = False,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> CommitInfo:
    """Create `repo_id` if needed and upload model, processor, code and card to it in one commit.

    `source` is a model folder (its report.json and training_args.json are used unless given) or a
    (model, processor) pair. `endpoint` defaults to HF_ENDPOINT / huggingface.co; `token` to the
    logged-in token. Returns the commit (a str: its URL).

    Example:
        publish("outputs/flickr8k", "me/clip-lstm-flickr8k", float16=True).commit_url
        # -> 'https://huggingface.co/me/clip-lstm-flickr8k/commit/...'
    """
    if constants.is_offline_mode():
        raise RuntimeError("cannot publish with HF_HUB_OFFLINE=1 set; unset it to reach the Hub")
    model, processor, folder = _model_and_processor(source)
    report = _read_json(report) if report is not None else _read_json_in(folder, REPORT_FILE)
    if training_args is None:
        training_args = _read_json_in(folder, TRAINING_ARGS_FILE)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="clip-lstm-publish-") as staging:
        save_for_hub(
            model,
            processor,
            staging,
            float16=float16,
            report=report,
            training_args=training_args,
            repo_id=repo_id,
        )
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, commit_message=commit_message)


__all__ = ["describe_dataset", "eval_results", "model_index", "publish", "save_for_hub", "write_model_card"]
