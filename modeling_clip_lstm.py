"""ClipLstmForImageCaptioning: a frozen CLIP vision tower, an LSTM decoder, batched beam search.

Read top to bottom: constants, output dataclasses, the decoder, small helpers (weight loading,
input checks, log-prob masks, sampling warpers, candidate selection), the beam-search state and
its steps, the `PreTrainedModel` base, the adapter that runs our decoder under transformers'
`GenerationMixin` (for the generate() options our search does not implement), the captioner, and
the image-to-text pipeline that config.json's `custom_pipelines` names.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    GenerationConfig,
    GenerationMixin,
    Pipeline,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

try:  # a checkout or an installed package
    from configuration_clip_lstm import ClipLstmConfig
except ImportError:  # the Hub's dynamic-module cache copies only same-folder relative imports
    from .configuration_clip_lstm import ClipLstmConfig

DEFAULT_VISION_MODEL = "openai/clip-vit-base-patch32"
NEG_INF_SCORE = -1.0e9  # "impossible" beam score; finite so that sums and divisions stay ordered

# What generate() understands, with transformers' defaults for fields a GenerationConfig leaves unset.
GENERATION_DEFAULTS = {
    "max_new_tokens": None,
    "max_length": 20,
    "min_new_tokens": 0,
    "num_beams": 1,
    "length_penalty": 1.0,
    "early_stopping": False,
    "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "suppress_tokens": None,
    "return_dict_in_generate": False,
    "output_scores": False,
    "output_attentions": False,
}
# Also handled by our own search, as long as they agree with the model's config (token ids) or keep
# caching on; `transformers_version` is bookkeeping.
_FAST_PATH_FIELDS = {*GENERATION_DEFAULTS, "bos_token_id", "eos_token_id", "pad_token_id", "use_cache"}
_BOOKKEEPING_FIELDS = {"transformers_version", "_from_model_config"}
# generate() arguments that are not GenerationConfig fields and only transformers' search takes.
TRANSFORMERS_ONLY_ARGUMENTS = (
    "streamer",
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
)


@dataclass
class ClipLstmOutput(ModelOutput):
    """Output of [`ClipLstmForImageCaptioning.forward`].

    Args:
        loss: mean cross-entropy over the caption tokens that are targets (EOS included, padding not).
        logits: (B, T, V) next-token logits aligned with `input_ids`: `logits[:, t]` predicts `input_ids[:, t + 1]`.
        image_embeds: (B, D), or (B, P, D) with `image_feature="patches"`, the raw (unnormalised) CLIP
            feature the decoder was conditioned on.
        attentions: (B, T, P) with `output_attentions=True` on a patches model: `attentions[:, t]` are the
            weights over the image's P tokens with which `logits[:, t]` was computed.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    attentions: torch.FloatTensor | None = None


