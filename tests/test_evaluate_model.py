"""evaluate_model.py on the offline demo model (trained once per session by conftest's `demo_run`),
side by side with a tiny random BLIP saved to a temporary folder.

Random BLIP ignores the image: its captions are only checked to exist and to be scored correctly,
never compared per image. METEOR (a Java start, ~10 s) runs in one test only; the rest pass --no_meteor.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import datasets
import evaluate
import pytest
from PIL import Image
from tiny import save_peaked_captioner, save_tiny_blip

import evaluate_model
from clip_lstm_captioner import data
from clip_lstm_captioner.cli import load_captioner
from clip_lstm_captioner.reports import SHAPES_COLUMNS, THUMBNAIL_PIXELS
from modeling_clip_lstm import ClipLstmForImageCaptioning

METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider")
REPORT_FILES = ("report.json", "report.md", "captions.jsonl", "gallery.html", "gallery.png")


def demo_args(demo_run: Path, output_dir: Path, *extra: str) -> list[str]:
    """CLI arguments for the demo model on the shapes set the demo training generated (not made again)."""
    return [
        "--model", str(demo_run / "model"), "--dataset", "shapes",
        "--data_cache_dir", str(demo_run.parent / "cache"), "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluation(demo_run, tmp_path_factory):
    """One full CLI run: the demo model on the shapes test split with --compare_blip, generate() rows counted."""
    root = tmp_path_factory.mktemp("evaluation")
    blip_folder = save_tiny_blip(root / "blip")
    output_dir = root / "eval"
    captioned_rows = []
    original_generate = ClipLstmForImageCaptioning.generate

    def counting_generate(self, *args, **kwargs):
        inputs = kwargs.get("image_embeds", kwargs.get("pixel_values"))
        captioned_rows.append((len(inputs), bool(kwargs.get("output_attentions"))))
        return original_generate(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClipLstmForImageCaptioning, "generate", counting_generate)
        args = demo_args(
            demo_run, output_dir, "--compare_blip", "--blip_model", str(blip_folder), "--no_meteor"
        )
        report = evaluate_model.main(args)
    splits = data.load_caption_dataset("shapes", cache_dir=demo_run.parent / "cache")
    return dict(report=report, output_dir=output_dir, captioned_rows=captioned_rows, splits=splits)


def test_writes_every_file_in_its_documented_shape(evaluation):
    output_dir, report = evaluation["output_dir"], evaluation["report"]
    assert all((output_dir / name).is_file() for name in REPORT_FILES)
    assert json.loads((output_dir / "report.json").read_text()) == report
    assert report["dataset"] == "shapes" and report["split"] == "test"
    assert report["num_images"] == evaluation["splits"]["test"].num_rows
    assert report["generation"] == {
        "num_beams": 5,
        "max_new_tokens": 30,
    }  # the demo's saved generation config
    assert list(report["models"]) == ["ours", "blip", "most_frequent_caption"]
    for row in report["models"].values():
        assert {*METRIC_KEYS, "meteor", "model"} <= set(row)
        assert row["meteor"] is None and "meteor=False" in row["meteor_unavailable"]
    for key in ("ours", "blip"):
        assert report["models"][key]["seconds"] > 0 and report["models"][key]["images_per_s"] > 0
    assert {"torch", "transformers", "datasets", "evaluate", "accelerate"} <= set(report["versions"])
    table = (output_dir / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("| model |"))
    header, rows = table[start], table[start + 2 : table.index("", start)]
    assert "BLEU-4" in header and "CIDEr" in header and "images/s" in header
    assert [row.split(":")[0] for row in rows] == ["| ours", "| BLIP", "| most frequent training caption"]
    assert all(row.count("|") == header.count("|") for row in rows)
    # percentages, as caption papers print them
    assert f"{100 * report['models']['ours']['bleu_4']:.1f}" in rows[0]


def test_report_md_shows_every_shapes_score(evaluation):
    output_dir, shapes = evaluation["output_dir"], evaluation["report"]["shapes"]
    assert {"count_accuracy", "hallucination_rate", "second_object_accuracy"} <= set(shapes["ours"])
    table = (output_dir / "report.md").read_text().splitlines()
    start = next(i for i, line in enumerate(table) if line.startswith("| shapes set |"))
    header, rows = table[start], table[start + 2 : table.index("", start)]
    new_columns = (
        "colour and shape",
        "stated counts right",
        "names an object not drawn",
        "second object named",
    )
    assert all(column in header for column in new_columns), header
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    assert [row[0] for row in cells] == ["ours", "BLIP", "most frequent training caption"]
    for (key, scores), row in zip(shapes.items(), cells, strict=True):
        expected = ["–" if scores[name] is None else f"{100 * scores[name]:.1f}" for name in SHAPES_COLUMNS]
        assert row[1:] == expected, key


def test_every_test_image_is_captioned_once(evaluation):
    split, output_dir = evaluation["splits"]["test"], evaluation["output_dir"]
    captioning = [rows for rows, attentions in evaluation["captioned_rows"] if not attentions]
    assert sum(captioning) == split.num_rows  # once per image, not once per reference
    # The demo is a patches model: one more small call draws the heatmaps of the first gallery images.
    heatmaps = [rows for rows, attentions in evaluation["captioned_rows"] if attentions]
    assert heatmaps == [evaluate_model.NUM_HEATMAP_IMAGES]
    lines = read_jsonl(output_dir / "captions.jsonl")
    assert [line["image_id"] for line in lines] == split["image_id"]
    assert [line["references"] for line in lines] == split["captions"]
    assert all(line["ours"] and isinstance(line["blip"], str) for line in lines)


def test_metrics_are_in_range_and_the_demo_beats_the_most_frequent_caption(evaluation):
    models = evaluation["report"]["models"]
    for row in models.values():
        assert all(isinstance(row[key], float) and 0.0 <= row[key] <= 1.0 for key in METRIC_KEYS[:-1])
        assert isinstance(row["cider"], float) and 0.0 <= row["cider"] <= 10.0
    ours, baseline = models["ours"], models["most_frequent_caption"]
    assert ours["bleu_4"] > baseline["bleu_4"] and ours["cider"] > baseline["cider"]
    shapes = evaluation["report"]["shapes"]
    assert shapes["ours"]["colour_accuracy"] > shapes["most_frequent_caption"]["colour_accuracy"] + 0.3


def test_metrics_equal_a_direct_recomputation_from_captions_jsonl(evaluation):
    lines = read_jsonl(evaluation["output_dir"] / "captions.jsonl")
    references = [line["references"] for line in lines]
    metric = evaluate.load(str(evaluate_model.METRICS_DIR))
    baseline = evaluate_model.most_frequent_caption(evaluation["splits"]["train"]["captions"])
    predictions = {
        "ours": [line["ours"] for line in lines],
        "blip": [line["blip"] for line in lines],
        "most_frequent_caption": [baseline] * len(lines),
    }
    for key, captions in predictions.items():
        expected = metric.compute(predictions=captions, references=references, meteor=False)
        reported = evaluation["report"]["models"][key]
        assert {k: reported[k] for k in METRIC_KEYS} == pytest.approx(
            {k: expected[k] for k in METRIC_KEYS}, abs=1e-12
        )


def test_captions_from_image_files_equal_captions_from_cached_embeddings(evaluation, demo_run, tmp_path):
    report = evaluate_model.main(
        demo_args(demo_run, tmp_path, "--no_cache", "--no_meteor", "--num_gallery", "2")
    )
    assert report["captioned_from"].startswith("image files")
    assert evaluation["report"]["captioned_from"].startswith("cached CLIP")
    from_files = [line["ours"] for line in read_jsonl(tmp_path / "captions.jsonl")]
    from_cache = [line["ours"] for line in read_jsonl(evaluation["output_dir"] / "captions.jsonl")]
    assert from_files == from_cache


class _GalleryParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.alts, self.terms = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
            self.alts.append(dict(attrs).get("alt"))

    def handle_data(self, text):
        self.terms.append(text)


def test_gallery_is_self_contained_with_captions_and_references(evaluation):
    output_dir = evaluation["output_dir"]
    parser = _GalleryParser()
    parser.feed((output_dir / "gallery.html").read_text())
    figures = gallery_figures((output_dir / "gallery.html").read_text())
    assert len(figures) == 8
    prefix = "data:image/jpeg;base64,"
    thumbnails = [figure[0][0] for figure in figures]
    assert all(src.startswith(prefix) for src in thumbnails)  # the pictures travel inside the page
    heatmaps = [src for figure in figures for src, _ in figure[1:]]  # the demo is a patches model
    assert heatmaps and all((output_dir / src).is_file() for src in heatmaps)  # beside it, in its folder
    with Image.open(io.BytesIO(base64.b64decode(thumbnails[0][len(prefix) :]))) as thumbnail:
        assert thumbnail.format == "JPEG" and max(thumbnail.size) <= THUMBNAIL_PIXELS
    assert {"ours", "BLIP", "references"} <= set(parser.terms)
    first = read_jsonl(output_dir / "captions.jsonl")[0]
    assert first["ours"] in parser.terms and first["references"][0] in parser.terms
    with Image.open(output_dir / "gallery.png") as picture:
        assert picture.format == "PNG" and picture.width > 600 and picture.height > 400


def test_evaluate_captioner_from_images_with_meteor(demo_run, tmp_path):
    """The function train_accelerate.py calls, on a split without cached embeddings; the one METEOR run."""
    pytest.importorskip("pycocoevalcap", reason="METEOR needs pycocoevalcap (pip install '.[coco]')")
    if shutil.which("java") is None:
        pytest.skip("METEOR needs java (Debian: openjdk-17-jre-headless)")
    model, processor = load_captioner(str(demo_run / "model"))
    split = data.load_caption_dataset("shapes", cache_dir=demo_run.parent / "cache")["test"].select(range(12))
    report = evaluate_model.evaluate_captioner(
        model, processor, split, output_dir=tmp_path, dataset_name="shapes", num_beams=3, num_gallery=3
    )
    ours = report["models"]["ours"]
    assert list(report["models"]) == ["ours"]  # no BLIP, no train captions: no other rows
    assert report["generation"] == {"num_beams": 3, "max_new_tokens": 30}
    assert isinstance(ours["meteor"], float) and 0.0 < ours["meteor"] <= 1.0
    assert ours["meteor_seconds"] > 0 and "meteor_unavailable" not in ours
    assert len(read_jsonl(tmp_path / "captions.jsonl")) == 12
    assert (tmp_path / "report.md").read_text().count("| ours") == 1


def test_push_to_hub_publishes_the_report_as_model_index(demo_run, tmp_path, monkeypatch):
    from clip_lstm_captioner import publishing

    published = {}

    def fake_publish(source, repo_id, *, report=None, **kwargs):
        published.update(source=source, repo_id=repo_id, report=report)
        return "https://hub.example/commit/1"

    monkeypatch.setattr(publishing, "publish", fake_publish)
    argv = demo_args(demo_run, tmp_path, "--no_meteor", "--max_images", "6", "--num_gallery", "2", "--push_to_hub",
                     "--hub_model_id", "me/clip-lstm-shapes")  # fmt: skip
    report = evaluate_model.main(argv)
    assert report["num_images"] == 6
    assert published == {
        "source": str(demo_run / "model"),
        "repo_id": "me/clip-lstm-shapes",
        "report": report,
    }
    index = publishing.model_index(report, "clip-lstm-shapes")
    metrics = {entry["name"]: entry["value"] for entry in index[0]["results"][0]["metrics"]}
    assert metrics["BLEU-4"] == round(report["models"]["ours"]["bleu_4"], 4) and "METEOR" not in metrics
    assert index[0]["results"][0]["dataset"]["split"] == "test"


def dataset_without_references(folder: Path, test_captions=(), num_images: int = 2) -> datasets.DatasetDict:
    """A Hub-style dataset (one row per image, a `caption` list column) whose test split has no captions
    (or `test_captions` for each image); `num_images` images per split, each a different red."""
    folder.mkdir()
    raw = {}
    splits = (("train", ["a red square"]), ("validation", ["a red square"]), ("test", list(test_captions)))
    for split, captions in splits:
        paths = []
        for index in range(num_images):
            path = folder / f"{split}{index}.png"
            Image.new("RGB", (40, 30), (200 - 20 * index, 30, 30 + 20 * index)).save(path)
            paths.append(str(path))
        rows = {"image": paths, "caption": [list(captions) for _ in paths]}
        raw[split] = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    return data.load_caption_dataset(datasets.DatasetDict(raw))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing model folder", "no such folder"),
        ("run folder instead of model folder", "its model/ subfolder has one"),
        ("unknown split", "unknown split; this dataset has train, validation, test"),
        ("no references", "have no reference captions"),
        ("offline Hub model id", "pass a folder saved by train_accelerate.py"),
        ("push without repo id", "needs --hub_model_id"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(case, expected, demo_run, tmp_path, monkeypatch, capsys):
    argv = demo_args(demo_run, tmp_path / "eval", "--no_meteor")
    if case == "missing model folder":
        argv[1] = str(tmp_path / "no-such-run" / "model")
    elif case == "run folder instead of model folder":
        argv[1] = str(demo_run)
    elif case == "unknown split":
        argv += ["--split", "holdout"]
    elif case == "no references":
        empty = dataset_without_references(tmp_path / "images")
        monkeypatch.setattr(data, "dataset_from_args", lambda args: empty)
    elif case == "offline Hub model id":
        argv[1] = "someone/clip-lstm-flickr8k"
    else:
        argv += ["--push_to_hub"]
    with pytest.raises(SystemExit) as raised:
        evaluate_model.main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    last_line = err.rstrip("\n").split("\n")[-1].split("\r")[-1]  # after any progress bar's carriage returns
    assert last_line.startswith("evaluate_model.py: error: ") and expected in last_line
    assert "Traceback" not in err
    assert not (tmp_path / "eval" / "report.json").exists()


def test_most_frequent_caption_normalises_case_spacing_and_final_period():
    assert (
        evaluate_model.most_frequent_caption([["A dog runs.", "a cat"], ["a dog  runs", "a cat"]])
        == "a dog runs"
    )
    assert evaluate_model.most_frequent_caption(["b", "a", "a", "b"]) == "b"  # a tie goes to the first seen
    assert evaluate_model.most_frequent_caption([[]]) is None


def test_bench_eval_prints_its_figures_as_json(tmp_path):
    """A 4-image run of benchmarks/bench_eval.py (its tiny tower) in a subprocess, from another folder."""
    script = Path(evaluate_model.__file__).resolve().parent / "benchmarks" / "bench_eval.py"
    options = [
        "--num_images",
        "4",
        "--max_new_tokens",
        "3",
        "--no_meteor",
        "--num_workers",
        "0",
        "--tiny_tower",
    ]
    argv = [sys.executable, str(script), *options, "--device", "cpu"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)  # stdout is the JSON alone; progress goes to stderr
    assert figures["settings"]["num_images"] == 4 and figures["settings"]["vocab_size"] == 8000
    for case in ("cached", "files"):
        assert figures[case]["seconds_without_meteor"] > 0 and figures[case]["captioning_seconds"] > 0
        assert figures[case]["mean_caption_words"] == 3.0  # random weights never stop early, as the JSON says
        assert figures[case]["meteor_seconds"] is None
    assert figures["cache_fill_seconds"] > 0
    assert [target["met"] for target in figures["targets"]] == [None, None]  # judged on an H100/H200 only


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """CLI arguments for a tiny saved captioner on a 2-image test split (no demo training needed)."""
    splits = dataset_without_references(tmp_path / "images", ["a red square", "a red circle"])
    monkeypatch.setattr(data, "dataset_from_args", lambda args: splits)
    model_dir = save_peaked_captioner(tmp_path / "model")
    output_dir = tmp_path / "eval"
    argv = ["--model", str(model_dir), "--output_dir", str(output_dir), "--no_cache", "--no_meteor"]
    return argv + ["--num_workers", "0", "--num_beams", "2", "--max_new_tokens", "5"], output_dir


@pytest.mark.parametrize("blip_model", ["Salesforce/blip-image-captioning-base", "{tmp}/no-blip-here"])
def test_compare_blip_without_blip_still_writes_our_report(tiny_run, blip_model, tmp_path, capsys):
    """The default Hub id offline (conftest sets HF_HUB_OFFLINE=1) or a missing folder: our report is
    written, and one line says why BLIP is not in it."""
    argv, output_dir = tiny_run
    blip_model = blip_model.replace("{tmp}", str(tmp_path))
    report = evaluate_model.main(argv + ["--compare_blip", "--blip_model", blip_model])
    assert list(report["models"]) == ["ours", "most_frequent_caption"]
    assert (
        report["blip_unavailable"].startswith("cannot compare with BLIP: ")
        and repr(blip_model) in (report["blip_unavailable"])
    )
    saved = json.loads((output_dir / "report.json").read_text())
    assert (
        saved["models"]["ours"]["bleu_1"] is not None
        and saved["blip_unavailable"] == report["blip_unavailable"]
    )
    assert report["blip_unavailable"] in (output_dir / "report.md").read_text()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "BLIP" in line]
    assert warnings == [f"evaluate_model.py: warning: {report['blip_unavailable']}"]


@pytest.mark.parametrize("num_beams", ["65", "100000"])
def test_num_beams_has_an_upper_bound(tiny_run, num_beams, capsys):
    argv, output_dir = tiny_run
    with pytest.raises(SystemExit) as raised:
        evaluate_model.main(argv + ["--num_beams", num_beams])
    assert raised.value.code == 2
    assert f"--num_beams: must be at most 64, got {num_beams}" in capsys.readouterr().err
    assert not output_dir.exists()


# ----------------------------------------------------------------------------- where a patches model looked


def gallery_figures(html: str) -> list[list[tuple[str, str]]]:
    """Each gallery figure's images as (src, alt): its thumbnail first, then its heatmap pictures."""
    parser = _GalleryParser()
    parser.feed(html)
    figures = []
    for src, alt in zip(parser.images, parser.alts, strict=True):
        if src.startswith("data:"):
            figures.append([(src, alt)])
        else:
            figures[-1].append((src, alt))
    return figures


