"""generate(): greedy, beam search and sampling against independent references.

References: a step-by-step argmax of teacher-forced logits, exhaustive search over every
possible caption, teacher-forced scoring, and transformers' own beam search
(GenerationMixin) run on the same weights through a small adapter.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from tiny import BOS, EOS, PAD, image_embeds, peaked_model
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import CausalLMOutput

from configuration_clip_lstm import ClipLstmConfig

FEATURES = ["pooled", "patches"]  # one vector per image, or attention over its tokens


def strip(sequence: torch.Tensor) -> list[int]:
    """Token ids up to and including the first EOS (what a caption is)."""
    ids = sequence.tolist()
    return ids[: ids.index(EOS) + 1] if EOS in ids else [t for t in ids if t != PAD]


@torch.no_grad()
def teacher_forced_log_probs(model, feats: torch.Tensor, sequence: list[int]) -> torch.Tensor:
    """(T-1,) log-probabilities of each generated token, PAD and BOS set to -inf (not renormalised)."""
    logits = model(image_embeds=feats[None], input_ids=torch.tensor([sequence])).logits[0]
    log_probs = F.log_softmax(logits.float(), dim=-1)
    log_probs[:, [PAD, BOS]] = float("-inf")
    return log_probs[torch.arange(len(sequence) - 1), torch.tensor(sequence[1:])]


def teacher_forced_score(model, feats, sequence, length_penalty=1.0) -> float:
    return float(
        teacher_forced_log_probs(model, feats, sequence).sum() / (len(sequence) - 1) ** length_penalty
    )


def assert_well_formed(sequences: torch.Tensor):
    for row in sequences.tolist():
        assert row[0] == BOS and BOS not in row[1:]
        if EOS in row:
            end = row.index(EOS)
            assert all(t == PAD for t in row[end + 1 :]), row
            assert PAD not in row[:end], row
        else:
            assert PAD not in row, row  # ran to the length limit


# ----------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("feature", FEATURES)
def test_greedy_is_step_by_step_argmax_of_teacher_forced_logits(feature):
    model = peaked_model(seed=1, image_feature=feature)
    feats = image_embeds(6, seed=1, feature=feature)
    sequences = model.generate(image_embeds=feats, num_beams=1, max_new_tokens=8)
    assert_well_formed(sequences)
    for i in range(6):
        prefix = [BOS]
        while len(prefix) < 9 and prefix[-1] != EOS:
            logits = model(image_embeds=feats[i : i + 1], input_ids=torch.tensor([prefix])).logits[0, -1]
            logits[[PAD, BOS]] = float("-inf")
            prefix.append(int(logits.argmax()))
        assert strip(sequences[i]) == prefix


def test_num_beams_one_is_greedy_and_the_saved_default_is_used():
    model = peaked_model(seed=2)
    feats = image_embeds(5, seed=2)
    greedy = model.generate(image_embeds=feats, num_beams=1, do_sample=False, max_new_tokens=6)
    model.generation_config.num_beams = 1
    model.generation_config.max_new_tokens = 6
    assert torch.equal(model.generate(image_embeds=feats), greedy)
    model.generation_config.num_beams = 3
    assert torch.equal(model.generate(image_embeds=feats), model.generate(image_embeds=feats, num_beams=3))


@pytest.mark.parametrize("feature", FEATURES)
def test_some_captions_end_early_and_some_run_to_the_limit(feature):
    # the fixture must exercise both paths for the other tests to mean anything
    model = peaked_model(seed=0, image_feature=feature)
    sequences = model.generate(
        image_embeds=image_embeds(16, seed=0, feature=feature), num_beams=3, max_new_tokens=6
    )
    ended = [EOS in row[1:-1] for row in sequences.tolist()]
    assert any(ended) and not all(ended)


# ----------------------------------------------------------------------------- beam search


def all_captions(vocab_size: int, max_new_tokens: int) -> list[list[int]]:
    """Every caption the model can write: PAD and BOS never appear; each ends at EOS or at the limit."""
    words = [t for t in range(vocab_size) if t not in (PAD, BOS, EOS)]
    captions = []
    for length in range(max_new_tokens):
        captions += [[BOS, *w, EOS] for w in itertools.product(words, repeat=length)]
    captions += [[BOS, *w] for w in itertools.product(words, repeat=max_new_tokens)]
    return captions


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.5])
@pytest.mark.parametrize("early_stopping", [False, "never"])
def test_wide_beam_equals_exhaustive_search(length_penalty, early_stopping, feature):
    model = peaked_model(seed=3, vocab_size=6, image_feature=feature)
    captions = all_captions(6, 3)  # 1 + 3 + 9 + 27 = 40 captions
    assert len(captions) == 40
    feats = image_embeds(3, seed=3, feature=feature)
    out = model.generate(
        image_embeds=feats,
        num_beams=len(captions),
        num_return_sequences=len(captions),
        max_new_tokens=3,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        return_dict_in_generate=True,
        output_scores=True,
    )
    for i in range(3):
        scored = sorted(
            ((teacher_forced_score(model, feats[i], c, length_penalty), c) for c in captions), reverse=True
        )
        rows = out.sequences[i * 40 : (i + 1) * 40]
        assert [strip(r) for r in rows] == [c for _, c in scored]
        torch.testing.assert_close(
            out.sequences_scores[i * 40 : (i + 1) * 40],
            torch.tensor([s for s, _ in scored]),
            atol=1e-5,
            # float32 rounding: the scores of these peaked weights reach -40, and the attention's
            # matmuls group an image's beams differently from the teacher-forced forward's one row
            rtol=1e-6 if feature == "pooled" else 1e-5,
        )


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=4, length_penalty=1.0),
        dict(num_beams=3, length_penalty=0.5, num_return_sequences=3),
        dict(num_beams=5, length_penalty=2.0, early_stopping=True, num_return_sequences=2),
        dict(num_beams=4, length_penalty=1.0, early_stopping="never", num_return_sequences=4),
        dict(num_beams=1, length_penalty=1.3),
    ],
)
def test_sequences_scores_are_teacher_forced_log_probs_over_length_penalty(settings, feature):
    model = peaked_model(seed=4, image_feature=feature)
    feats = image_embeds(4, seed=4, feature=feature)
    out = model.generate(
        image_embeds=feats, max_new_tokens=7, return_dict_in_generate=True, output_scores=True, **settings
    )
    assert_well_formed(out.sequences)
    per_image = settings.get("num_return_sequences", 1)
    for row, (sequence, score) in enumerate(zip(out.sequences, out.sequences_scores, strict=True)):
        expected = teacher_forced_score(
            model, feats[row // per_image], strip(sequence), settings["length_penalty"]
        )
        # float32: batched and one-row attention round differently (~1e-5 on a sum of peaked
        # log-probs); a wrong token or a wrong length penalty moves the score by far more
        assert float(score) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("num_beams", [1, 4])
def test_a_caption_does_not_depend_on_the_rest_of_the_batch(num_beams, feature):
    model = peaked_model(seed=5, image_feature=feature)
    feats = image_embeds(8, seed=5, feature=feature)
    batch = model.generate(
        image_embeds=feats,
        num_beams=num_beams,
        max_new_tokens=8,
        return_dict_in_generate=True,
        output_scores=True,
    )
    for i in range(8):
        alone = model.generate(
            image_embeds=feats[i : i + 1],
            num_beams=num_beams,
            max_new_tokens=8,
            return_dict_in_generate=True,
            output_scores=True,
        )
        assert strip(alone.sequences[0]) == strip(batch.sequences[i])
        assert abs(float(alone.sequences_scores[0]) - float(batch.sequences_scores[i])) < 1e-5


@pytest.mark.parametrize("feature", FEATURES)
def test_pixel_values_and_image_embeds_give_the_same_captions(feature):
    model = peaked_model(seed=6, image_feature=feature)
    pixels = torch.randn(3, 3, 32, 32)
    feats = model.get_image_features(pixels)
    assert torch.equal(
        model.generate(pixel_values=pixels, num_beams=3), model.generate(image_embeds=feats, num_beams=3)
    )


# ----------------------------------------------------------------------------- transformers parity


class TransformersAdapter(PreTrainedModel, GenerationMixin):
    """Runs our captioner under transformers' GenerationMixin: with use_cache=False it re-runs the
    LSTM over the whole prefix every step, so no recurrent cache is involved."""

    config_class = ClipLstmConfig

    def __init__(self, captioner):
        super().__init__(captioner.config)
        self.captioner = captioner
        self.calls = 0
        self.post_init()

    def forward(self, input_ids=None, image_embeds=None, **kwargs):
        self.calls += 1
        return CausalLMOutput(logits=self.captioner(image_embeds=image_embeds, input_ids=input_ids).logits)

    def prepare_inputs_for_generation(self, input_ids, image_embeds=None, **kwargs):
        return {"input_ids": input_ids, "image_embeds": image_embeds}


def transformers_beam_search(model, feats, **settings):
    adapter = TransformersAdapter(model).eval()
    out = adapter.generate(
        input_ids=torch.full((feats.shape[0], 1), BOS),
        image_embeds=feats,
        use_cache=False,
        do_sample=False,
        suppress_tokens=[PAD, BOS],
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        output_scores=True,
        **settings,
    )
    return out, adapter.calls


def count_decoder_steps(model):
    original = model.decoder.step
    counter = {"steps": 0}

    def counting_step(*args, **kwargs):
        counter["steps"] += 1
        return original(*args, **kwargs)

    model.decoder.step = counting_step
    return counter


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize(
    "eos_bias, settings",
    [
        (1.5, dict(num_beams=4, length_penalty=1.0, early_stopping=False)),
        (1.5, dict(num_beams=3, length_penalty=0.5, early_stopping=True, num_return_sequences=3)),
        (1.5, dict(num_beams=5, length_penalty=2.0, early_stopping="never", num_return_sequences=2)),
        (1.5, dict(num_beams=4, length_penalty=-1.0, early_stopping=False, num_return_sequences=4)),
        (1.5, dict(num_beams=4, length_penalty=1.0, early_stopping=True, no_repeat_ngram_size=2)),
        (1.5, dict(num_beams=3, length_penalty=1.0, early_stopping=False, min_new_tokens=3)),
        # captions that end early, so the loop stops before the length limit
        (2.5, dict(num_beams=3, length_penalty=0.5, early_stopping=True, num_return_sequences=3)),
        (2.5, dict(num_beams=3, length_penalty=0.0, early_stopping=False)),
        (2.5, dict(num_beams=4, length_penalty=1.0, early_stopping=True)),
        (2.5, dict(num_beams=5, length_penalty=1.0, early_stopping=True, num_return_sequences=5)),
    ],
)
def test_beam_search_matches_transformers_generation_mixin(eos_bias, settings, feature):
    if feature == "patches":  # its logits are more extreme: EOS needs a larger push to end some captions
        eos_bias += 5.0
    model = peaked_model(seed=7, vocab_size=30, eos_bias=eos_bias, image_feature=feature)
    feats = image_embeds(6, seed=7, feature=feature)
    expected, hf_calls = transformers_beam_search(model, feats, max_new_tokens=12, **settings)
    counter = count_decoder_steps(model)
    ours = model.generate(
        image_embeds=feats, max_new_tokens=12, return_dict_in_generate=True, output_scores=True, **settings
    )
    assert [strip(s) for s in ours.sequences] == [strip(s) for s in expected.sequences]
    # 1e-5 absolute, or float32 rounding for the large scores of length_penalty < 0 (score x length)
    # 1e-5 relative for the attention decoder: its matmuls group beams differently from transformers' copies
    rtol = 1e-6 if feature == "pooled" else 1e-5
    torch.testing.assert_close(ours.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=rtol)
    assert counter["steps"] == hf_calls  # the loop ends at the same step: as soon as every image is done
    if eos_bias > 2 and feature == "pooled":
        assert hf_calls < 12  # these weights end captions early, so the stopping rule itself is compared
    elif eos_bias > 2:  # some images settle early and leave the batch (their memory with them), others run on
        assert any(len(strip(s)) < 13 for s in ours.sequences)


# ----------------------------------------------------------------------------- decoding options


def test_min_new_tokens_holds_back_eos():
    model = peaked_model(seed=8, eos_bias=3.0)
    feats = image_embeds(6, seed=8)
    free = model.generate(image_embeds=feats, num_beams=3, max_new_tokens=10)
    assert any(EOS in row[1:5] for row in free.tolist())  # without the constraint, captions end sooner
    held = model.generate(image_embeds=feats, num_beams=3, max_new_tokens=10, min_new_tokens=4)
    assert not any(EOS in row[1:5] for row in held.tolist())


def has_repeated_bigram(ids: list[int]) -> bool:
    bigrams = list(zip(ids, ids[1:], strict=False))
    return len(set(bigrams)) < len(bigrams)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_size_bans_repeated_bigrams(num_beams):
    model = peaked_model(seed=8, eos_bias=-5.0)  # long captions over 9 words: repeats are likely
    feats = image_embeds(6, seed=8)
    free = model.generate(image_embeds=feats, num_beams=num_beams, max_new_tokens=12)
    assert any(has_repeated_bigram(strip(row)) for row in free)
    banned = model.generate(
        image_embeds=feats, num_beams=num_beams, max_new_tokens=12, no_repeat_ngram_size=2
    )
    assert not any(has_repeated_bigram(strip(row)) for row in banned)


def test_num_return_sequences_are_distinct_and_ordered():
    model = peaked_model(seed=9)
    out = model.generate(
        image_embeds=image_embeds(2, seed=9),
        num_beams=4,
        num_return_sequences=4,
        max_new_tokens=6,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape[0] == 8
    for i in range(2):
        rows = [tuple(strip(s)) for s in out.sequences[i * 4 : (i + 1) * 4]]
        assert len(set(rows)) == 4
        scores = out.sequences_scores[i * 4 : (i + 1) * 4]
        assert torch.all(scores[:-1] >= scores[1:])


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = peaked_model(seed=10, scale=1.0)
    feats = image_embeds(4, seed=10)
    torch.manual_seed(0)
    first = model.generate(
        image_embeds=feats, do_sample=True, num_beams=1, max_new_tokens=8, num_return_sequences=3
    )
    torch.manual_seed(0)
    again = model.generate(
        image_embeds=feats, do_sample=True, num_beams=1, max_new_tokens=8, num_return_sequences=3
    )
    assert torch.equal(first, again) and first.shape[0] == 12
    assert_well_formed(first)
    assert len({tuple(strip(r)) for r in first}) > 4  # it really samples
    greedy = model.generate(image_embeds=feats, num_beams=1, max_new_tokens=8)
    top1 = model.generate(image_embeds=feats, do_sample=True, top_k=1, max_new_tokens=8)
    assert torch.equal(top1, greedy)
    nucleus = model.generate(image_embeds=feats, do_sample=True, top_p=1e-6, max_new_tokens=8)
    assert torch.equal(nucleus, greedy)
    beam_sampled = model.generate(image_embeds=feats, do_sample=True, num_beams=3, max_new_tokens=8)
    assert_well_formed(beam_sampled)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(num_beams=0), "num_beams"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_beams=1, num_return_sequences=2), "(?i)greedy"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(do_sample=True, top_p=0.0), "top_p"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(length_penalty=float("nan")), "length_penalty"),
        (dict(suppress_tokens=[999]), "999"),
        (dict(suppress_tokens=[-1]), "-1"),
        (dict(no_such_option=1), "no_such_option"),
    ],
)
def test_bad_generation_arguments_raise_naming_them(kwargs, named):
    model = peaked_model()
    with pytest.raises(ValueError, match=named):
        model.generate(image_embeds=image_embeds(1), **kwargs)


def test_max_length_counts_the_bos_token():
    model = peaked_model(seed=11, eos_bias=-10.0)  # never ends early
    sequences = model.generate(image_embeds=image_embeds(2), num_beams=1, max_length=6)
    assert sequences.shape == (2, 6)
    out = model.generate(
        image_embeds=image_embeds(2), num_beams=2, max_new_tokens=4, return_dict_in_generate=True
    )
    assert out.sequences.shape == (2, 5) and out.sequences_scores is None


# ----------------------------------------------------------------------------- inputs at the edges


def test_an_empty_batch_gives_an_empty_result():
    model = peaked_model()
    assert model.generate(image_embeds=image_embeds(0)).shape[0] == 0
    out = model.generate(
        image_embeds=image_embeds(0), num_beams=3, return_dict_in_generate=True, output_scores=True
    )
    assert out.sequences.shape[0] == 0 and out.sequences_scores.shape == (0,)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_image_embeds_are_refused(bad):
    feats = image_embeds(3)
    feats[1, 4] = bad
    with pytest.raises(ValueError, match="(?i)image_embeds.*(nan|inf)"):
        peaked_model().generate(image_embeds=feats)


# ----------------------------------------------------------------------------- GenerationConfig and positional calls


def saved_generation_model(tmp_path):
    """A peaked model that never ends a caption early, saved with non-default generation settings."""
    model = peaked_model(seed=12, eos_bias=-10.0)
    feats = image_embeds(4, seed=12)
    free = model.generate(image_embeds=feats, num_beams=1, max_new_tokens=9)
    common = int(torch.mode(free[:, 1:].flatten()).values)  # the token these weights write most
    model.generation_config.update(max_new_tokens=9, suppress_tokens=[common], num_beams=2)
    model.save_pretrained(tmp_path)
    return type(model).from_pretrained(tmp_path).eval(), feats, common


def test_a_generation_config_overrides_only_the_fields_it_sets(tmp_path):
    model, feats, suppressed = saved_generation_model(tmp_path)
    ids = model.generate(image_embeds=feats, generation_config=GenerationConfig(num_beams=3))
    assert ids.shape[1] == 1 + 9  # BOS + the saved max_new_tokens, not transformers' max_length 20
    assert suppressed not in ids.tolist()[0] and all(suppressed not in row for row in ids.tolist())
    assert torch.equal(ids, model.generate(image_embeds=feats, num_beams=3))


def test_a_generation_config_field_acts_like_the_same_keyword(tmp_path):
    model, feats, _ = saved_generation_model(tmp_path)
    by_config = model.generate(image_embeds=feats, generation_config=GenerationConfig(repetition_penalty=3.0))
    assert torch.equal(by_config, model.generate(image_embeds=feats, repetition_penalty=3.0))
    assert not torch.equal(by_config, model.generate(image_embeds=feats))


def test_pixel_values_and_a_generation_config_can_be_passed_positionally():
    model = peaked_model(seed=6)
    pixels = torch.randn(2, 3, 32, 32)
    config = GenerationConfig(num_beams=3, max_new_tokens=5)
    assert torch.equal(
        model.generate(pixels, config), model.generate(pixel_values=pixels, num_beams=3, max_new_tokens=5)
    )
    with pytest.raises(ValueError, match="image_embeds="):
        model.generate(image_embeds(2))  # cached features are not pixel_values
    with pytest.raises(ValueError, match="generation_config"):
        model.generate(pixels, image_embeds(2))


# ----------------------------------------------------------------------------- options handed to transformers


class CollectingStreamer(BaseStreamer):
    """Records what transformers' streamer protocol hands over: put() per step, end() once."""

    def __init__(self):
        self.tokens, self.ended = [], False

    def put(self, value):
        self.tokens.extend(value.flatten().tolist())

    def end(self):
        self.ended = True


