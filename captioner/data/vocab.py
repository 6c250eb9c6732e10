"""Tokenization and the word vocabulary, stored as JSON (never pickle).

Tokenization uses nltk's Treebank word tokenizer with ``preserve_line=True``, which needs no nltk
data download. Text is lowercased and punctuation tokens are dropped (the coco-caption scorer
drops them too), so the model spends no capacity on full stops.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from nltk.tokenize import word_tokenize
from nltk.tokenize.treebank import TreebankWordDetokenizer

from ..errors import CheckpointError, ConfigError
from ..files import read_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)
MAX_VOCAB_FILE_BYTES = 64 << 20

_PUNCTUATION = re.compile(r"^[^\w]+$")
_TRAILING_DOT = re.compile(r"^(\w[\w'-]*)\.$")
_detokenizer = TreebankWordDetokenizer()


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of ``text``, punctuation removed."""
    tokens: list[str] = []
    for token in word_tokenize(text.lower(), preserve_line=True):
        match = _TRAILING_DOT.match(token)  # "red." in mid-caption: the tokenizer splits only the last dot
        if match:
            token = match.group(1)
        if not _PUNCTUATION.match(token):
            tokens.append(token)
    return tokens


def pad(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, lengths)``: the id sequences as one ``<pad>``-filled long tensor, and each one's length.

    The one place a batch of token rows is built, so training, scoring and the decoder agree on padding.
    """
    lengths = torch.tensor([len(sequence) for sequence in sequences])
    tokens = torch.full((len(sequences), max(lengths.tolist(), default=0)), PAD_ID, dtype=torch.long)
    for row, sequence in zip(tokens, sequences):
        row[: len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return tokens, lengths


def detokenize(tokens: Sequence[str]) -> str:
    """Join tokens back into text ("dog 's" -> "dog's")."""
    return _detokenizer.detokenize(list(tokens))


class Vocabulary:
    """Maps words to ids; ids 0-3 are ``<pad> <start> <end> <unk>``."""

    def __init__(self, words: Sequence[str]):
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ConfigError(f"vocabulary must start with {' '.join(SPECIAL_TOKENS)}")
        if len(set(words)) != len(words):
            raise ConfigError("vocabulary has duplicate words")
        self.words: list[str] = list(words)
        self.index: dict[str, int] = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> "Vocabulary":
        """Keep words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(token for caption in captions for token in tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (no ``<start>``/``<end>``); unknown words map to ``<unk>``."""
        return [self.index.get(token, UNK_ID) for token in tokenize(text)]

    def tokens(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` up to the first ``<end>``, special tokens other than ``<unk>`` skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self.words[i])
        return words

    def decode(self, ids: Iterable[int]) -> str:
        return detokenize(self.tokens(ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": self.words}, ensure_ascii=False, indent=0), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        data = read_json(path, MAX_VOCAB_FILE_BYTES, "vocabulary file", CheckpointError)
        words = data.get("words") if isinstance(data, dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise CheckpointError(f"{path}: 'words' must be a list of strings")
        try:
            return cls(words)
        except ConfigError as exc:  # the file is what failed: name it
            raise CheckpointError(f"{path}: {exc}") from None
