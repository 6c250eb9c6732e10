"""Decoding invariants on a random-weight model (they hold whatever the weights): beam/greedy agreement, batching, n-best scores, sampling."""

import pytest
import torch

from captioner import Caption, ConfigError
from captioner.models.decoder import Decoder, DecoderConfig
from captioner.generation.config import GenerationConfig
from captioner.generation.search import constrain, generate, to_captions
from captioner.data.vocab import END_ID, PAD_ID, UNK_ID


@pytest.fixture(scope="module")
def features(tiny_model, synthetic):
    images = sorted((synthetic / "images").glob("test_*.png"))[:12]
    return tiny_model.encode(images)


def hyps(model, features, **options):
    return generate(model.decoder, features, model.generation_config.updated(**options))


def test_beam_size_one_equals_greedy(tiny_model, features):
    for penalty in (0.0, 1.0):
        beam = hyps(tiny_model, features, strategy="beam", beam_size=1, length_penalty=penalty)
        greedy = hyps(tiny_model, features, strategy="greedy", length_penalty=penalty)
        width = min(beam.tokens.size(-1), greedy.tokens.size(-1))
        assert torch.equal(beam.tokens[..., :width], greedy.tokens[..., :width])
        assert torch.allclose(beam.token_log_probs[..., :width], greedy.token_log_probs[..., :width], atol=1e-5)


@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_batched_equals_one_at_a_time(tiny_model, features, strategy):
    options = dict(strategy=strategy, beam_size=4, num_return_sequences=1 if strategy == "greedy" else 3)
    batched = tiny_model.generate(features, **options)
    single = [tiny_model.generate(features[i:i + 1], **options)[0] for i in range(len(features))]
    assert [[c.text for c in row] for row in batched] == [[c.text for c in row] for row in single]
    for a, b in zip(batched, single):
        assert [c.log_prob for c in a] == pytest.approx([c.log_prob for c in b], abs=1e-4)


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_nbest_sorted_and_scores_are_model_log_likelihoods(tiny_model, features, length_penalty):
    results = tiny_model.generate(features, beam_size=5, num_return_sequences=5, length_penalty=length_penalty)
    for row, feature in zip(results, features):
        assert len(row) == 5 and all(isinstance(c, Caption) for c in row)
        scores = [c.score for c in row]
        assert scores == sorted(scores, reverse=True)
        for caption in row:
            assert caption.score == pytest.approx(caption.log_prob / (len(caption.tokens) + 1) ** length_penalty,
                                                  rel=1e-5)
            assert len(caption.token_log_probs) == len(caption.tokens) + 1
            assert sum(caption.token_log_probs) == pytest.approx(caption.log_prob, abs=1e-5)
        rescored = tiny_model.score(feature[None].expand(5, -1), [c.text for c in row])
        assert rescored == pytest.approx([c.log_prob for c in row], abs=1e-3)


@pytest.mark.slow
def test_beam_search_finds_likelier_captions_than_greedy(trained_model, synthetic):
    """Not an invariant of any weights (a beam can prune the greedy path and end lower), but of a trained model."""
    features = trained_model.encode(sorted((synthetic / "images").glob("test_*.png"))[:12])
    greedy = trained_model.generate(features, strategy="greedy")
    beam = trained_model.generate(features, beam_size=5)
    assert all(b[0].log_prob >= g[0].log_prob - 1e-5 for b, g in zip(beam, greedy))


def test_fixed_seed_reproduces_samples(tiny_model, features):
    options = dict(strategy="sample", num_return_sequences=4, temperature=1.5, seed=7)
    first = tiny_model.generate(features, **options)
    assert [[c.text for c in r] for r in first] == [[c.text for c in r] for r in tiny_model.generate(features, **options)]
    other = tiny_model.generate(features, **{**options, "seed": 8})
    assert [[c.text for c in r] for r in first] != [[c.text for c in r] for r in other]


def test_low_temperature_approaches_greedy(tiny_model, features):
    greedy = tiny_model.caption(features, strategy="greedy")
    cold = tiny_model.caption(features, strategy="sample", temperature=1e-4, seed=0)
    assert cold == greedy