@dataclass
class ClipLstmGenerateOutput(ModelOutput):
    """Output of [`ClipLstmForImageCaptioning.generate`] with `return_dict_in_generate=True`.

    Args:
        sequences: (B * num_return_sequences, L) `[BOS, w1 .. wn, EOS, PAD ...]`.
        sequences_scores: (B * num_return_sequences,) sum of token log-probs / length ** length_penalty,
            length counting generated tokens including EOS; set when `output_scores=True`.
        attentions: (B * num_return_sequences, L, P) with `output_attentions=True` on a patches model:
            `attentions[i, t]` are the weights over the image's P tokens with which `sequences[i, t]` was
            written; zeros for BOS (given, not written) and for the padding after EOS.
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    attentions: torch.FloatTensor | None = None


class ClipLstmAttention(nn.Module):
    """Soft attention of the LSTM's output over one image's tokens: scaled dot product, `attention_heads` heads.

    The query is the LSTM output h_t of the step that writes the next word (as in Lu et al. 2017,
    "Knowing When to Look", rather than Show, Attend and Tell's h_{t-1}), so teacher forcing runs
    the LSTM over the whole caption in one call and attends for every step at once; the context
    and h_t meet in a tanh layer that feeds the output head (Luong et al. 2015). Each head reads its
    own slice of the projected tokens, so the context is still `embed_dim` wide; one soft average
    of the tokens loses where things are relative to each other (which a shape is), several do not.
    """

    def __init__(self, config: ClipLstmConfig):
        super().__init__()
        self.heads = config.attention_heads
        self.query = nn.Linear(config.hidden_size, config.attention_dim, bias=False)
        self.key = nn.Linear(config.embed_dim, config.attention_dim, bias=False)
        layout_width = config.embed_dim if config.layout_dim else 0
        self.output = nn.Linear(config.hidden_size + config.embed_dim + layout_width, config.hidden_size)

    def forward(self, hidden: torch.Tensor, values: torch.Tensor, keys: torch.Tensor, layout=None):
        """hidden (N, T, H), N = B * G rows image-major (G beams or samples per image); values (B, P, E),
        keys (B, P, A) and the layout summary (B, E) or None per image -> attended outputs (N, T, H)
        and weights (N, T, P), the mean over heads."""
        rows, steps, _ = hidden.shape
        batch, tokens, width = keys.shape
        heads, head_width = self.heads, width // self.heads

        def split(x):  # (B, M, heads * w) -> (B, heads, M, w)
            return x.reshape(batch, x.shape[1], heads, -1).transpose(1, 2)

        queries = split(self.query(hidden).reshape(batch, -1, width))  # an image's G*T rows together
        weights = (queries @ split(keys).transpose(2, 3) / math.sqrt(head_width)).softmax(
            -1
        )  # (B, h, G*T, P)
        context = (weights @ split(values)).transpose(1, 2).reshape(rows, steps, -1)  # (N, T, E)
        parts = [hidden, context]
        if layout is not None:  # the same vector for every row and step of an image
            parts.append(
                layout.unsqueeze(1).expand(batch, rows // batch * steps, -1).reshape(rows, steps, -1)
            )
        attended = torch.tanh(self.output(torch.cat(parts, dim=-1)))
        return attended, weights.mean(1).reshape(rows, steps, tokens)


class ClipLstmLayout(nn.Module):
    """Where everything is in the image: (B, P, E) projected tokens -> one (B, E) vector.

    Each token is cut to `layout_dim` numbers and one linear layer reads all of them in token
    order, so every grid cell has its own weights: unlike attention, which averages tokens and
    forgets where each one sat, this keeps the arrangement (an object's outline across patches,
    the positions that captions name). Cutting each token first keeps the layer small at any grid
    size: 50 tokens x 16 x 512 (ViT-B/32) is 0.4M weights, against 13M for the full tokens.
    """

    def __init__(self, config: ClipLstmConfig):
        super().__init__()
        self.reduce = nn.Linear(config.embed_dim, config.layout_dim)
        self.combine = nn.Linear(config.num_image_tokens * config.layout_dim, config.embed_dim)

    def forward(self, projected: torch.Tensor, dropout: nn.Module) -> torch.Tensor:
        # dropout on the cut tokens: layout_dim / embed_dim of the random draws that the full
        # tokens would take (drawing dropout masks is a large part of a CPU training step)
        return self.combine(dropout(self.reduce(projected)).flatten(1))


class ClipLstmDecoder(nn.Module):
    """The LSTM caption decoder: image step, then BOS w1 .. wn, one token per step.

    With `image_feature="patches"` the image step is the projected CLS token (what the pooled
    feature is made from: the whole-image summary that picks the sentence's form, such as a count),
    and each step's output attends over all the tokens ([`ClipLstmAttention`]), beside the layout summary
    ([`ClipLstmLayout`]) when `layout_dim` is set. `memory` below is that per-image (values (B, P, E),
    keys (B, P, A)[, layout (B, E)]) tuple, or None for a pooled feature.
    """

    def __init__(self, config: ClipLstmConfig):
        super().__init__()
        self.normalize_image_embeds = config.normalize_image_embeds
        # Per-dimension statistics of the (normalised) training features, set by `fit_image_statistics`
        # and saved with the weights. CLIP features share a large common direction (a random tower's
        # are ~0.99 cosine-similar); standardising hands the decoder what differs between images.
        self.register_buffer("image_embeds_mean", torch.zeros(config.image_feature_dim))
        self.register_buffer("image_embeds_std", torch.ones(config.image_feature_dim))
        self.image_projection = nn.Linear(config.image_feature_dim, config.embed_dim)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_token_id)
        self.lstm = nn.LSTM(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.attention = ClipLstmAttention(config) if config.image_feature == "patches" else None
        self.layout = ClipLstmLayout(config) if self.attention is not None and config.layout_dim else None
        self.dropout = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    def prepare_image_embeds(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, D) or (B, P, D) raw CLIP feature -> L2-normalised (if configured), then standardised,
        each token on its own."""
        image_embeds = image_embeds.float()
        if self.normalize_image_embeds:
            image_embeds = F.normalize(image_embeds, dim=-1)
        return (image_embeds - self.image_embeds_mean) / self.image_embeds_std

    def encode(self, image_embeds: torch.Tensor):
        """Raw CLIP feature -> (B, 1, E) first LSTM input step, and the memory to attend over (or None)."""
        features = self.prepare_image_embeds(image_embeds)
        projected = self.image_projection(features.to(self.image_projection.weight.dtype))
        if self.attention is None:
            return projected.unsqueeze(1), None
        memory = (projected, self.attention.key(projected))  # (B, P, E), (B, P, A)
        if self.layout is not None:
            memory += (self.layout(projected, self.dropout),)  # (B, E)
        return projected[:, :1], memory  # the CLS token starts the caption, as the pooled feature does

    def attend(self, hidden: torch.Tensor, memory):
        """LSTM outputs (N, T, H) -> what the output head reads (N, T, H), and weights (N, T, P) or None."""
        if memory is None:
            return hidden, None
        return self.attention(hidden, *memory)

    def forward(self, image_embeds: torch.Tensor, input_ids: torch.Tensor):
        """Teacher forcing: image feature, (B, T) ids -> outputs (B, T, H) at the token steps, and the
        attention weights (B, T, P) (None without patches)."""
        first_step, memory = self.encode(image_embeds)
        steps = torch.cat([first_step, self.embed_tokens(input_ids)], dim=1)  # (B, 1+T, E)
        hidden, _ = self.lstm(self.dropout(steps))
        return self.attend(hidden[:, 1:], memory)  # the image step's own output predicts nothing

    def start(self, image_embeds: torch.Tensor):
        """Run the image step alone; returns the LSTM state (h, c), each (num_layers, B, H), and the memory."""
        first_step, memory = self.encode(image_embeds)
        _, state = self.lstm(self.dropout(first_step))
        return state, memory

    def step(self, input_ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], memory=None):
        """One decoding step: (N,) token ids, state, memory of N / G images -> (N, V) logits, the new
        state, and the attention weights (N, P) (None without patches)."""
        hidden, state = self.lstm(self.dropout(self.embed_tokens(input_ids).unsqueeze(1)), state)
        outputs, weights = self.attend(hidden, memory)
        logits = self.lm_head(self.dropout(outputs[:, 0]))
        return logits, state, None if weights is None else weights[:, 0]


def _select_memory(memory, rows: torch.Tensor):
    """The memory of a subset of the images (a bool mask or indices), or None."""
    return None if memory is None else tuple(part[rows] for part in memory)


# ----------------------------------------------------------------------------- input and output helpers


def load_clip_vision_tower(tower_class, name_or_path: str) -> nn.Module:
    """Load CLIP vision weights, turning the offline failure into one line naming the way out.

    Example (downloads from the Hub unless the weights are cached or the path is a local folder):

        tower = load_clip_vision_tower(CLIPVisionModel, "openai/clip-vit-base-patch32")
    """
    try:
        return tower_class.from_pretrained(name_or_path)
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"cannot load CLIP vision weights {name_or_path!r} ({reason}); offline, pass a local folder saved "
            "with save_pretrained, or build a random tower from a CLIPVisionConfig"
        ) from None


def _trim_padding(input_ids, attention_mask, labels):
    """Cut a right-padded batch to its longest caption and make padding no target."""
    if attention_mask is None:
        return input_ids, attention_mask, labels
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}"
        )
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError(
            "attention_mask must be right-padded (1 ... 1 0 ... 0): the LSTM reads left to right"
        )
    longest = int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
    if labels is not None:
        labels = labels[:, :longest].masked_fill(attention_mask == 0, -100)
    return input_ids, attention_mask, labels


def _validate_generation(gen: GenerationConfig, vocab_size: int) -> None:
    """One-line ValueErrors naming the bad generation argument."""

    def at_least(value, low: int) -> bool:
        return isinstance(value, int) and value >= low

    checks = [
        (at_least(gen.max_new_tokens, 1), "max_new_tokens", "an integer >= 1"),
        (at_least(gen.min_new_tokens, 0), "min_new_tokens", "an integer >= 0"),
        (at_least(gen.num_beams, 1), "num_beams", "an integer >= 1"),
        (gen.early_stopping in (True, False, "never"), "early_stopping", "True, False or 'never'"),
        (at_least(gen.no_repeat_ngram_size, 0), "no_repeat_ngram_size", ">= 0"),
        (at_least(gen.num_return_sequences, 1), "num_return_sequences", ">= 1"),
        (gen.temperature > 0, "temperature", "> 0"),
        (at_least(gen.top_k, 0), "top_k", "an integer >= 0"),
        (0 < gen.top_p <= 1, "top_p", "in (0, 1]"),
        (math.isfinite(gen.length_penalty), "length_penalty", "a finite number"),
    ]
    for ok, name, rule in checks:
        if not ok:
            raise ValueError(f"generate(): {name} must be {rule}, got {getattr(gen, name)!r}")
    for token in gen.suppress_tokens or []:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            raise ValueError(
                f"generate(): suppress_tokens holds {token!r}, not a token id in [0, vocab_size={vocab_size})"
            )
    if gen.num_beams > 1 and gen.num_return_sequences > gen.num_beams:
        raise ValueError(
            f"generate(): num_return_sequences ({gen.num_return_sequences}) must be <= num_beams ({gen.num_beams})"
        )
    if gen.num_beams == 1 and not gen.do_sample and gen.num_return_sequences > 1:
        raise ValueError("generate(): greedy search returns one sequence; use num_beams or do_sample=True")


