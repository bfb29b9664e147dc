"""Caption metrics as the COCO caption evaluation defines them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

An `evaluate` metric module that loads offline from its folder:

    >>> import evaluate
    >>> metric = evaluate.load("metrics/caption_metrics")
    >>> result = metric.compute(predictions=["a dog runs"], references=[["a dog runs on grass", "a brown dog"]])
    >>> sorted(result)
    ['bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'cider', 'meteor', 'rouge_l']

BLEU, ROUGE-L and CIDEr-D are computed here in Python and match pycocoevalcap (the Python 3
port of coco-caption) to 1e-6 on the same tokens. METEOR is delegated to pycocoevalcap's
Java scorer when pycocoevalcap and `java` are available. SPICE is not attempted.

The scoring functions (`corpus_bleu`, `rouge_l`, `cider_d`) take captions that are already
split into tokens; `compute_caption_metrics` tokenizes and runs them all.
"""

import functools
import math
import operator
import re
import shutil
import time
from collections import Counter

import datasets
import evaluate
import numpy as np

logger = evaluate.logging.get_logger(__name__)

_CITATION = """\
Chen, Fang, Lin, Vedantam, Gupta, Dollar, Zitnick (2015). Microsoft COCO Captions: Data
Collection and Evaluation Server. arXiv:1504.00325.
Papineni, Roukos, Ward, Zhu (2002). BLEU: a Method for Automatic Evaluation of Machine
Translation. ACL.
Lin (2004). ROUGE: A Package for Automatic Evaluation of Summaries. ACL Workshop.
Vedantam, Zitnick, Parikh (2015). CIDEr: Consensus-based Image Description Evaluation. CVPR.
Denkowski, Lavie (2014). Meteor Universal: Language Specific Translation Evaluation for Any
Target Language. WMT.
"""

_DESCRIPTION = """\
The caption metrics of the COCO caption evaluation (coco-caption / pycocoevalcap), computed
over a whole corpus with all reference captions of each image: BLEU-1..4 (clipped n-gram
precision, brevity penalty against the reference closest in length), ROUGE-L (LCS F-measure,
beta 1.2, best precision and recall over the references, averaged over images), CIDEr-D
(tf-idf n-gram cosine similarity with clipping and a gaussian length penalty, times 10,
document frequencies taken from the references being scored) and, when Java is present,
METEOR 1.5. The numbers are on pycocoevalcap's scale: 0..1 except CIDEr-D (0..10).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): one generated caption per image.
    references (`list` of `list` of `str`): all reference captions of each image, in the
        same order as `predictions`; images may have different numbers of references.
    tokenize (`str`, default "python"): "python" lower-cases and splits off punctuation like
        coco-caption's Java PTB tokenizer (without Java); "ptb" runs that Java tokenizer
        (needs pycocoevalcap and java); "none" takes space-separated tokens as they are.
    meteor (`bool`, default True): compute METEOR (starts a Java process: about 10 s on
        2 CPU cores, mostly start-up, for 1 or 1000 images).
Returns:
    bleu_1, bleu_2, bleu_3, bleu_4, rouge_l, cider: floats.
    meteor: float, or None when METEOR was skipped or cannot run; then `meteor_unavailable`
        (a string) says why.
Examples:
    >>> metric = evaluate.load("metrics/caption_metrics")
    >>> result = metric.compute(predictions=["a dog runs ."], references=[["A dog runs.", "a dog"]], meteor=False)
    >>> round(result["bleu_1"], 3), result["meteor"]
    (1.0, None)
"""

# --- tokenization --------------------------------------------------------------------