def test_top_k_one_is_greedy_and_top_p_limits_choices(tiny_model, features):
    greedy = tiny_model.caption(features, strategy="greedy")
    assert tiny_model.caption(features, strategy="sample", top_k=1, seed=3) == greedy
    assert tiny_model.caption(features, strategy="sample", top_p=1e-6, seed=3) == greedy


def test_length_limits_and_unk_suppression(tiny_model, features):
    for caption in tiny_model.generate(features, beam_size=3, max_length=3, num_return_sequences=3):
        assert all(len(c.tokens) <= 3 for c in caption)
    long = tiny_model.generate(features, strategy="greedy", min_length=8, max_length=10)
    assert all(8 <= len(row[0].tokens) <= 10 for row in long)
    assert all("<unk>" not in row[0].tokens for row in tiny_model.generate(features, strategy="sample", seed=1,
                                                                           temperature=3.0))


def test_no_repeat_ngram_blocks_repeats():
    log_probs = torch.zeros(1, 10)
    history = torch.tensor([[5, 6, 7, 5]])
    config = GenerationConfig(no_repeat_ngram_size=2, min_length=0)
    masked = constrain(log_probs, history, step=4, config=config)
    assert torch.isinf(masked[0, 6]) and not torch.isinf(masked[0, 7]) and not torch.isinf(masked[0, END_ID])
    assert torch.isinf(masked[0, UNK_ID])


def test_no_repeat_ngram_in_generation(tiny_model, features):
    for row in tiny_model.generate(features, beam_size=3, no_repeat_ngram_size=1, max_length=12):
        assert len(set(row[0].tokens)) == len(row[0].tokens)


def test_caption_returns_str_for_one_and_list_for_many(tiny_model, synthetic):
    images = sorted((synthetic / "images").glob("test_*.png"))[:2]
    assert isinstance(tiny_model.caption(images[0]), str)
    assert isinstance(tiny_model.caption(str(images[0])), str)
    assert tiny_model.caption(images) == [tiny_model.caption(images[0]), tiny_model.caption(images[1])]
    from PIL import Image
    import numpy as np

    photo = Image.open(images[0])
    assert tiny_model.caption(photo) == tiny_model.caption(np.asarray(photo)) == tiny_model.caption(images[0])
    assert tiny_model.caption(images[0].read_bytes()) == tiny_model.caption(images[0])


@pytest.mark.parametrize("options", [dict(strategy="nope"), dict(beam_size=0),
                                     dict(temperature=0), dict(top_p=0), dict(unknown_option=1),
                                     dict(strategy="greedy", num_return_sequences=2)])
def test_invalid_options_raise_config_error(tiny_model, features, options):
    with pytest.raises(ConfigError):
        tiny_model.generate(features, **options)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_cpu_inference_step_equals_the_lstm_module(num_layers):
    """Decoding on the CPU writes the LSTM's equations out (faster for few rows); they must agree with nn.LSTM."""
    torch.manual_seed(0)
    decoder = Decoder(DecoderConfig(16, 40, 8, 12, num_layers=num_layers, dropout=0.3)).eval()
    tokens = torch.randint(4, 40, (5,))
    state = decoder.init_state(torch.randn(5, 16))
    logits, (h, c) = decoder.step(tokens, state)
    hidden, (h_ref, c_ref) = decoder.lstm(decoder.embedding(tokens).unsqueeze(1), state)
    assert torch.allclose(logits, decoder.output(hidden[:, 0]), atol=1e-5)
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)


@pytest.mark.parametrize("strategy", ["beam", "greedy", "sample"])
def test_finished_rows_are_not_stepped(tiny_model, features, strategy):
    """Rows whose caption has ended cost no decoder work, and skipping them changes no caption."""
    stepped = []

    class Recording:
        def init_state(self, batch_features):
            return tiny_model.decoder.init_state(batch_features)

        def step(self, tokens, state):
            stepped.append(tokens.clone())
            return tiny_model.decoder.step(tokens, state)

    config = tiny_model.generation_config.updated(strategy=strategy, beam_size=4, seed=0, max_length=30,
                                                      num_return_sequences=1 if strategy == "greedy" else 2)
    recorded, plain = generate(Recording(), features, config), generate(tiny_model.decoder, features, config)
    assert all(torch.equal(a, b) for a, b in zip(recorded, plain))
    assert not any(((tokens == END_ID) | (tokens == PAD_ID)).any() for tokens in stepped)
    assert len(stepped[-1]) < len(stepped[0])  # captions of different lengths: rows drop out as they end
    rescored = tiny_model.score(features.repeat_interleave(config.num_return_sequences, 0),
                                   [c.text for row in to_captions(recorded, tiny_model.vocab) for c in row])
    assert rescored == pytest.approx(recorded.token_log_probs.sum(-1).flatten().tolist(), abs=1e-3)


