"""Ensembles: several decoders averaged per step inside the one batched search, saved and loaded as one model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from captioner import Captioner
from captioner.cli import main
from captioner.models.config import MAX_MEMBERS
from captioner.models.decoder import Decoder, DecoderConfig, DecoderEnsemble, join_decoders
from captioner.generation.config import GenerationConfig
from captioner.generation.search import beam_search
from captioner.errors import CheckpointError, ConfigError
from captioner.data.vocab import END_ID, START_ID, Vocabulary


def other_member(model: Captioner, seed: int) -> Captioner:
    """A second model with the same encoder and vocabulary and a differently initialised decoder."""
    torch.manual_seed(seed)
    member = copy.deepcopy(model)
    member.decoder = Decoder(model.decoder.config).eval()
    return member


@pytest.fixture(scope="module")
def members(tiny_model) -> list[Captioner]:
    return [tiny_model, other_member(tiny_model, 1)]


@pytest.fixture(scope="module")
def test_images(synthetic) -> list[Path]:
    return sorted((synthetic / "images").glob("test_*.png"))[:8]


def test_each_step_averages_the_members_probabilities(members):
    ensemble = Captioner.ensemble(members).decoder
    assert isinstance(ensemble, DecoderEnsemble) and ensemble.config.members == 2
    features = torch.randn(3, ensemble.config.feature_size)
    tokens = torch.tensor([START_ID, 5, 7])
    log_probs, (h, c) = ensemble.step(tokens, ensemble.init_state(features))
    expected = sum(F.softmax(m.decoder.step(tokens, m.decoder.init_state(features))[0], -1) for m in members) / 2
    torch.testing.assert_close(log_probs.exp(), expected, rtol=1e-5, atol=1e-6)
    assert h.shape == c.shape == (2 * ensemble.config.num_layers, 3, ensemble.config.hidden_size)


def test_an_ensemble_of_copies_decodes_like_the_single_model(tiny_model, test_images):
    ensemble = Captioner.ensemble([tiny_model, tiny_model, tiny_model])
    features = tiny_model.encode(test_images)
    single, joint = tiny_model.generate(features, num_return_sequences=3), ensemble.generate(features, num_return_sequences=3)
    assert [[c.text for c in row] for row in joint] == [[c.text for c in row] for row in single]
    for a, b in zip(single, joint):
        assert [c.log_prob for c in b] == pytest.approx([c.log_prob for c in a], abs=1e-4)


def test_search_reorders_every_members_state(members, test_images):
    """A beam search over the stacked state equals one over a decoder that runs the members by hand."""
    ensemble = Captioner.ensemble(members)
    features = members[0].encode(test_images)

    config = GenerationConfig(beam_size=4, num_return_sequences=2)
    expected = beam_search(_AsDecoder(members), features, config)
    got = beam_search(ensemble.decoder, features, config)
    assert torch.equal(got.tokens, expected.tokens)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=1e-4)


class _AsDecoder:
    """The members run one after another, each state in its own slice of axis 2 (the search reorders axis 1)."""

    def __init__(self, members):
        self.decoders = [m.decoder for m in members]

    def init_state(self, features):
        states = [d.init_state(features) for d in self.decoders]
        return torch.stack([h for h, _ in states], 2), torch.stack([c for _, c in states], 2)

    def step(self, tokens, state):
        outputs = [d.step(tokens, (state[0][:, :, i], state[1][:, :, i])) for i, d in enumerate(self.decoders)]
        probs = sum(F.softmax(logits, -1) for logits, _ in outputs) / len(outputs)
        return probs.log(), (torch.stack([h for _, (h, _) in outputs], 2), torch.stack([c for _, (_, c) in outputs], 2))


def test_saved_ensemble_loads_and_scores(members, test_images, tmp_path):
    ensemble = Captioner.ensemble(members)
    ensemble.save_pretrained(tmp_path / "ensemble")
    assert json.loads((tmp_path / "ensemble" / "config.json").read_text())["decoder"]["members"] == 2
    loaded = Captioner.from_pretrained(tmp_path / "ensemble", device="cpu", engine="torch")
    assert loaded.caption(test_images) == ensemble.caption(test_images)
    text = loaded.caption(test_images[0])
    ids = [START_ID, *loaded.vocab.encode(text), END_ID]
    tokens, features = torch.tensor([ids]), loaded.encode(test_images[:1])
    per_member = [F.softmax(m.decoder(features, tokens, torch.tensor([len(ids)])), -1) for m in members]
    word_probs = (sum(per_member) / 2).gather(2, tokens[:, 1:, None])
    assert loaded.score(test_images[0], text) == pytest.approx(word_probs.log().sum().item(), abs=1e-4)
    # Averaging per word is never worse than the members' mean log-likelihood (Jensen's inequality).
    assert loaded.score(test_images[0], text) >= sum(m.score(test_images[0], text) for m in members) / 2 - 1e-4


def test_an_ensemble_of_one_model_saves_and_loads_as_that_model(tiny_model, test_images, tmp_path):
    """It was saved as members.0.* weights with members: 1, which no loader accepts."""
    one = Captioner.ensemble([tiny_model])
    assert type(one.decoder) is Decoder and one.decoder is not tiny_model.decoder  # a copy, like any ensemble
    one.save_pretrained(tmp_path / "one")
    assert json.loads((tmp_path / "one" / "config.json").read_text())["decoder"]["members"] == 1
    loaded = Captioner.from_pretrained(tmp_path / "one", device="cpu", engine="torch")
    assert loaded.caption(test_images) == tiny_model.caption(test_images)
    text = tiny_model.caption(test_images[0])
    assert loaded.score(test_images[0], text) == pytest.approx(tiny_model.score(test_images[0], text), abs=1e-5)


def test_cli_export_joins_members_and_the_onnx_engine_agrees(members, test_images, tmp_path):
    for number, member in enumerate(members):
        member.save_pretrained(tmp_path / f"member{number}")
    out = tmp_path / "joined"
    assert main(["export", str(tmp_path / "member0"), str(tmp_path / "member1"), str(out), "--format", "onnx",
                 "--beam-size", "5", "-q"]) == 0
    torch_engine = Captioner.from_pretrained(out, device="cpu", engine="torch")
    onnx_engine = Captioner.from_pretrained(out, device="cpu", engine="onnx")
    assert torch_engine.decoder.config.members == 2 and torch_engine.generation_config.beam_size == 5
    assert onnx_engine.engine == "onnx"
    assert onnx_engine.caption(test_images) == torch_engine.caption(test_images) == Captioner.ensemble(members).caption(
        test_images, beam_size=5)


def test_members_must_share_vocabulary_and_encoder(tiny_model, tmp_path, capsys):
    stranger = copy.deepcopy(tiny_model)
    stranger.vocab = Vocabulary([*tiny_model.vocab.words[:-1], "zebra-crossing"])
    with pytest.raises(ConfigError, match="model 2 has another vocabulary"):
        Captioner.ensemble([tiny_model, stranger])
    tiny_model.save_pretrained(tmp_path / "a")
    stranger.save_pretrained(tmp_path / "b")
    assert main(["export", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "out")]) == 2
    assert "another vocabulary" in capsys.readouterr().err and not (tmp_path / "out").exists()
    wider = DecoderConfig(**{**tiny_model.decoder.config.to_dict(), "hidden_size": 8})
    with pytest.raises(ConfigError, match="same feature, vocabulary"):
        join_decoders([tiny_model.decoder, Decoder(wider)])


def test_member_count_is_bounded(tiny_model, tmp_path, capsys):
    args = [str(tmp_path / "m")] * (MAX_MEMBERS + 1)
    assert main(["export", *args, str(tmp_path / "out")]) == 2
    assert f"at most {MAX_MEMBERS} decoders" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="members"):
        DecoderConfig(16, 30, members=MAX_MEMBERS + 1)
    with pytest.raises(ConfigError, match="one member"):
        Decoder(DecoderConfig(16, 30, members=2))
    with pytest.raises(ConfigError, match="2 or more members"):
        DecoderEnsemble(DecoderConfig(16, 30, members=1))


def test_config_claiming_more_members_than_stored_is_refused(members, tmp_path):
    Captioner.ensemble(members).save_pretrained(tmp_path / "ensemble")
    config_file = tmp_path / "ensemble" / "config.json"
    config = json.loads(config_file.read_text())
    config["decoder"]["members"] = 3
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights do not match config.json"):
        Captioner.from_pretrained(tmp_path / "ensemble", device="cpu")


def test_export_checkpoint_joins_rounds_and_refuses_before_loading(members, tmp_path):
    """``captioner export``'s work, called as the model's: ``cli._export`` only parses and prints."""
    from captioner.models.captioner import export_checkpoint

    paths = [member.save_pretrained(tmp_path / f"member{i}") for i, member in enumerate(members)]
    with pytest.raises(ConfigError, match=f"at most {MAX_MEMBERS} decoders"):
        export_checkpoint([tmp_path / "missing"] * (MAX_MEMBERS + 1), tmp_path / "out")
    with pytest.raises(ConfigError, match="OUT may be MODEL only to add ONNX graphs"):
        export_checkpoint(paths[:1], paths[0], half_precision=True, format="onnx")
    out, model = export_checkpoint(paths, tmp_path / "out", half_precision=True, options={"beam_size": 5})
    assert out == tmp_path / "out" and model.decoder.config.members == 2 and model.generation_config.beam_size == 5
    loaded = Captioner.from_pretrained(out, device="cpu", engine="torch")
    assert all(torch.equal(a, b) for a, b in zip(loaded.decoder.state_dict().values(),
                                                 model.decoder.state_dict().values()))  # rounded as saved
    assert loaded.generation_config == model.generation_config