NEUTRAL_FALLBACKS = {  # options only transformers' search takes, which do not change the result
    "cache": dict(logits_processor=LogitsProcessorList()),
    "no cache": dict(use_cache=False),
}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("route", sorted(NEUTRAL_FALLBACKS))
@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=4, length_penalty=1.0),
        dict(num_beams=3, length_penalty=0.5, early_stopping=True, num_return_sequences=3),
        dict(num_beams=5, length_penalty=2.0, early_stopping="never", num_return_sequences=2),
        dict(num_beams=3, no_repeat_ngram_size=2, min_new_tokens=3),
        dict(num_beams=1, suppress_tokens=[4, 5]),
    ],
)
def test_fast_path_and_transformers_fallback_agree(route, settings, feature):
    model = peaked_model(seed=7, vocab_size=30, eos_bias=1.5, image_feature=feature)
    feats = image_embeds(6, seed=7, feature=feature)
    common = dict(image_embeds=feats, max_new_tokens=10, return_dict_in_generate=True, output_scores=True)
    fast = model.generate(**common, **settings)
    fallback = model.generate(**common, **settings, **NEUTRAL_FALLBACKS[route])
    assert fallback.scores is not None  # transformers' output: the fallback really ran
    assert [strip(s) for s in fallback.sequences] == [strip(s) for s in fast.sequences]
    assert len(fallback.scores) == fallback.sequences.shape[1] - 1  # per-step scores come along
    if settings["num_beams"] > 1:  # greedy has no sequence scores in transformers
        torch.testing.assert_close(fallback.sequences_scores, fast.sequences_scores, atol=1e-5, rtol=1e-6)