def test_gallery_shows_where_a_patches_model_looked_for_its_first_images(tmp_path, monkeypatch):
    splits = dataset_without_references(tmp_path / "images", ["a red square", "a red circle"], num_images=6)
    monkeypatch.setattr(data, "dataset_from_args", lambda args: splits)
    output_dir = tmp_path / "eval"
    argv = ["--output_dir", str(output_dir), "--no_cache", "--no_meteor", "--num_workers", "0"]
    argv += ["--num_beams", "2", "--max_new_tokens", "5", "--num_gallery", "6"]
    model_dir = save_peaked_captioner(tmp_path / "patches", image_feature="patches")
    evaluate_model.main(["--model", str(model_dir), *argv])
    figures = gallery_figures((output_dir / "gallery.html").read_text())
    captions = [line["ours"] for line in read_jsonl(output_dir / "captions.jsonl")]
    tokenizer = load_captioner(str(model_dir))[1].tokenizer
    assert len(figures) == 6 and all(figure[1:] == [] for figure in figures[4:])  # the first four only
    for index, (figure, caption) in enumerate(zip(figures[:4], captions, strict=False)):
        words = tokenizer.tokenize(caption)
        assert words and [alt for _, alt in figure[1:]] == words  # one picture per word of the caption shown
        for position, (src, _) in enumerate(figure[1:]):
            assert src == f"gallery-heatmaps/{index:02d}-{position:02d}.png"
            with Image.open(output_dir / src) as picture:
                assert picture.format == "PNG" and picture.size == (128, 128)
    assert len(list((output_dir / "gallery-heatmaps").iterdir())) == len(sum((f[1:] for f in figures), []))
    # A pooled model evaluated into the same folder: the gallery as before, no stale pictures left.
    pooled_dir = save_peaked_captioner(tmp_path / "pooled")
    evaluate_model.main(["--model", str(pooled_dir), *argv])
    figures = gallery_figures((output_dir / "gallery.html").read_text())
    assert len(figures) == 6 and all(len(figure) == 1 for figure in figures)
    assert not (output_dir / "gallery-heatmaps").exists()