def test_generation_config_is_frozen_and_checked_on_every_construction():
    """No field changes without the checks: assignment is refused, and updated() builds a checked copy."""
    import dataclasses

    config = GenerationConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.beam_size = 0  # type: ignore[misc]
    with pytest.raises(ConfigError, match="beam_size must be between 1 and 64"):
        config.updated(beam_size=0)
    with pytest.raises(ConfigError, match="min_length cannot exceed max_length"):
        config.updated(min_length=10, max_length=5)
    with pytest.raises(ConfigError, match="greedy decoding returns one caption"):
        dataclasses.replace(config, strategy="greedy", num_return_sequences=2)


def test_more_captions_than_beams_is_refused_unless_the_beam_is_left_to_widen(caplog):
    """As Hugging Face: a config never holds fewer beams than captions. Asked for n captions without a beam size,
    updated() widens the beam itself (the CLI's --num-captions, the API's keyword); both given, inconsistent,
    is one line."""
    message = r"^num_return_sequences \(5\) cannot exceed beam_size \(3\) in beam search; ask for a beam"
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(beam_size=3, num_return_sequences=5)
    config = GenerationConfig()
    with pytest.raises(ConfigError, match=r"num_return_sequences \(5\) cannot exceed beam_size \(2\)"):
        config.updated(beam_size=2, num_return_sequences=5)
    with caplog.at_level("INFO", logger="captioner.generation.config"):
        widened = config.updated(num_return_sequences=5)
    assert (widened.beam_size, widened.num_return_sequences, config.beam_size) == (5, 5, 3)
    assert "beam_size raised from 3 to 5 to return 5 captions" in caplog.text
    assert config.updated(num_return_sequences=2).beam_size == 3  # never narrowed
    assert config.updated(beam_size=None, num_return_sequences=4).beam_size == 4  # None: not given
    sampled = config.updated(strategy="sample", num_return_sequences=5)  # samples need no beams
    assert (sampled.beam_size, sampled.num_return_sequences) == (3, 5)
    assert sampled.updated(strategy="beam", beam_size=5).beam_size == 5
    for options in ({"strategy": "beam"}, {"strategy": "beam", "beam_size": 4}):  # n = 5 stays, and 3 or 4 beams
        with pytest.raises(ConfigError, match="cannot exceed beam_size"):
            sampled.updated(**options)


@pytest.mark.parametrize("strategy", ["beam", "greedy", "sample"])
def test_nan_scores_are_one_error_at_the_end_of_the_search(tiny_model, features, strategy):
    """NaN log-probabilities (overflowing weights) are searched as zeros, never drawn from or ranked (a CUDA
    multinomial over NaN would kill the process), and reported once, when the search ends: no sync each step."""
    from captioner.errors import DecodingError
    from captioner.generation.step import UNUSABLE_SCORES

    class Overflowing:
        steps = 0

        def init_state(self, batch_features):
            return tiny_model.decoder.init_state(batch_features)

        def step(self, tokens, state):
            logits, state = tiny_model.decoder.step(tokens, state)
            Overflowing.steps += 1
            if Overflowing.steps == 2:
                logits[0] = float("inf")  # one row's scores overflow; the others' captions go on
            return logits, state

    config = tiny_model.generation_config.updated(strategy=strategy, seed=0,
                                                  num_return_sequences=1 if strategy == "greedy" else 2)
    with pytest.raises(DecodingError, match=f"^{UNUSABLE_SCORES}$"):
        generate(Overflowing(), features[:3], config)
    assert Overflowing.steps > 2  # the search went on: the check is at its end