def test_a_streamer_receives_the_tokens():
    model = peaked_model(seed=13, eos_bias=1.0)
    feats = image_embeds(1, seed=13)
    streamer = CollectingStreamer()
    ids = model.generate(image_embeds=feats, num_beams=1, max_new_tokens=8, streamer=streamer)
    assert torch.equal(ids, model.generate(image_embeds=feats, num_beams=1, max_new_tokens=8))
    assert streamer.tokens == ids[0].tolist() and streamer.ended


def test_repetition_penalty_scores_as_transformers_defines_it():
    model = peaked_model(seed=7, vocab_size=30, eos_bias=-2.0)
    feats = image_embeds(4, seed=7)
    settings = dict(num_beams=3, repetition_penalty=2.0, max_new_tokens=10)
    expected, _ = transformers_beam_search(model, feats, **settings)
    ours = model.generate(image_embeds=feats, return_dict_in_generate=True, output_scores=True, **settings)
    assert [strip(s) for s in ours.sequences] == [strip(s) for s in expected.sequences]
    torch.testing.assert_close(ours.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=1e-6)
    plain = model.generate(image_embeds=feats, return_dict_in_generate=True, output_scores=True, num_beams=3)
    assert not torch.allclose(plain.sequences_scores, ours.sequences_scores)