def _check_positional_arguments(pixel_values, generation_config) -> None:
    """`generate(pixel_values, generation_config)`, as with other transformers models; say so otherwise."""
    if isinstance(pixel_values, GenerationConfig):
        raise ValueError(
            "generate(): the first positional argument is pixel_values; pass the GenerationConfig second "
            "or as generation_config="
        )
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise ValueError(
            "generate(): the second positional argument is generation_config (a GenerationConfig), got "
            f"{type(generation_config).__name__}; pass cached CLIP features as image_embeds="
        )


def _check_finite(image_embeds: torch.Tensor, name: str) -> None:
    """A NaN or inf feature would give a silent `[BOS, EOS]` caption scored NaN: refuse it, naming the rows."""
    finite = torch.isfinite(image_embeds.flatten(1)).all(dim=-1)
    if not bool(finite.all()):
        rows = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"generate(): {name} hold NaN or inf values (batch rows {rows[:10]})")


def _empty_generation(gen: GenerationConfig, config: ClipLstmConfig, device):
    """What generate() returns for a batch of no images: no rows, BOS alone as the length."""
    sequences = torch.full((0, 1), config.bos_token_id, dtype=torch.long, device=device)
    if not gen.return_dict_in_generate:
        return sequences
    scores = torch.zeros(0, device=device) if gen.output_scores else None
    attentions = torch.zeros(0, 1, config.num_image_tokens, device=device) if gen.output_attentions else None
    return ClipLstmGenerateOutput(sequences=sequences, sequences_scores=scores, attentions=attentions)


def _caption_columns(sequences: torch.Tensor, pad_token_id: int) -> int:
    """How many columns hold tokens: those after the longest caption are all PAD (never generated)."""
    is_token = (sequences != pad_token_id).int()
    last_token = sequences.shape[1] - 1 - is_token.flip(1).argmax(1)  # (N,) index of each row's last token
    return int(last_token.max()) + 1


# ----------------------------------------------------------------------------- decoding helpers


def _ban_repeated_ngrams(log_probs: torch.Tensor, sequences: torch.Tensor, ngram_size: int) -> None:
    """Set to -inf every token that would repeat an n-gram of `sequences` (N, L), in place.

    The last n-1 tokens are compared with every earlier window; a match bans the token that
    followed that window (transformers' `no_repeat_ngram_size`, prompt included).
    """
    length = sequences.shape[1]
    if ngram_size <= 0 or length < ngram_size:  # no complete earlier n-gram yet
        return
    if ngram_size == 1:
        log_probs.scatter_(1, sequences, float("-inf"))
        return
    windows = sequences.unfold(1, ngram_size, 1)  # (N, W, n)
    prefix = sequences[:, length - ngram_size + 1 :]  # (N, n-1)
    matches = (windows[:, :, :-1] == prefix[:, None, :]).all(-1)  # (N, W)
    hits = torch.zeros_like(log_probs).scatter_add_(1, windows[:, :, -1], matches.to(log_probs.dtype))
    log_probs.masked_fill_(hits > 0, float("-inf"))