# Tokens that coco-caption deletes after PTB tokenization. Its list also holds "-LRB-" and
# friends, but the tokenizer runs with -lowerCase, so brackets come out as "-lrb-", never
# match, and stay in the caption; the Python tokenizer reproduces that.
_DROPPED_TOKENS = frozenset(["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# The Java tokenizer maps typographic marks to ASCII before splitting.
_UNICODE_TO_ASCII = str.maketrans(
    {
        "\u201c": '"',
        "\u201d": '"',
        "\u2018": "'",
        "\u2019": "'",
        "\u2026": "...",
        "\u2014": "--",
        "\u2013": "-",
    }
)
_BRACKETS = str.maketrans(
    {"(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- ", "[": " -lsb- ", "]": " -rsb- "}
)
# Abbreviations whose final period the PTB tokenizer keeps (besides single letters and u.s.-style).
_ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof", "inc", "ltd", "co"]
)

# (pattern, replacement) applied in order; every replacement only inserts spaces or deletes
# marks that coco-caption would delete anyway.
_SPLIT_RULES = [
    # an ellipsis leaves one period on the word before it, dropped below unless that is an
    # abbreviation: "wait..." -> "wait", but "u.s...." -> "u.s."
    (re.compile(r"\.{2,}"), ". "),
    (re.compile(r'["`]'), " "),  # double quotes and backticks become `` and '', then dropped
    (re.compile(r"(?<!\d),|,(?!\d)|;|:(?!\d)|(?<!\d):"), " "),  # but "1,000" and "9:30" stay whole
    (re.compile(r"[!?]+"), r" \g<0> "),  # split off; a lone "!" is dropped, "!!!" survives as PTB keeps it
    (re.compile(r"[$%]"), r" \g<0> "),  # "$1,000" -> "$ 1,000", "50%" -> "50 %"
    (re.compile(r"-{2,}|(?<!\S)-+|-+(?!\S)"), " "),  # dashes and edge hyphens; "black-and-white" stays
]
_FINAL_PERIOD = re.compile(r"(\S+?)\.('*)(?!\S)")  # also "end.'" before a closing quote
# The Java tokenizer keeps the period of a single letter ("a.") unless a sentence-start word
# follows (these, found by probing it) or the caption ends: then the next caption's first
# word decides, and human captions mostly start with one of these words.
_SENTENCE_STARTS = (
    "A|An|The|This|That|These|He|She|It|We|You|They|Her|Our|Their|There|Here|In|At|But|So|If|When|What|"
    "As|Some|Many|Then|After|While|One"
)
_SENTENCE_END_AFTER_LETTER = re.compile(rf"(?<![\w.'])([A-Za-z])\.(?=\s+(?:{_SENTENCE_STARTS})\b|\s*$)")
_FINAL_SLASH = re.compile(r"/(?='*(?!\S))")  # "w/" -> "w /", but "and/or" stays
# quote marks and the plural possessive "dogs'", but not the "'s" of pre-tokenized "dog 's"
_EDGE_QUOTES = re.compile(r"(?<!\S)'+(?!(?:s|re|ve|d|ll|m)(?!\S))|'+(?!\S)")
_CONTRACTION = re.compile(r"(\w)(n't|'s|'re|'ve|'d|'ll|'m)(?!\w)")  # "isn't" -> "is n't", "dog's" -> "dog 's"


def _split_final_period(match: re.Match) -> str:
    """Keep the period of abbreviations ("u.s.", "p.m.", "a.", "mr."), split it off otherwise."""
    word = match.group(1)
    if re.fullmatch(r"[a-z](\.[a-z])*", word) or word in _ABBREVIATIONS:
        return match.group(0)
    return f"{word} . {match.group(2)}"


def ptb_like_tokenize(text: str) -> list[str]:
    """Approximate coco-caption's tokenization (Java PTBTokenizer -lowerCase, then punctuation removal).

    Agrees with the Java tokenizer on ordinary caption text (sentence punctuation, quotes,
    contractions, possessives, hyphenated words, numbers, brackets). Known differences, all
    rare in captions: URLs and e-mail addresses, emoticons, "#", "*", "+", "=", "_",
    "rock'n'roll", "'90s", "5'10", "y'all" and "'tis", currency other than "$", "no." before
    a number, "3:00pm", "!" or "?" inside a word, and a single letter with a period ending
    the caption ("in a."), which Java keeps or splits depending on the next caption.

    >>> ptb_like_tokenize("The dog's ball isn't red; it's (mostly) blue...")
    ['the', 'dog', "'s", 'ball', 'is', "n't", 'red', 'it', "'s", '-lrb-', 'mostly', '-rrb-', 'blue']
    """
    text = _SENTENCE_END_AFTER_LETTER.sub(r"\1 .", text)  # needs the original case
    text = text.lower().translate(_UNICODE_TO_ASCII)
    for pattern, replacement in _SPLIT_RULES:
        text = pattern.sub(replacement, text)
    text = text.translate(_BRACKETS)  # after the hyphen rule, which would eat "-lrb-"'s hyphens
    text = _FINAL_PERIOD.sub(_split_final_period, text)
    text = _FINAL_SLASH.sub(" / ", text)
    text = _EDGE_QUOTES.sub(" ", text)
    text = _CONTRACTION.sub(r"\1 \2", text)
    return [token for token in text.split() if token not in _DROPPED_TOKENS]


def _java_ptb_tokenize(captions: list[str]) -> list[list[str]]:
    """Tokenize with pycocoevalcap's PTBTokenizer (one Java run for all captions)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Java reads one caption per line and also breaks lines at "\r" or U+2028, which would
    # shift every later caption: collapse all whitespace to single spaces first.
    lines = {i: [{"caption": " ".join(caption.split())}] for i, caption in enumerate(captions)}
    tokenized = PTBTokenizer().tokenize(lines)
    return [tokenized[i][0].split() for i in range(len(captions))]


def tokenize_captions(
    predictions: list[str], references: list[list[str]], tokenize: str = "python"
) -> tuple[list[list[str]], list[list[list[str]]]]:
    """Split predictions and references into tokens with the chosen tokenizer ("python", "ptb" or "none")."""
    captions = list(predictions) + [ref for refs in references for ref in refs]
    if tokenize == "python":
        flat = [ptb_like_tokenize(caption) for caption in captions]
    elif tokenize == "none":
        flat = [caption.split() for caption in captions]
    elif tokenize == "ptb":
        reason = _java_scorer_unavailable_reason()
        if reason:
            raise ValueError(f"tokenize='ptb' needs pycocoevalcap and Java: {reason}; use tokenize='python'")
        flat = _java_ptb_tokenize(captions)
    else:
        raise ValueError(f"tokenize={tokenize!r} is not one of 'python', 'ptb', 'none'")
    hypotheses, rest = flat[: len(predictions)], iter(flat[len(predictions) :])
    return hypotheses, [[next(rest) for _ in refs] for refs in references]


# --- n-grams and BLEU ------------------------------------------------------------------


def ngram_counts(tokens: list[str], max_n: int = 4) -> Counter:
    """Count every n-gram of order 1..max_n, keyed by token tuple."""
    counts = Counter()
    for n in range(1, max_n + 1):
        counts.update(zip(*(tokens[i:] for i in range(n)), strict=False))
    return counts


# coco-caption's guards against 0/0: a zero n-gram count gives ~1e-15/1e-9, not NaN.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9


def _bleu_image_stats(hypothesis: list[str], references: list[list[str]], max_n: int) -> np.ndarray:
    """[hyp length, closest ref length, clipped matches per order..., hyp n-grams per order...]."""
    hyp_len = len(hypothesis)
    # closest reference length; a tie goes to the shorter reference, as in coco-caption
    ref_len = min((abs(len(ref) - hyp_len), len(ref)) for ref in references)[1]
    best_ref_counts = functools.reduce(operator.or_, (ngram_counts(ref, max_n) for ref in references))
    matches = np.zeros(max_n)
    for ngram, count in (ngram_counts(hypothesis, max_n) & best_ref_counts).items():
        matches[len(ngram) - 1] += count
    totals = [max(0, hyp_len - n + 1) for n in range(1, max_n + 1)]
    return np.concatenate([[hyp_len, ref_len], matches, totals])


def corpus_bleu(
    hypotheses: list[list[str]], references: list[list[list[str]]], max_n: int = 4
) -> list[float]:
    """Corpus BLEU-1..max_n of tokenized captions, as coco-caption's Bleu computes it.

    >>> [round(b, 3) for b in corpus_bleu([["a", "dog", "runs"]], [[["a", "dog", "runs", "fast"]]], max_n=2)]
    [0.717, 0.717]
    """
    stats = np.sum(
        [_bleu_image_stats(h, refs, max_n) for h, refs in zip(hypotheses, references, strict=True)], axis=0
    )
    hyp_len, ref_len, matches, totals = stats[0], stats[1], stats[2 : 2 + max_n], stats[2 + max_n :]
    precisions = (matches + _BLEU_TINY) / (totals + _BLEU_SMALL)
    bleus = np.cumprod(precisions) ** (1.0 / np.arange(1, max_n + 1))  # geometric mean of orders 1..n
    ratio = (hyp_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    brevity_penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [float(b * brevity_penalty) for b in bleus]


# --- ROUGE-L ---------------------------------------------------------------------------

_ROUGE_BETA = 1.2  # weights recall 1.2x precision, coco-caption's choice


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro).

    Bit i of `row` is 1 while position i of `a` is not yet used by the LCS; each token of
    `b` updates all positions at once with one add, so the cost is len(b) big-int ops.
    """
    positions = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    all_ones = (1 << len(a)) - 1
    row = all_ones
    for token in b:
        matched = row & positions.get(token, 0)
        row = ((row + matched) | (row - matched)) & all_ones
    return len(a) - row.bit_count()


def _rouge_l_image(hypothesis: list[str], references: list[list[str]]) -> float:
    """LCS F-measure from the best precision and the best recall over the references."""
    lcs = np.array([lcs_length(ref, hypothesis) for ref in references], dtype=float)
    ref_lens = np.array([len(ref) for ref in references], dtype=float)
    precision = lcs.max() / len(hypothesis) if hypothesis else 0.0
    recall = np.max(np.divide(lcs, ref_lens, out=np.zeros_like(lcs), where=ref_lens > 0))
    if precision == 0 or recall == 0:
        return 0.0
    beta2 = _ROUGE_BETA**2
    return float((1 + beta2) * precision * recall / (recall + beta2 * precision))


def rouge_l(hypotheses: list[list[str]], references: list[list[list[str]]]) -> float:
    """ROUGE-L of tokenized captions averaged over images, as coco-caption's Rouge computes it.

    >>> round(rouge_l([["a", "dog", "runs"]], [[["a", "brown", "dog", "runs"]]]), 4)
    0.8356
    """
    return float(np.mean([_rouge_l_image(h, refs) for h, refs in zip(hypotheses, references, strict=True)]))


# --- CIDEr-D ---------------------------------------------------------------------------

_CIDER_N = 4
_CIDER_SIGMA = 6.0


def _document_frequency(reference_counts: list[list[Counter]]) -> Counter:
    """In how many images' reference sets each n-gram occurs."""
    frequency = Counter()
    for counts_per_ref in reference_counts:
        frequency.update(set().union(*counts_per_ref))
    return frequency


def _tfidf(counts: Counter, log_num_images: float, frequency: Counter) -> tuple[dict, np.ndarray]:
    """tf-idf weight of each n-gram and the vector norm per n-gram order (shape (N,))."""
    # an n-gram no reference contains gets document frequency 1, as in coco-caption
    weights = {g: tf * (log_num_images - math.log(max(1, frequency[g]))) for g, tf in counts.items()}
    squares = np.zeros(_CIDER_N)
    for ngram, weight in weights.items():
        squares[len(ngram) - 1] += weight * weight
    return weights, np.sqrt(squares)


def _cider_similarity(hyp: tuple, ref: tuple) -> np.ndarray:
    """Per-order clipped cosine similarity of two (weights, norms, length) triples, length-penalised."""
    (hyp_weights, hyp_norms, hyp_len), (ref_weights, ref_norms, ref_len) = hyp, ref
    dots = np.zeros(_CIDER_N)
    for ngram, weight in hyp_weights.items():
        ref_weight = ref_weights.get(ngram, 0.0)
        # CIDEr-D clips the hypothesis weight at the reference's so repeating words cannot help
        dots[len(ngram) - 1] += min(weight, ref_weight) * ref_weight
    norms = hyp_norms * ref_norms
    cosines = np.divide(dots, norms, out=dots.copy(), where=norms != 0)
    return cosines * math.exp(-((hyp_len - ref_len) ** 2) / (2 * _CIDER_SIGMA**2))


def _cider_length(tokens: list[str]) -> int:
    """coco-caption's CIDEr "length" counts bigrams, i.e. tokens - 1; kept for parity."""
    return max(len(tokens) - 1, 0)


def cider_d(hypotheses: list[list[str]], references: list[list[list[str]]]) -> float:
    """CIDEr-D of tokenized captions, as coco-caption's Cider computes it (n=4, sigma=6, x10).

    Document frequencies come from the references passed in, so the score of one image
    depends on the whole corpus, and a corpus of one image scores 0.
    """
    ref_counts = [[ngram_counts(ref, _CIDER_N) for ref in refs] for refs in references]
    frequency = _document_frequency(ref_counts)
    log_num_images = math.log(len(references))

    def vector(counts: Counter, tokens: list[str]) -> tuple:
        return (*_tfidf(counts, log_num_images, frequency), _cider_length(tokens))

    scores = []
    for hyp, refs, counts_per_ref in zip(hypotheses, references, ref_counts, strict=True):
        hyp_vector = vector(ngram_counts(hyp, _CIDER_N), hyp)
        similarity = sum(
            _cider_similarity(hyp_vector, vector(c, r)) for c, r in zip(counts_per_ref, refs, strict=True)
        )
        scores.append(10.0 * np.mean(similarity) / len(refs))
    return float(np.mean(scores))


# --- METEOR (Java, through pycocoevalcap) ----------------------------------------------


def _java_scorer_unavailable_reason() -> str | None:
    """Why pycocoevalcap's Java scorers cannot run here, or None when they can."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        return "pycocoevalcap is not installed (pip install pycocoevalcap)"
    if shutil.which("java") is None:
        return "java not found on PATH (install a Java runtime, e.g. openjdk-17-jre-headless)"
    return None


def meteor_score(hypotheses: list[list[str]], references: list[list[list[str]]]) -> float:
    """Corpus METEOR 1.5 of tokenized captions from pycocoevalcap's Java scorer."""
    from pycocoevalcap.meteor.meteor import Meteor

    # "|||" separates fields in the scorer's stdin protocol, so it must not occur in text
    def join(tokens):
        return " ".join(" ".join(tokens).replace("|||", " ").split())

    gts = {i: [join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [join(h)] for i, h in enumerate(hypotheses)}
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(gts, res)
    finally:
        del scorer  # its __del__ stops the Java process
    return float(score)


# --- the whole report ------------------------------------------------------------------


def _check_inputs(predictions, references) -> None:
    if len(predictions) == 0:
        raise ValueError("predictions is empty: give one caption per image")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions has {len(predictions)} captions but references has {len(references)} lists: "
            "give one list of reference captions per prediction"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise ValueError(f"references[{i}] is a string: give a list of reference captions per image")
        if len(refs) == 0:
            raise ValueError(f"references[{i}] is empty: every image needs at least one reference caption")


def compute_caption_metrics(
    predictions: list[str], references: list[list[str]], tokenize: str = "python", meteor: bool = True
) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr-D and (optionally) METEOR of a corpus, coco-caption style.

    >>> result = compute_caption_metrics(["a dog runs ."], [["A dog runs.", "a dog"]], meteor=False)
    >>> round(result["bleu_1"], 6), result["meteor"], result["meteor_unavailable"]
    (1.0, None, 'skipped (meteor=False)')
    """
    _check_inputs(predictions, references)
    hypotheses, refs = tokenize_captions(predictions, references, tokenize)
    result = {f"bleu_{n}": b for n, b in enumerate(corpus_bleu(hypotheses, refs), start=1)}
    result["rouge_l"] = rouge_l(hypotheses, refs)
    result["cider"] = cider_d(hypotheses, refs)
    reason = _java_scorer_unavailable_reason() if meteor else "skipped (meteor=False)"
    if reason:
        result.update(meteor=None, meteor_unavailable=reason)
    else:
        start = time.perf_counter()
        result["meteor"] = meteor_score(hypotheses, refs)
        logger.info("METEOR took %.1f s", time.perf_counter() - start)
    return result


class CaptionMetrics(evaluate.Metric):
    """`evaluate` wrapper around `compute_caption_metrics`."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=[
                "https://github.com/tylin/coco-caption",
                "https://github.com/salaniz/pycocoevalcap",
            ],
            reference_urls=["https://arxiv.org/abs/1504.00325"],
        )

    def _compute(self, predictions, references, tokenize="python", meteor=True):
        return compute_caption_metrics(predictions, references, tokenize=tokenize, meteor=meteor)


__all__ = [
    "CaptionMetrics",
    "cider_d",
    "compute_caption_metrics",
    "corpus_bleu",
    "lcs_length",
    "meteor_score",
    "ngram_counts",
    "ptb_like_tokenize",
    "rouge_l",
    "tokenize_captions",
]
