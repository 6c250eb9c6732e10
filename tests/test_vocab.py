import json

import pytest
import torch

from captioner.errors import CheckpointError
from captioner.data.vocab import END_ID, PAD_ID, SPECIAL_TOKENS, START_ID, UNK_ID, Vocabulary, detokenize, pad, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A black dog is running after a white dog in the snow .") == \
        ["a", "black", "dog", "is", "running", "after", "a", "white", "dog", "in", "the", "snow"]
    assert tokenize("Two men, one dog's ball. A red car!") == \
        ["two", "men", "one", "dog", "'s", "ball", "a", "red", "car"]
    assert tokenize("  ...  ") == []


def test_detokenize_rejoins_clitics():
    assert detokenize(["a", "dog", "'s", "ball"]) == "a dog's ball"


def test_build_applies_frequency_threshold_and_special_tokens():
    captions = ["a dog runs"] * 5 + ["a cat sleeps"] * 4 + ["a zebra"]
    vocab = Vocabulary.build(captions, min_count=5)
    assert vocab.words[:4] == list(SPECIAL_TOKENS)
    assert (PAD_ID, START_ID, END_ID, UNK_ID) == (0, 1, 2, 3)
    assert vocab.words[4:] == ["a", "dog", "runs"]  # most frequent first; cat (4x) and zebra (1x) dropped
    assert vocab.encode("A dog sleeps") == [vocab.index["a"], vocab.index["dog"], UNK_ID]
    assert len(Vocabulary.build(captions, min_count=1)) == 4 + 6


def test_decode_stops_at_end_and_skips_specials():
    vocab = Vocabulary.build(["a dog runs"], min_count=1)
    ids = [START_ID, vocab.index["a"], UNK_ID, vocab.index["runs"], END_ID, vocab.index["dog"], PAD_ID]
    assert vocab.decode(ids) == "a <unk> runs"


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["a dog runs fast", "a dog"], min_count=1)
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text())["words"] == vocab.words
    assert Vocabulary.load(tmp_path / "vocab.json").words == vocab.words


@pytest.mark.parametrize("content", ['{"words": ["a", "b"]}', "not json", '{"words": "abc"}', "[]"])
def test_load_rejects_invalid_files(tmp_path, content):
    (tmp_path / "vocab.json").write_text(content)
    with pytest.raises(CheckpointError):
        Vocabulary.load(tmp_path / "vocab.json")


def test_oversized_file_is_one_error_not_wrapped_twice(tmp_path, monkeypatch):
    """The size error is the reader's own CheckpointError line, not re-wrapped as "not a valid vocabulary file"."""
    monkeypatch.setattr("captioner.data.vocab.MAX_VOCAB_FILE_BYTES", 10)
    Vocabulary.build(["a dog runs fast"], min_count=1).save(tmp_path / "vocab.json")
    with pytest.raises(CheckpointError) as error:
        Vocabulary.load(tmp_path / "vocab.json")
    assert str(error.value) == f"{tmp_path / 'vocab.json'}: vocabulary file larger than 10 bytes"


def test_pad_fills_with_pad_id_and_gives_lengths():
    tokens, lengths = pad([[START_ID, 7, END_ID], [START_ID, END_ID], [START_ID, 5, 6, END_ID]])
    assert tokens.tolist() == [[START_ID, 7, END_ID, PAD_ID], [START_ID, END_ID, PAD_ID, PAD_ID],
                               [START_ID, 5, 6, END_ID]]
    assert tokens.dtype == torch.long and lengths.tolist() == [3, 2, 4]