def _warp_for_sampling(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of (N, V) scores, for sampling."""
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token once the more likely ones already cover top_p (the best token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return scores


def _best_candidates(logits, normaliser, running_scores, num_candidates: int):
    """The best `num_candidates` continuations of each image over all its beams.

    `logits` (B*K, V) are masked logits and `normaliser` (B*K, 1) their log-sum-exp, so a token's
    accumulated score is logit - normaliser + running score. That offset is the same for every
    token of a beam, so an image's best candidates are among the best `num_candidates` of each of
    its beams: no (B, K*V) score tensor is ever written (1 GB for 1,000 images, beam 5, CLIP's vocabulary).

    Returns scores (B, 2K) in descending order, parent beam (B, 2K) and token id (B, 2K).
    """
    batch, num_beams = running_scores.shape
    row_best, row_tokens = torch.topk(logits, min(num_candidates, logits.shape[1]), dim=-1)  # (B*K, C)
    row_best = row_best - normaliser + running_scores.reshape(-1, 1)
    per_row = row_best.shape[1]
    scores, picked = torch.topk(row_best.view(batch, num_beams * per_row), num_candidates, dim=-1)
    return scores, picked // per_row, row_tokens.view(batch, -1).gather(1, picked)


def _sampled_candidates(totals: torch.Tensor, num_candidates: int, vocab_size: int):
    """Beam sampling: draw candidates from (B, K*V) accumulated scores; same returns as `_best_candidates`."""
    picked = torch.multinomial(totals.softmax(-1), num_samples=num_candidates)
    scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
    picked = picked.gather(1, order)
    return scores, picked // vocab_size, picked % vocab_size


@contextlib.contextmanager
def _lstm_kernels_for(rows: int, device: torch.device):
    """On CPU, torch's native LSTM step for small batches: oneDNN's takes 2.4 ms for one row where
    the native kernel takes 0.27 ms, and only catches up around 1,000 rows (measured, 512 wide)."""
    if device.type != "cpu" or rows >= 1024 or not torch.backends.mkldnn.is_available():
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the flags() call warns about TF32 on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def _log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) -> (N, 1) log-sum-exp. On CPU torch.logsumexp writes a fresh (N, V) temporary (1 GB
    for 5,000 beams over CLIP's vocabulary, with a page fault per 4 kB); here the exponentials are
    summed chunk by chunk, each chunk small enough to be reused from the heap."""
    peak = logits.amax(dim=-1, keepdim=True)
    if logits.is_cuda:
        return peak + (logits - peak).exp().sum(dim=-1, keepdim=True).log()
    rows_per_chunk = max(1, (4 << 20) // logits.shape[1])  # ~16 MB of float32 per chunk
    chunks = zip(logits.split(rows_per_chunk), peak.split(rows_per_chunk), strict=True)
    sums = torch.cat([(chunk - chunk_peak).exp_().sum(dim=-1, keepdim=True) for chunk, chunk_peak in chunks])
    return peak + sums.log()


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather along dim 1 of (B, K, ...) with a (B, J) index -> (B, J, ...)."""
    index = index.reshape(index.shape + (1,) * (tensor.dim() - index.dim()))
    return torch.take_along_dim(tensor, index, dim=1)


# ----------------------------------------------------------------------------- beam-search state


@dataclass
class _BeamState:
    """Per-image beam-search bookkeeping, all tensors on the model's device.

    running_*: the K live hypotheses; pool_*: the K best finished ones (sorted, best first);
    open_: (B, 1) whether a live beam may still beat the pool (transformers' early-stop heuristic);
    *_attentions: (B, K, L, P) each token's attention weights, kept only when they are asked for.
    """

    running_sequences: torch.Tensor  # (B, K, L)
    running_scores: torch.Tensor  # (B, K) summed log-probs
    pool_sequences: torch.Tensor  # (B, K, L)
    pool_scores: torch.Tensor  # (B, K) length-penalised
    pool_filled: torch.Tensor  # (B, K) bool
    open_: torch.Tensor  # (B, 1) bool
    running_attentions: torch.Tensor | None = None  # (B, K, L, P)
    pool_attentions: torch.Tensor | None = None  # (B, K, L, P)

    @classmethod
    def start(
        cls, batch_size: int, num_beams: int, max_length: int, bos: int, pad: int, device, num_tokens=None
    ) -> _BeamState:
        """K beams per image holding BOS alone, an empty pool, every image open; with `num_tokens`
        (P), room for the attention weights of every token."""
        sequences = torch.full((batch_size, num_beams, max_length), pad, dtype=torch.long, device=device)
        sequences[:, :, 0] = bos
        running_scores = torch.zeros(batch_size, num_beams, device=device)
        running_scores[:, 1:] = NEG_INF_SCORE  # only beam 0 expands at first, so beams start distinct
        attentions = None
        if num_tokens is not None:
            attentions = torch.zeros(batch_size, num_beams, max_length, num_tokens, device=device)
        return cls(
            running_sequences=sequences,
            running_scores=running_scores,
            pool_sequences=sequences.clone(),
            pool_scores=torch.full((batch_size, num_beams), NEG_INF_SCORE, device=device),
            pool_filled=torch.zeros(batch_size, num_beams, dtype=torch.bool, device=device),
            open_=torch.ones(batch_size, 1, dtype=torch.bool, device=device),
            running_attentions=attentions,
            pool_attentions=None if attentions is None else attentions.clone(),
        )

    def select(self, rows: torch.Tensor) -> _BeamState:
        """The same bookkeeping for a subset of the images (a bool mask or indices over B)."""
        values = (getattr(self, field.name) for field in dataclasses.fields(self))
        return _BeamState(*(None if value is None else value[rows] for value in values))

    def advance_running(self, scores, sequences, parents, ends, attentions=None) -> torch.Tensor:
        """Keep the K best candidates that did not end; returns their parent beam (B, K)."""
        num_beams = self.running_scores.shape[1]
        alive_scores = scores + ends.to(scores.dtype) * NEG_INF_SCORE
        keep = torch.topk(alive_scores, num_beams, dim=-1).indices
        self.running_sequences = _take(sequences, keep)
        self.running_scores = _take(alive_scores, keep)
        if attentions is not None:
            self.running_attentions = _take(attentions, keep)
        return _take(parents, keep)

    def update_pool(self, scores, sequences, ends, num_generated: int, gen, attentions=None) -> None:
        """Merge the candidates that just ended into the pool of K finished hypotheses.

        Only candidates ranked in the first K of the 2K may finish; none are added once the pool is
        full with `early_stopping=True`, or once the heuristic says no live beam can improve it.
        """
        num_beams = self.pool_scores.shape[1]
        in_top_k = torch.arange(scores.shape[1], device=scores.device) < num_beams
        finishing = ends & in_top_k
        penalised = scores / (num_generated**gen.length_penalty)
        pool_full = self.pool_filled.all(-1, keepdim=True) & (gen.early_stopping is True)
        # Penalties add up (as in transformers): scores and float32 ties match its beam search exactly.
        penalised = penalised + pool_full.to(penalised.dtype) * NEG_INF_SCORE
        penalised = penalised + (~self.open_).to(penalised.dtype) * NEG_INF_SCORE
        penalised = penalised + (~finishing).to(penalised.dtype) * NEG_INF_SCORE
        merged_scores = torch.cat([self.pool_scores, penalised], dim=1)
        best = torch.topk(merged_scores, num_beams, dim=-1).indices
        self.pool_sequences = _take(torch.cat([self.pool_sequences, sequences], dim=1), best)
        self.pool_scores = _take(merged_scores, best)
        if attentions is not None:
            self.pool_attentions = _take(torch.cat([self.pool_attentions, attentions], dim=1), best)
        self.pool_filled = _take(torch.cat([self.pool_filled, finishing], dim=1), best)

    def update_open(self, length: int, max_length: int, gen) -> None:
        """transformers' early-stop heuristic: can the best live beam still beat the worst finished one?"""
        if gen.early_stopping == "never" and gen.length_penalty > 0.0:
            best_length = max_length - 1  # a positive length penalty favours the longest possible hypothesis
        else:
            best_length = length - 1
        best_running = self.running_scores[:, :1] / (best_length**gen.length_penalty)
        worst_pool = self.pool_scores.min(dim=1, keepdim=True).values
        worst_pool = torch.where(self.pool_filled, worst_pool, torch.full_like(worst_pool, NEG_INF_SCORE))
        self.open_ = self.open_ & (best_running > worst_pool).any(-1, keepdim=True)

    def settled(self, gen) -> torch.Tensor:
        """(B,) bool: images whose pool can no longer change (the heuristic closed it, or it is full
        with early_stopping=True); both are permanent, so such images can leave the batch."""
        return ~self.open_[:, 0] | (self.pool_filled.all(-1) & (gen.early_stopping is True))


# ----------------------------------------------------------------------------- the model


class ClipLstmPreTrainedModel(PreTrainedModel):
    config_class = ClipLstmConfig
    base_model_prefix = "clip_lstm"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["ClipLstmDecoder", "CLIPEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, ClipLstmDecoder):
            init.zeros_(module.image_embeds_mean)  # identity until fit_image_statistics
            init.ones_(module.image_embeds_std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LSTM):
            bound = module.hidden_size**-0.5
            for name, param in module.named_parameters():
                init.uniform_(param, -bound, bound)
                if name.startswith("bias_ih"):
                    # forget-gate bias 1 (gates are ordered i, f, g, o): remember by default early in training
                    init.constant_(param[module.hidden_size : 2 * module.hidden_size], 1.0)


# ----------------------------------------------------------------------------- transformers' search


class _LstmStateCache:
    """The LSTM state, carried through transformers' `generate()` as its `cache`.

    Beam search reorders the cache after every step (`reorder_cache`); a recurrent state kept
    anywhere else would silently stay with the wrong beams.
    """

    is_linear = (True,)  # a fixed-size state: nothing for transformers to slice by past length
    is_compileable = False
    is_croppable = False

    def __init__(self):
        self.state: tuple[torch.Tensor, torch.Tensor] | None = None  # (h, c), each (num_layers, N, H)
        self.memory = None  # what a patches decoder attends over: the same for every beam of an image
        self.seen = 0  # tokens already folded into the state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = tuple(s.index_select(1, beam_idx.to(s.device)) for s in self.state)


def _as_layers(weights: torch.Tensor | None):
    """(N, T, P) weights as transformers' per-layer attentions: a 1-tuple of (N, heads=1, T, P)."""
    return None if weights is None else (weights[:, None],)


class _TransformersSearch(ClipLstmPreTrainedModel, GenerationMixin):
    """Our decoder under transformers' `GenerationMixin`, for the options our search does not implement
    (streamers, repetition_penalty, logits processors, per-step scores, ...). Shares the captioner's weights."""

    main_input_name = "input_ids"  # the BOS prompt; the image comes in as image_embeds

    def __init__(self, captioner: ClipLstmForImageCaptioning):
        super().__init__(captioner.config)
        self.captioner = captioner

    def forward(self, input_ids, image_embeds, cache: _LstmStateCache | None = None, **kwargs):
        """(N, T) ids -> (N, T', V) logits: the new tokens with a cache, the whole prefix without one."""
        decoder = self.captioner.decoder
        if cache is None:  # use_cache=False: re-run the LSTM over the image and the whole prefix
            outputs, weights = decoder(image_embeds, input_ids)
            return CausalLMOutputWithPast(logits=decoder.lm_head(outputs), attentions=_as_layers(weights))
        if cache.state is None:
            cache.state, cache.memory = decoder.start(image_embeds)
        logits, weights = [], []
        for token in input_ids[:, cache.seen :].unbind(1):
            step_logits, cache.state, step_weights = decoder.step(token, cache.state, cache.memory)
            logits.append(step_logits)
            weights.append(step_weights)
        cache.seen = input_ids.shape[1]
        weights = None if weights[0] is None else torch.stack(weights, dim=1)
        return CausalLMOutputWithPast(
            logits=torch.stack(logits, dim=1), cache=cache, attentions=_as_layers(weights)
        )

    def prepare_inputs_for_generation(self, input_ids, cache=None, image_embeds=None, **kwargs):
        return {"input_ids": input_ids, "image_embeds": image_embeds, "cache": cache}


class ClipLstmForImageCaptioning(ClipLstmPreTrainedModel):
    """CLIP vision tower (frozen) -> projection -> first LSTM step; LSTM -> caption tokens.

    Example (a trained model and its processor, saved in one folder):

        model = ClipLstmForImageCaptioning.from_pretrained("path/to/model")
        processor = ClipLstmProcessor.from_pretrained("path/to/model")
        inputs = processor(images=[load_image("dog.jpg")], return_tensors="pt")
        processor.batch_decode(model.generate(**inputs, num_beams=5), skip_special_tokens=True)
        # ['a dog runs across the grass']
    """

    def __init__(self, config: ClipLstmConfig, vision_tower: nn.Module | None = None):
        super().__init__(config)
        if vision_tower is None:
            tower_class = (
                CLIPVisionModelWithProjection if config.image_feature == "projected" else CLIPVisionModel
            )
            vision_tower = tower_class(config.vision_config)
        self.vision_tower = vision_tower
        self.vision_tower.requires_grad_(False)
        self.decoder = ClipLstmDecoder(config)
        self.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            max_new_tokens=30,
            num_beams=5,
        )
        self.post_init()

    @classmethod
    def can_generate(cls) -> bool:
        # Our own generate(), not GenerationMixin's; this makes save_pretrained write generation_config.json.
        return True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, plus the saved `generation_config.json` (our generate's defaults)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        hub_names = ("cache_dir", "local_files_only", "token", "revision", "subfolder")
        hub_kwargs = {k: kwargs[k] for k in hub_names if k in kwargs}
        # a folder without generation_config.json keeps the model's defaults
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **hub_kwargs
            )
        return model

    @classmethod
    def from_clip(
        cls,
        vision_model_name_or_path: str = DEFAULT_VISION_MODEL,
        image_feature: str = "pooled",
        **config_kwargs,
    ) -> ClipLstmForImageCaptioning:
        """Build a captioner around pretrained CLIP vision weights (Hub id or local folder), loaded once.

        Example (downloads the CLIP weights from the Hub unless they are cached):

            model = ClipLstmForImageCaptioning.from_clip(
                "openai/clip-vit-base-patch32", vocab_size=8000, pad_token_id=0, bos_token_id=1,
                eos_token_id=2,
            )
        """
        tower_class = CLIPVisionModelWithProjection if image_feature == "projected" else CLIPVisionModel
        tower = load_clip_vision_tower(tower_class, vision_model_name_or_path)
        config = ClipLstmConfig(
            vision_config=tower.config.to_dict(), image_feature=image_feature, **config_kwargs
        )
        return cls(config, vision_tower=tower)

    @torch.no_grad()
    def fit_image_statistics(self, image_embeds: torch.Tensor) -> None:
        """Set the decoder's feature standardisation from (N, D) raw training features.

        Call once before training (train_accelerate.py does); the statistics are buffers saved
        with the weights, so a checkpoint alone reproduces the model. (N, P, D) patch features are
        measured over all their tokens. Rows with NaN/inf (a broken feature) are left out; with a single row there is no spread to measure, so the features are
        only centred (std 1), not divided by a NaN. No finite row at all is a ValueError.

        Example:
            >>> vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # a tiny CLIP tower
            ...               num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
            >>> config = ClipLstmConfig(vision_config=vision, vocab_size=12, pad_token_id=0, bos_token_id=1,
            ...                         eos_token_id=2, embed_dim=16, hidden_size=24)
            >>> model = ClipLstmForImageCaptioning(config).eval()
            >>> train_embeds = torch.randn(64, config.image_feature_dim) + 3.0  # (N, D) raw CLIP features
            >>> model.fit_image_statistics(train_embeds)
            >>> standardised = model.decoder.prepare_image_embeds(train_embeds)
            >>> bool(standardised.mean(dim=0).abs().max() < 1e-4)
            True
        """
        decoder = self.decoder
        decoder.image_embeds_mean.zero_()
        decoder.image_embeds_std.fill_(1.0)
        device = decoder.image_embeds_mean.device

        tokens = image_embeds[0].numel() // image_embeds.shape[-1] if len(image_embeds) else 1

        def finite_rows():  # (n, D) float64 chunks without the rows that hold NaN or inf
            for chunk in image_embeds.split(max(1, 16384 // tokens)):
                features = decoder.prepare_image_embeds(chunk.to(device)).double()
                features = features.reshape(-1, features.shape[-1])  # tokens of (B, P, D) patches as rows
                yield features[features.isfinite().all(dim=1)]

        # Two passes over chunks of rows, summed in float64: `image_embeds` may be a memory-mapped
        # cache of a whole dataset, and the (N, D) temporaries of one pass would grow with it.
        count = total = 0
        for features in finite_rows():
            count, total = count + len(features), total + features.sum(0)
        if count == 0:
            raise ValueError(f"fit_image_statistics: no finite feature row among {len(image_embeds)}")
        mean = total / count
        if count > 1:  # the std of one row is NaN (N - 1 = 0 degrees of freedom): keep 1
            squares = sum((features - mean).square().sum(0) for features in finite_rows())
            decoder.image_embeds_std.copy_((squares / (count - 1)).sqrt().float().clamp_min(1e-6))
        decoder.image_embeds_mean.copy_(mean.float())

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_tower.eval()  # frozen: never in training mode
        return self

    @torch.no_grad()
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> raw CLIP feature, float32: (B, D) pooled CLS or projected, or (B, P, D)
        final tokens with `image_feature="patches"`.

        Runs in bfloat16 autocast on CUDA (the tower is frozen; its features are only an input).
        """
        pixel_values = pixel_values.to(self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=pixel_values.is_cuda):
            outputs = self.vision_tower(pixel_values=pixel_values.to(self.vision_tower.dtype))
        name = {"pooled": "pooler_output", "projected": "image_embeds", "patches": "last_hidden_state"}
        return getattr(outputs, name[self.config.image_feature]).float()

    def _image_features(self, pixel_values, image_embeds) -> torch.Tensor:
        if (pixel_values is None) == (image_embeds is None):
            raise ValueError(
                "pass exactly one of pixel_values (runs CLIP) or image_embeds (cached CLIP features)"
            )
        if image_embeds is None:
            if pixel_values.dim() != 4:
                raise ValueError(
                    f"pixel_values must be (batch, 3, height, width) images, got {tuple(pixel_values.shape)}; "
                    "pass cached CLIP features as image_embeds="
                )
            return self.get_image_features(pixel_values)
        expected = self.config.image_feature_shape
        if tuple(image_embeds.shape[1:]) != expected:
            shape = ", ".join(map(str, ("batch", *expected)))
            raise ValueError(
                f"image_embeds must be ({shape}) for image_feature={self.config.image_feature!r}, "
                f"got {tuple(image_embeds.shape)}"
            )
        return image_embeds.to(self.device)

    def forward(
        self,
        pixel_values: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        return_logits: bool = True,
        output_attentions: bool = False,
    ) -> ClipLstmOutput:
        r"""Teacher-forced captioning loss and next-token logits.

        Args:
            pixel_values: (B, 3, H, W) images; CLIP runs on them. Or give `image_embeds`.
            image_embeds: (B, D), or (B, P, D) with `image_feature="patches"`, raw CLIP features as CLIP
                returns them (e.g. from the embedding cache).
            input_ids: (B, T) `BOS w1 .. wn EOS PAD ...`, right-padded.
            attention_mask: (B, T) 1 for tokens, 0 for padding; the batch is cut to its longest caption.
            labels: (B, T) aligned with `input_ids` (usually a copy with padding set to -100); shifted
                inside the model, so EOS is a target and padding is not.
            return_logits: `False` skips the (B, T, V) logits and scores only target positions (training).
            output_attentions: return the (B, T, P) attention weights of a patches model.

        Example:
            >>> vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # a tiny CLIP tower
            ...               num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
            >>> config = ClipLstmConfig(vision_config=vision, vocab_size=12, pad_token_id=0, bos_token_id=1,
            ...                         eos_token_id=2, embed_dim=16, hidden_size=24)
            >>> model = ClipLstmForImageCaptioning(config).eval()
            >>> input_ids = torch.tensor([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]])  # BOS w1 .. EOS PAD
            >>> attention_mask = (input_ids != 0).long()
            >>> out = model(image_embeds=torch.randn(2, config.image_feature_dim), input_ids=input_ids,
            ...             attention_mask=attention_mask, labels=input_ids)
            >>> out.logits.shape  # cut to the longest caption
            torch.Size([2, 4, 12])
            >>> out.loss.backward()
        """
        if input_ids is None:
            raise ValueError("forward needs input_ids (BOS w1 .. wn EOS); use generate() to write captions")
        image_embeds = self._image_features(pixel_values, image_embeds)
        input_ids, attention_mask, labels = _trim_padding(input_ids, attention_mask, labels)
        hidden, weights = self.decoder(image_embeds, input_ids.to(self.device))  # (B, T, H), (B, T, P)
        logits = self.decoder.lm_head(self.decoder.dropout(hidden)) if return_logits else None
        loss = None
        if labels is not None:
            loss = self._caption_loss(hidden, logits, labels.to(self.device))
        attentions = weights if output_attentions else None
        return ClipLstmOutput(loss=loss, logits=logits, image_embeds=image_embeds, attentions=attentions)

    def _caption_loss(
        self, hidden: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean cross-entropy of position t predicting labels[t + 1], over non-ignored targets."""
        targets = labels[:, 1:]
        is_target = targets != -100
        if logits is None:  # only the positions that have a target go through the (large) output head
            logits_at_targets = self.decoder.lm_head(self.decoder.dropout(hidden[:, :-1][is_target]))
        else:
            logits_at_targets = logits[:, :-1][is_target]
        return F.cross_entropy(logits_at_targets.float(), targets[is_target])

    # ------------------------------------------------------------------------- generation

    def _generation_settings(
        self, generation_config: GenerationConfig | None, kwargs: dict
    ) -> GenerationConfig:
        """The saved GenerationConfig overridden by the fields `generation_config` sets, then by keyword
        arguments (transformers' order); our defaults filled; validated."""
        fields = GenerationConfig().to_dict()
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise ValueError(
                f"generate() does not know {unknown}: neither GenerationConfig fields nor one of "
                f"{list(TRANSFORMERS_ONLY_ARGUMENTS)}"
            )
        gen = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        user_set = {*gen.to_diff_dict(), *kwargs}  # unset fields of a GenerationConfig are None
        gen.update(**self.generation_config.to_dict(), defaults_only=True)
        gen.update(**kwargs)
        for name, default in GENERATION_DEFAULTS.items():
            if getattr(gen, name, None) is None:
                setattr(gen, name, default)
        if "max_length" in user_set and "max_new_tokens" not in user_set:
            gen.max_new_tokens = None
        if gen.max_new_tokens is None:
            gen.max_new_tokens = gen.max_length - 1  # the prompt is BOS alone
        _validate_generation(gen, self.config.vocab_size)
        return gen

    def _transformers_only_settings(self, gen: GenerationConfig) -> list[str]:
        """The settings of `gen` that our search does not implement (transformers' search does)."""
        defaults, known = gen._get_default_generation_params(), GenerationConfig().to_dict()
        names = [  # custom entries of a GenerationConfig are ignored, as transformers ignores them
            name
            for name, value in gen.to_dict().items()
            if name in known
            and name not in _FAST_PATH_FIELDS | _BOOKKEEPING_FIELDS
            and value is not None
            and value != defaults.get(name)
        ]
        config = self.config
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(gen, name)
            if value not in (None, getattr(config, name), [getattr(config, name)]):
                names.append(name)
        return names + (["use_cache"] if gen.use_cache is False else [])

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.FloatTensor | None = None,
        generation_config: GenerationConfig | None = None,
        image_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ):
        r"""Write captions for a batch of images, all images and beams at once on the model's device.

        Called as other transformers models are: `generate(pixel_values, generation_config, **kwargs)`,
        or with `image_embeds=` (cached CLIP features) instead of pixels. Settings come from
        `self.generation_config` (saved as generation_config.json), overridden by the fields that
        `generation_config` sets, then by keyword arguments, as in transformers.

        Our batched search (the fast path) does greedy (`num_beams=1`), beam search (`num_beams>1`,
        transformers' algorithm), sampling (`do_sample=True`, `temperature`, `top_k`, `top_p`) and beam
        sampling, with `max_new_tokens`/`max_length`, `min_new_tokens`, `length_penalty`,
        `early_stopping` (True, False or "never"), `no_repeat_ngram_size`, `num_return_sequences`,
        `suppress_tokens`, `return_dict_in_generate`, `output_scores` and `output_attentions`. It returns
        `sequences` (B * num_return_sequences, L) as `[BOS, w1 .. wn, EOS, PAD ...]`, or a
        [`ClipLstmGenerateOutput`] with `sequences_scores` (sum of log-probs / length ** length_penalty)
        and, for a patches model, `attentions` (B * num_return_sequences, L, P): the weights over the
        image's tokens with which each token was written. PAD and BOS are never generated.

        Any other option (`streamer`, `repetition_penalty`, `min_length`, other `eos_token_id` or
        `pad_token_id`, `use_cache=False`, `logits_processor`, `stopping_criteria`, `output_logits`, ...)
        hands the call to transformers' own `GenerationMixin.generate` on the same weights, which returns
        transformers' output types, with per-step `scores` when `output_scores=True`; on the options both
        support, the two give the same sequences and scores.

        Example:
            >>> vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,  # a tiny CLIP tower
            ...               num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
            >>> config = ClipLstmConfig(vision_config=vision, vocab_size=12, pad_token_id=0, bos_token_id=1,
            ...                         eos_token_id=2, embed_dim=16, hidden_size=24)
            >>> model = ClipLstmForImageCaptioning(config).eval()
            >>> pixel_values = torch.rand(2, 3, 32, 32)  # (B, 3, H, W), as the processor returns them
            >>> ids = model.generate(pixel_values, GenerationConfig(num_beams=3, max_new_tokens=5))
            >>> ids.dtype, ids.shape[0], ids[:, 0].tolist()  # one caption per image, each starting with BOS
            (torch.int64, 2, [1, 1])
            >>> out = model.generate(pixel_values=pixel_values, num_beams=3, num_return_sequences=2,
            ...                      return_dict_in_generate=True, output_scores=True)
            >>> out.sequences_scores.shape
            torch.Size([4])
            >>> out = model.generate(pixel_values, num_beams=1, repetition_penalty=1.5, return_dict_in_generate=True,
            ...                      output_scores=True)  # transformers' search
            >>> len(out.scores) == out.sequences.shape[1] - 1  # greedy: one (B, V) tensor per written column
            True
        """
        _check_positional_arguments(pixel_values, generation_config)
        extras = {name: kwargs.pop(name, None) for name in TRANSFORMERS_ONLY_ARGUMENTS}
        extras = {name: value for name, value in extras.items() if value is not None}
        gen = self._generation_settings(generation_config, kwargs)
        image_embeds = self._image_features(pixel_values, image_embeds)
        _check_finite(image_embeds, "image_embeds" if pixel_values is None else "pixel_values")
        if gen.output_attentions and self.config.image_feature != "patches":
            raise ValueError(
                f"generate(): output_attentions needs a model that attends (image_feature='patches'); this "
                f"one reads one {self.config.image_feature!r} vector per image"
            )
        if len(image_embeds) == 0:
            return _empty_generation(gen, self.config, image_embeds.device)
        if extras or self._transformers_only_settings(gen):
            return self._generate_with_transformers(image_embeds, gen, extras)
        rows = len(image_embeds) * max(gen.num_beams, gen.num_return_sequences)
        with _lstm_kernels_for(rows, image_embeds.device):
            if gen.num_beams > 1:
                sequences, scores, attentions = self._beam_search(image_embeds, gen)
            else:
                sequences, scores, attentions = self._greedy_or_sample(image_embeds, gen)
        columns = _caption_columns(sequences, self.config.pad_token_id)
        sequences = sequences[:, :columns]
        if gen.return_dict_in_generate:
            return ClipLstmGenerateOutput(
                sequences=sequences,
                sequences_scores=scores if gen.output_scores else None,
                attentions=None if attentions is None else attentions[:, :columns],
            )
        return sequences

    def _generate_with_transformers(self, image_embeds: torch.Tensor, gen: GenerationConfig, extras: dict):
        """transformers' `GenerationMixin.generate` on our decoder, prompted with BOS alone."""
        config, gen = self.config, copy.deepcopy(gen)
        # as on our path: PAD and BOS are never generated, and max_new_tokens alone sets the length
        gen.suppress_tokens = sorted({config.pad_token_id, config.bos_token_id, *(gen.suppress_tokens or [])})
        gen.max_length = None
        if gen.min_new_tokens == 0:  # our filled-in default; transformers would let it override min_length
            gen.min_new_tokens = None
        search = _TransformersSearch(self).eval()
        search.generation_config = gen
        prompt = torch.full((len(image_embeds), 1), config.bos_token_id, dtype=torch.long, device=self.device)
        if gen.use_cache is not False:
            extras = {**extras, "cache": _LstmStateCache()}
        return search.generate(prompt, generation_config=gen, image_embeds=image_embeds, **extras)

    def _next_token_scores(self, logits, sequences, num_generated: int, gen):
        """(N, V) logits -> (masked logits, (N, 1) normaliser); log-probs are `masked - normaliser`.

        The normaliser (log-sum-exp) covers every token, and forbidden tokens are set to -inf
        afterwards, so log-probs are not renormalised: transformers' processors likewise act after
        the log-softmax. Keeping the two apart saves writing another (N, V) tensor per step.
        """
        logits = logits.float()
        normaliser = _log_sum_exp(logits)
        config = self.config
        banned = [config.pad_token_id, config.bos_token_id, *(gen.suppress_tokens or [])]
        logits[:, banned] = float("-inf")
        if num_generated < gen.min_new_tokens:
            logits[:, config.eos_token_id] = float("-inf")
        _ban_repeated_ngrams(logits, sequences, gen.no_repeat_ngram_size)
        return logits, normaliser

    def _greedy_or_sample(self, image_embeds: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """One hypothesis per (image, return sequence); a caption leaves the batch when it writes EOS."""
        config = self.config
        copies = gen.num_return_sequences
        batch, device = len(image_embeds) * copies, image_embeds.device
        sequences = torch.full(
            (batch, gen.max_new_tokens + 1), config.pad_token_id, dtype=torch.long, device=device
        )
        sequences[:, 0] = config.bos_token_id
        scores = torch.zeros(batch, device=device)
        attentions = live_attentions = None
        if gen.output_attentions:  # (N, L, P): row t holds the weights that wrote token t
            attentions = torch.zeros(*sequences.shape, config.num_image_tokens, device=device)
            live_attentions = attentions.clone()
        rows = torch.arange(batch, device=device)  # the captions still being written
        live, total = sequences.clone(), scores.clone()
        # the image step runs once per image; each caption gets a copy of its state and memory, since
        # captions of one image leave the batch at different steps
        state, memory = self.decoder.start(image_embeds)
        state = tuple(s.repeat_interleave(copies, dim=1) for s in state)
        memory = None if memory is None else tuple(m.repeat_interleave(copies, dim=0) for m in memory)
        for step in range(gen.max_new_tokens):
            logits, state, weights = self.decoder.step(live[:, step], state, memory)
            masked, normaliser = self._next_token_scores(logits, live[:, : step + 1], step, gen)
            if gen.do_sample:
                warped = _warp_for_sampling(masked - normaliser, gen.temperature, gen.top_k, gen.top_p)
                tokens = torch.multinomial(warped.softmax(-1), 1).squeeze(1)
            else:
                tokens = masked.argmax(-1)
            total += (masked.gather(1, tokens[:, None]) - normaliser).squeeze(1)  # the token's log-prob
            live[:, step + 1] = tokens
            if attentions is not None:
                live_attentions[:, step + 1] = weights
            ended = (tokens == config.eos_token_id) | (step + 1 == gen.max_new_tokens)
            if ended.any():  # one host sync per step, none per image or candidate
                sequences[rows[ended]] = live[ended]
                scores[rows[ended]] = total[ended] / (step + 1) ** gen.length_penalty
                if attentions is not None:
                    attentions[rows[ended]] = live_attentions[ended]
                keep = ~ended
                if not keep.any():
                    break
                rows, live, total = rows[keep], live[keep], total[keep]
                state, memory = tuple(s[:, keep] for s in state), _select_memory(memory, keep)
                if attentions is not None:
                    live_attentions = live_attentions[keep]
        return sequences, scores, attentions

    def _beam_search(self, image_embeds: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' beam search (2K candidates, a pool of K finished), batched over images."""
        config = self.config
        batch, num_beams, vocab = image_embeds.shape[0], gen.num_beams, config.vocab_size
        max_length = gen.max_new_tokens + 1
        num_tokens = config.num_image_tokens if gen.output_attentions else None
        beams = _BeamState.start(
            batch, num_beams, max_length, config.bos_token_id, config.pad_token_id, self.device, num_tokens
        )
        state, memory = self.decoder.start(image_embeds)  # memory: once per image, shared by its beams
        state = tuple(s.repeat_interleave(num_beams, dim=1) for s in state)
        pool_sequences, pool_scores = beams.pool_sequences.clone(), beams.pool_scores.clone()  # results
        pool_attentions = None if num_tokens is None else beams.pool_attentions.clone()
        rows = torch.arange(batch, device=self.device)  # the images still searching
        for length in range(1, max_length):  # `length` tokens so far (BOS included)
            batch = len(rows)
            flat_sequences = beams.running_sequences[:, :, :length].reshape(batch * num_beams, length)
            logits, state, weights = self.decoder.step(flat_sequences[:, -1], state, memory)
            masked, normaliser = self._next_token_scores(logits, flat_sequences, length - 1, gen)
            if gen.do_sample:
                log_probs = _warp_for_sampling(masked - normaliser, gen.temperature, gen.top_k, gen.top_p)
                totals = log_probs.view(batch, num_beams, vocab) + beams.running_scores[:, :, None]
                totals = totals.view(batch, -1)  # (B, K*V)
                scores, parents, tokens = _sampled_candidates(totals, 2 * num_beams, vocab)
            else:
                scores, parents, tokens = _best_candidates(
                    masked, normaliser, beams.running_scores, 2 * num_beams
                )
            candidates = _take(beams.running_sequences, parents)
            candidates[:, :, length] = tokens
            candidate_attentions = None
            if num_tokens is not None:  # each candidate: its parent's weights, then this step's
                candidate_attentions = _take(beams.running_attentions, parents)
                candidate_attentions[:, :, length] = _take(weights.view(batch, num_beams, -1), parents)
            ends = (tokens == config.eos_token_id) | (length + 1 >= max_length)
            kept_parents = beams.advance_running(scores, candidates, parents, ends, candidate_attentions)
            beams.update_pool(scores, candidates, ends, length, gen, candidate_attentions)
            beam_offset = torch.arange(batch, device=self.device)[:, None] * num_beams
            state = tuple(s.index_select(1, (kept_parents + beam_offset).view(-1)) for s in state)
            beams.update_open(length + 1, max_length, gen)
            # Settled images leave the batch: the rest stop paying for them. At the length limit all are.
            settled = beams.settled(gen) | ends.all(-1)
            if settled.any():  # one host sync per step, none per image or candidate
                pool_sequences[rows[settled]] = beams.pool_sequences[settled]
                pool_scores[rows[settled]] = beams.pool_scores[settled]
                if num_tokens is not None:
                    pool_attentions[rows[settled]] = beams.pool_attentions[settled]
                keep = ~settled
                if not keep.any():
                    break
                rows, beams, memory = rows[keep], beams.select(keep), _select_memory(memory, keep)
                state = tuple(s.view(s.shape[0], batch, num_beams, -1)[:, keep].flatten(1, 2) for s in state)
        count = gen.num_return_sequences
        attentions = None if num_tokens is None else pool_attentions[:, :count].flatten(0, 1)
        return pool_sequences[:, :count].flatten(0, 1), pool_scores[:, :count].flatten(), attentions


# ----------------------------------------------------------------------------- pipeline


class ImageCaptioningPipeline(Pipeline):
    """`pipeline("image-to-text", model=<folder or repo>, trust_remote_code=True)`: images -> captions.

    transformers 5.x folds its own `image-to-text` task into `image-text-to-text`, which needs a chat
    processor; config.json's `custom_pipelines` names this class for the task instead. Takes an image
    (path, PIL image, array) or a list of them, and `generate()` keywords; returns
    `[{"generated_text": caption}]` per image, like transformers' captioning pipelines.

        captioner = pipeline("image-to-text", model="outputs/demo/model", trust_remote_code=True)
        captioner("dog.jpg", num_beams=5)
        # [{'generated_text': 'a dog runs across the grass'}]
    """

    _load_processor = True  # ClipLstmProcessor: image processor and tokenizer together
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def _sanitize_parameters(self, **generate_kwargs):
        return {}, generate_kwargs, {}

    def preprocess(self, image):
        return self.processor(images=image, return_tensors="pt")

    def _forward(self, model_inputs, **generate_kwargs):
        return {"sequences": self.model.generate(model_inputs["pixel_values"], **generate_kwargs)}

    def postprocess(self, model_outputs):
        return [{"generated_text": text} for text in self.processor.batch_decode(model_outputs["sequences"])]


# save_pretrained copies this file and configuration_clip_lstm.py and writes auto_map entries,
# so AutoModel.from_pretrained(folder_or_repo, trust_remote_code=True) works without this project.
ClipLstmForImageCaptioning.register_for_auto_class("AutoModel")

__all__ = [
    "ClipLstmForImageCaptioning",
    "ImageCaptioningPipeline",
    "ClipLstmPreTrainedModel",
    "ClipLstmOutput",
    "ClipLstmGenerateOutput",
]
