"""The caption metric module (metrics/caption_metrics): parity with pycocoevalcap, loading
through `evaluate` offline, the Python tokenizer against the Java PTB tokenizer, METEOR."""

import importlib.util
import random
import shutil
import sys
from pathlib import Path

import evaluate
import pytest

METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "caption_metrics"


def _load_module():
    spec = importlib.util.spec_from_file_location("caption_metrics", METRIC_DIR / "caption_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cm = _load_module()


def _has_pycocoevalcap() -> bool:
    return importlib.util.find_spec("pycocoevalcap") is not None


needs_pycocoevalcap = pytest.mark.skipif(
    not _has_pycocoevalcap(), reason="pycocoevalcap is not installed (pip install -e .[dev])"
)
needs_java = pytest.mark.skipif(
    not _has_pycocoevalcap() or shutil.which("java") is None,
    reason="needs pycocoevalcap and a java on PATH (Debian: openjdk-17-jre-headless)",
)


def _random_corpus(seed: int, num_images: int = 200) -> tuple[list[str], list[list[str]]]:
    """Space-separated captions from a 50-word vocabulary, 1-5 references per image.

    Predictions mix partial copies of a reference (shared n-grams), unrelated sentences and
    corner cases: one word, words no reference has, a repeated word, an empty caption.
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50)]

    def sentence() -> list[str]:
        # a skewed vocabulary (some sentences use only 10 words) makes n-grams recur across images
        words = vocab[: rng.choice([10, 50])]
        return [rng.choice(words) for _ in range(rng.randint(3, 15))]

    references = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(num_images)]
    predictions = []
    for refs in references:
        kind = rng.random()
        if kind < 0.45:
            copy = rng.choice(refs)
            start = rng.randint(0, len(copy) - 1)
            prediction = copy[start : start + rng.randint(1, 12)] + sentence()[: rng.randint(0, 4)]
        elif kind < 0.55:
            prediction = [rng.choice(vocab)]
        elif kind < 0.62:
            prediction = ["unseen", "words", "only"]
        elif kind < 0.70:
            prediction = [rng.choice(vocab)] * rng.randint(2, 8)
        elif kind < 0.72:
            prediction = []
        else:
            prediction = sentence()
        predictions.append(prediction)
    return [" ".join(p) for p in predictions], [[" ".join(r) for r in refs] for refs in references]


def _pycocoevalcap_scores(predictions, references) -> dict:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = dict(enumerate(references))
    res = {i: [p] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"bleu_{n}": b for n, b in enumerate(bleu, start=1)}
    scores["rouge_l"] = Rouge().compute_score(gts, res)[0]
    scores["cider"] = Cider().compute_score(gts, res)[0]
    return scores


@needs_pycocoevalcap
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_rouge_cider_match_pycocoevalcap(seed):
    predictions, references = _random_corpus(seed)
    ours = cm.compute_caption_metrics(predictions, references, tokenize="none", meteor=False)
    expected = _pycocoevalcap_scores(predictions, references)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    # the corpus is varied enough that every metric is far from its degenerate values
    assert 0.05 < ours["bleu_4"] < ours["bleu_1"] < 0.95
    assert 0.3 < ours["cider"] < 5


CORNER_CASES = {
    "one word, no overlap, repeats, empty": (
        ["dog", "zebra zebra zebra", "a a a a a", "the cat sat on the mat", ""],
        [
            ["a dog runs", "dog"],
            ["a horse in a field"],
            ["a a cat", "a man and a woman"],
            ["the cat sat on the mat", "a cat sat on a mat", "the cat is on the mat"],
            ["an empty caption", "nothing"],
        ],
    ),
    # no 3- or 4-grams at all: BLEU-3/4 are then set by coco-caption's smoothing constants
    "one short caption": (["a dog"], [["a dog runs", "the dog"]]),
}


@needs_pycocoevalcap
@pytest.mark.parametrize("case", list(CORNER_CASES))
def test_parity_on_corner_cases(case):
    predictions, references = CORNER_CASES[case]
    ours = cm.compute_caption_metrics(predictions, references, tokenize="none", meteor=False)
    for key, value in _pycocoevalcap_scores(predictions, references).items():
        assert ours[key] == pytest.approx(value, abs=1e-6, rel=1e-6), key


def test_hand_computed_values():
    # BLEU-1: all 3 words match, brevity penalty exp(1 - 4/3); ROUGE-L: P=1, R=3/4, beta 1.2
    bleu = cm.corpus_bleu([["a", "dog", "runs"]], [[["a", "dog", "runs", "fast"]]])
    assert bleu[0] == pytest.approx(2.718281828 ** (1 - 4 / 3), rel=1e-6)
    rouge = cm.rouge_l([["a", "dog", "runs"]], [[["a", "brown", "dog", "runs"]]])
    assert rouge == pytest.approx(2.44 * 0.75 / (0.75 + 1.44))
    # perfect captions whose n-grams occur in no other image: cosine 1 for each order -> 10
    perfect = [["a", "dog", "runs", "fast"], ["two", "cats", "sleep", "inside"]]
    assert cm.cider_d(perfect, [[c] for c in perfect]) == pytest.approx(10.0)
    # an n-gram found in every image's references carries no information (idf 0)
    assert cm.cider_d([["a"], ["a"]], [[["a"]], [["a"]]]) == 0.0
    assert cm.lcs_length(list("abcbdab"), list("bdcaba")) == 4


def test_evaluate_load_offline_matches_module_functions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    predictions, references = _random_corpus(seed=3, num_images=40)
    metric = evaluate.load(str(METRIC_DIR))
    result = metric.compute(predictions=predictions, references=references, meteor=False)
    assert result == cm.compute_caption_metrics(predictions, references, meteor=False)
    assert set(result) == {f"bleu_{n}" for n in range(1, 5)} | {
        "rouge_l",
        "cider",
        "meteor",
        "meteor_unavailable",
    }
    assert all(isinstance(result[key], float) for key in ("bleu_1", "bleu_4", "rouge_l", "cider"))


@pytest.mark.parametrize(
    ("predictions", "references", "message"),
    [
        ([], [], "predictions is empty"),
        (["a dog"], [["a dog"], ["a cat"]], "predictions has 1 captions but references has 2"),
        (["a dog", "a cat"], [["a dog"], []], r"references\[1\] is empty"),
        (["a dog"], ["a dog"], r"references\[0\] is a string"),
    ],
)
def test_bad_inputs_raise_one_line_value_errors(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        cm.compute_caption_metrics(predictions, references, meteor=False)


def test_unknown_tokenizer_is_rejected():
    with pytest.raises(ValueError, match="tokenize='spacy'"):
        cm.compute_caption_metrics(["a dog"], [["a dog"]], tokenize="spacy", meteor=False)


def test_python_tokenizer_on_caption_punctuation():
    assert cm.ptb_like_tokenize("A dog's ball, isn't it?") == ["a", "dog", "'s", "ball", "is", "n't", "it"]
    assert cm.ptb_like_tokenize("Two kids' toys (red) -- 3.5 ft... at 9:30 p.m.") == [
        "two", "kids", "toys", "-lrb-", "red", "-rrb-", "3.5", "ft", "at", "9:30", "p.m.",
    ]  # fmt: skip
    # already tokenized Flickr8k text keeps its split contractions
    assert cm.ptb_like_tokenize("a dog 's ball .") == ["a", "dog", "'s", "ball"]


# Sentences with punctuation on which the Python tokenizer must agree with the Java one.
AGREEING_SENTENCES = [
    "A dog runs across the field.",
    "Two men, one woman: playing (soccer) in the park!",
    "The dog's ball isn't red; it's blue...",
    "\"Hello,\" she said -- 'goodbye'.",
    "A black-and-white dog jumps over a 3.5 foot fence at 5 p.m. today",
    "Mr. Smith & Mrs. Jones walk {together} [quickly]?",
    "A man w/ a hat, e.g. a fedora; costs $1,000 or 50%.",
    "People can't won't don't shouldn't they're we've I'd you'll",
    "A boy in a ``red'' shirt -- jumping!!! ?!",
    "  multiple   spaces\tand tabs  ",
    "dogs' toys and the cats'",
    "It was 9:30 on 1/2/2003... and/or later",
    "\u201cquoted\u201d and \u2018single\u2019 don\u2019t \u2014 a dog \u2026 runs",
    'A brown-and-white dog runs through the "tall" grass.',
    "The boy's shirt says 'Go!'",
    "the U.S. flag flies; u.s.... wait.. mr.) ok",
    "a child in a pink dress is climbing up a set of stairs in an entry way .",
    "in a. the dog, in a. The dog",
    "a line\rbreak and a\u2028separator inside a caption",
]

# Known differences, pinned here as (sentence, Java PTB tokens, Python tokens). All are rare
# in captions; the single-letter case depends on the next caption's first word in Java.
KNOWN_DIFFERENCES = [
    ("visit http://x.org/a", ["visit", "http://x.org/a"], ["visit", "http", "//x.org/a"]),
    ("x*y a+b #1", ["x", "*", "y", "a", "+", "b", "#", "1"], ["x*y", "a+b", "#1"]),
    (
        "rock'n'roll in the '90s",
        ["rock", "'n'", "roll", "in", "the", "'90s"],
        ["rock'n'roll", "in", "the", "90s"],
    ),
    ("\u20ac5 at 3:00pm", ["$", "5", "at", "3:00", "pm"], ["\u20ac5", "at", "3:00pm"]),
    ("wow!great", ["wow!great"], ["wow", "great"]),
]


@needs_java
def test_python_tokenizer_agrees_with_java_ptb_tokenizer():
    sentences = AGREEING_SENTENCES + [sentence for sentence, _, _ in KNOWN_DIFFERENCES]
    java = cm._java_ptb_tokenize(sentences)
    for sentence, java_tokens in zip(sentences, java, strict=True):
        if sentence in AGREEING_SENTENCES:
            assert cm.ptb_like_tokenize(sentence) == java_tokens, sentence
    for (sentence, java_tokens, python_tokens), actual_java in zip(
        KNOWN_DIFFERENCES, java[len(AGREEING_SENTENCES) :], strict=True
    ):
        assert (actual_java, cm.ptb_like_tokenize(sentence)) == (java_tokens, python_tokens), sentence


@needs_java
def test_meteor_runs_with_java_and_ptb_tokenizer_agrees():
    predictions = ["A dog runs on the grass.", "a cat sleeps on a sofa", "two people ride bikes"]
    references = [
        ["A dog runs on the grass.", "A brown dog is running."],
        ["A cat is sleeping on the couch."],
        ["Two men are riding bicycles down the street.", "People cycling."],
    ]
    result = cm.compute_caption_metrics(predictions, references, tokenize="ptb")
    assert 0 < result["meteor"] <= 1
    assert "meteor_unavailable" not in result
    python = cm.compute_caption_metrics(predictions, references, tokenize="python", meteor=False)
    for key in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"):
        assert result[key] == pytest.approx(python[key]), key


def test_meteor_reports_why_it_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no java
    metric = evaluate.load(str(METRIC_DIR))
    result = metric.compute(predictions=["a dog"], references=[["a dog runs"]])
    assert result["meteor"] is None
    expected = "java not found on PATH" if _has_pycocoevalcap() else "pycocoevalcap is not installed"
    assert expected in result["meteor_unavailable"]
    with pytest.raises(ValueError, match="tokenize='ptb' needs pycocoevalcap and Java"):
        cm.compute_caption_metrics(["a dog"], [["a dog"]], tokenize="ptb")


def test_meteor_without_pycocoevalcap(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # makes `import pycocoevalcap` fail
    result = cm.compute_caption_metrics(["a dog"], [["a dog runs"]])
    assert result["meteor"] is None
    assert "pycocoevalcap is not installed" in result["meteor_unavailable"]
    assert result["bleu_1"] > 0.5  # the Python metrics do not need it