def test_min_length_and_token_id_overrides_are_honoured():
    model = peaked_model(seed=8, eos_bias=3.0)
    feats = image_embeds(6, seed=8)
    held = model.generate(image_embeds=feats, num_beams=3, max_new_tokens=10, min_length=5)
    assert not any(EOS in row[1:5] for row in held.tolist())  # min_length counts BOS, as in transformers
    assert torch.equal(
        held, model.generate(image_embeds=feats, num_beams=3, max_new_tokens=10, min_new_tokens=4)
    )
    # another end token: every caption stops at token 7 (or the length limit), and is padded with 9
    ended = model.generate(image_embeds=feats, num_beams=1, max_new_tokens=10, eos_token_id=7, pad_token_id=9)
    for row in ended.tolist():
        end = row.index(7) if 7 in row else len(row)
        assert EOS in row[:end] or all(t == 9 for t in row[end + 1 :])


def test_per_step_scores_come_with_output_logits():
    model = peaked_model(seed=9)
    out = model.generate(
        image_embeds=image_embeds(2, seed=9),
        num_beams=1,
        max_new_tokens=6,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    steps = out.sequences.shape[1] - 1
    assert len(out.scores) == len(out.logits) == steps and out.logits[0].shape == (2, 12)


# ----------------------------------------------------------------------------- attention weights


def assert_attentions_are_teacher_forced(model, feats, out, per_image: int):
    """Each returned token's weights are the ones teacher forcing computes for that token; BOS and
    the padding after EOS have none (zeros); the weights over an image's tokens sum to 1."""
    rows, length = out.sequences.shape
    assert out.attentions.shape == (rows, length, model.config.num_image_tokens)
    for row, sequence in enumerate(out.sequences):
        caption = strip(sequence)
        forced = model(
            image_embeds=feats[row // per_image][None],
            input_ids=torch.tensor([caption]),
            output_attentions=True,
        ).attentions[0]  # (T, P): position t writes token t + 1
        written = out.attentions[row, 1 : len(caption)]
        torch.testing.assert_close(written, forced[: len(caption) - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(written.sum(-1), torch.ones(len(caption) - 1))
        assert not out.attentions[row, 0].any() and not out.attentions[row, len(caption) :].any()


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=1),
        dict(num_beams=4),
        dict(num_beams=3, num_return_sequences=3, length_penalty=0.5),
        dict(num_beams=5, early_stopping=True, num_return_sequences=2),
        dict(num_beams=1, do_sample=True, num_return_sequences=3),
        dict(num_beams=3, do_sample=True, num_return_sequences=2),
    ],
)
def test_attentions_of_returned_tokens_are_the_teacher_forced_ones(settings):
    torch.manual_seed(0)
    model = peaked_model(seed=14, image_feature="patches", eos_bias=1.5)
    feats = image_embeds(5, seed=14, feature="patches")
    out = model.generate(
        image_embeds=feats, max_new_tokens=9, return_dict_in_generate=True, output_attentions=True, **settings
    )
    assert_well_formed(out.sequences)
    assert_attentions_are_teacher_forced(model, feats, out, settings.get("num_return_sequences", 1))
    # the weights depend on the image and the step: the test would pass vacuously on uniform attention
    assert out.attentions[:, 1:].amax() > 0.5


@pytest.mark.parametrize("num_beams", [1, 4])
def test_attentions_do_not_depend_on_the_rest_of_the_batch(num_beams):
    model = peaked_model(seed=15, image_feature="patches")
    feats = image_embeds(6, seed=15, feature="patches")
    common = dict(num_beams=num_beams, max_new_tokens=8, return_dict_in_generate=True, output_attentions=True)
    batch = model.generate(image_embeds=feats, **common)
    for i in range(6):
        alone = model.generate(image_embeds=feats[i : i + 1], **common)
        length = alone.sequences.shape[1]
        torch.testing.assert_close(alone.attentions[0], batch.attentions[i, :length], atol=1e-6, rtol=1e-5)
        assert not batch.attentions[i, length:].any()


def test_transformers_fallback_returns_the_same_attentions_per_step():
    model = peaked_model(seed=16, image_feature="patches")
    feats = image_embeds(3, seed=16, feature="patches")
    common = dict(image_embeds=feats, max_new_tokens=6, return_dict_in_generate=True, output_attentions=True)
    fast = model.generate(**common, num_beams=1)
    fallback = model.generate(**common, num_beams=1, logits_processor=LogitsProcessorList())
    assert torch.equal(fallback.sequences, fast.sequences)
    # transformers: one tuple per step, one (B, heads, new tokens, P) tensor per layer
    steps = torch.cat([layers[0][:, 0, -1:] for layers in fallback.attentions], dim=1)  # (B, L-1, P)
    written = fast.sequences[:, 1:] != PAD
    torch.testing.assert_close(steps[written], fast.attentions[:, 1:][written], atol=1e-6, rtol=1e-5)


def test_output_attentions_needs_a_patches_model():
    with pytest.raises(ValueError, match="output_attentions needs a model that attends"):
        peaked_model().generate(
            image_embeds=image_embeds(2), output_attentions=True, return_dict_in_generate=True
        )
    empty = peaked_model(image_feature="patches").generate(
        image_embeds=image_embeds(0, feature="patches"), output_attentions=True, return_dict_in_generate=True
    )
    assert empty.attentions.shape == (0, 1, 17)


def test_patches_image_embeds_of_the_wrong_shape_are_refused():
    model = peaked_model(image_feature="patches")
    with pytest.raises(ValueError, match=r"image_embeds must be \(batch, 17, 32\)"):
        model.generate(image_embeds=image_embeds(2))  # a pooled (B, D) feature
