"""The Show-and-Tell LSTM decoder.

The image feature vector is projected to the word-embedding size and fed to the LSTM as its first
input; the words follow, starting with ``<start>``. Training uses teacher forcing over packed
variable-length sequences (:meth:`Decoder.forward`); inference feeds each chosen word back through
:meth:`Decoder.step`, the single step function every decoding strategy shares (the step-decoder protocol of
:mod:`captioner.generation.step`).

An ensemble (:class:`DecoderEnsemble`, ``members`` > 1; an ensemble of one decoder is that decoder) is
several decoders of one shape trained apart (different seeds) over the same vocabulary and encoder. It
answers the same calls: its state is the members' states stacked, and each step averages the members'
next-word probabilities, so the one batched search in :mod:`captioner.generation.search` decodes it unchanged.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..data.vocab import PAD_ID
from ..errors import ConfigError
from ..generation.step import State, checked, next_log_probs
from .config import DecoderConfig

# Up to this many rows per step, CPU inference runs the LSTM's equations written out (see step()).
SMALL_STEP_ROWS = 32


def weight_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weights of the decoder ``config`` describes, computed without allocating them."""
    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in build_decoder(config).state_dict().items()}


def build_decoder(config: DecoderConfig) -> "Decoder | DecoderEnsemble":
    """The module a checkpoint's decoder configuration describes: one decoder, or an ensemble of them."""
    return Decoder(config) if config.members == 1 else DecoderEnsemble(config)


def join_decoders(decoders: list[Decoder]) -> Decoder | DecoderEnsemble:
    """A module holding copies of the weights of ``decoders``, which must share one configuration: their ensemble,
    or for one decoder a plain copy of it, as :func:`build_decoder` builds them (so that saved, either loads back)."""
    shape = lambda config: replace(config, dropout=0.0, input_dropout=0.0)  # noqa: E731 (dropout is training-only)
    if not decoders or any(shape(d.config) != shape(decoders[0].config) for d in decoders):
        raise ConfigError("ensemble members must have the same feature, vocabulary, embedding, hidden and layer sizes")
    joined = build_decoder(replace(decoders[0].config, members=len(decoders)))
    for member, decoder in zip(joined.decoders(), decoders):
        member.load_state_dict(decoder.state_dict())
    return joined


def average_probabilities(log_probs: list[torch.Tensor]) -> torch.Tensor:
    """``log(mean(p_i))`` of the members' log-probabilities: the ensemble's own normalised log-probabilities.

    Written as elementwise operations (shifted by the members' maximum, as ``logsumexp`` does) rather than
    ``logsumexp`` over a stacked axis: exported to ONNX, that reduction took a large share of an ensemble
    step in ONNX Runtime, these operations a small one (measured with benchmarks/onnx_speed.py).
    """
    peak = functools.reduce(torch.maximum, log_probs)
    total = functools.reduce(torch.add, [(member - peak).exp() for member in log_probs])
    return peak + total.log() - math.log(len(log_probs))


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        if config.members != 1:
            raise ConfigError(f"a Decoder is one member; build {config.members} with DecoderEnsemble")
        self.config = config
        self.image_projection = nn.Sequential(nn.Linear(config.feature_size, config.embed_size), nn.LayerNorm(config.embed_size))
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(config.embed_size, config.hidden_size, config.num_layers, batch_first=True,
                            dropout=config.dropout if config.num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(config.dropout)
        self.input_dropout = nn.Dropout(config.input_dropout)
        self.output = nn.Linear(config.hidden_size, config.vocab_size)

    def decoders(self) -> list[Decoder]:
        """The decoders whose probabilities it gives: itself (an ensemble answers its members)."""
        return [self]

    def image_input(self, features: torch.Tensor) -> torch.Tensor:
        return self.input_dropout(self.image_projection(self.input_dropout(features)))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                sampling_probability: float = 0.0, valid_only: bool = False) -> torch.Tensor:
        """Teacher-forced logits for ``tokens[:, 1:]``.

        ``tokens`` is ``<start> w1 .. wn <end> <pad>..`` with ``lengths`` counting ``<start>`` and
        ``<end>``. The LSTM reads ``[image, <start>, w1 .. wn]``; output ``t`` predicts token ``t``.
        Returns ``(B, T - 1, vocab_size)`` (positions past a caption's end are padding), or with
        ``valid_only`` just the ``(N, vocab_size)`` rows of real targets, ``tokens[:, 1:][tokens[:, 1:] !=
        <pad>]``: training skips the output layer's work on padding that way.
        With ``sampling_probability`` > 0 (scheduled sampling), each input word is replaced, with that
        probability, by the model's own previous prediction; this runs step by step, hence slower.
        """
        valid = tokens[:, 1:] != PAD_ID
        if sampling_probability > 0:
            logits = self._scheduled_sampling(features, tokens, sampling_probability)
            return logits[valid] if valid_only else logits
        words = self.input_dropout(self.embedding(tokens[:, :-1]))
        inputs = torch.cat([self.image_input(features).unsqueeze(1), words], 1)
        packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = self.lstm(packed)
        hidden, _ = pad_packed_sequence(hidden, batch_first=True, total_length=tokens.size(1))
        hidden = hidden[:, 1:]
        return self.output(self.dropout(hidden[valid] if valid_only else hidden))

    def _scheduled_sampling(self, features: torch.Tensor, tokens: torch.Tensor, probability: float) -> torch.Tensor:
        state = self.init_state(features)
        previous, outputs = tokens[:, 0], []
        for t in range(1, tokens.size(1)):
            logits, state = self.step(previous, state)
            outputs.append(logits)
            own = logits.detach().argmax(-1)
            use_own = (torch.rand(own.shape, device=own.device) < probability) & (tokens[:, t] != PAD_ID)
            previous = torch.where(use_own, own, tokens[:, t])
        return torch.stack(outputs, 1)

    def init_state(self, features: torch.Tensor) -> State:
        """Run the image through the LSTM: the state from which ``<start>`` is read."""
        _, state = self.lstm(self.image_input(features).unsqueeze(1))
        return state

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One decoding step: previous tokens ``(N,)`` -> next-token logits ``(N, vocab_size)``."""
        inputs = self.input_dropout(self.embedding(tokens))
        if self.training or inputs.device.type != "cpu" or len(inputs) > SMALL_STEP_ROWS:
            hidden, state = self.lstm(inputs.unsqueeze(1), state)
            return self.output(self.dropout(hidden[:, 0])), state
        hidden, state = self._lstm_cell_step(inputs, state)
        return self.output(hidden), state

    def _lstm_cell_step(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """The LSTM's equations for one step, written out (inference only: no dropout between layers).

        On the CPU, oneDNN's LSTM kernel costs more than this for the few rows of a single image's search,
        and less for a large batch (benchmarks/decode_speed.py measures both).
        """
        hiddens, cells = [], []
        for layer in range(self.config.num_layers):
            weights = [getattr(self.lstm, f"{name}_l{layer}") for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")]
            inputs, cell = lstm_cell(F.linear(inputs, weights[0], weights[1]), F.linear(state[0][layer], weights[2], weights[3]),
                                     state[1][layer])
            hiddens.append(inputs)
            cells.append(cell)
        return inputs, (torch.stack(hiddens), torch.stack(cells))


def lstm_cell(input_gates: torch.Tensor, hidden_gates: torch.Tensor, cell: torch.Tensor) -> State:
    """One LSTM cell update from its gates' two halves, ``W_ih x + b_ih`` and ``W_hh h + b_hh``: ``(h, c)``."""
    input_gate, forget_gate, candidate, output_gate = (input_gates + hidden_gates).chunk(4, -1)
    cell = forget_gate.sigmoid() * cell + input_gate.sigmoid() * candidate.tanh()
    return output_gate.sigmoid() * cell.tanh(), cell


class DecoderEnsemble(nn.Module):
    """``config.members`` decoders decoded as one: the inference calls of :class:`Decoder`, members averaged.

    The state is the members' LSTM states concatenated along the layer axis, ``(members * num_layers, N,
    hidden_size)``, so searches reorder it like a single decoder's. Its outputs are normalised
    log-probabilities (the log of the members' mean probability), which ``log_softmax`` leaves unchanged.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        if config.members < 2:  # one decoder is saved and loaded as a plain Decoder, never as members.0.*
            raise ConfigError("an ensemble has 2 or more members; build one decoder with Decoder")
        self.config = config
        self.members = nn.ModuleList(Decoder(replace(config, members=1)) for _ in range(config.members))

    def decoders(self) -> list[Decoder]:
        return [member for member in self.members if isinstance(member, Decoder)]

    def split(self, state: State) -> list[State]:
        layers = self.config.num_layers
        return [(state[0][i:i + layers], state[1][i:i + layers]) for i in range(0, state[0].size(0), layers)]

    def init_state(self, features: torch.Tensor) -> State:
        states = [member.init_state(features) for member in self.decoders()]
        return torch.cat([h for h, _ in states]), torch.cat([c for _, c in states])

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        outputs = [member.step(tokens, member_state) for member, member_state in zip(self.decoders(), self.split(state))]
        log_probs = average_probabilities([F.log_softmax(logits.float(), -1) for logits, _ in outputs])
        return log_probs, (torch.cat([h for _, (h, _) in outputs]), torch.cat([c for _, (_, c) in outputs]))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-probabilities for ``tokens[:, 1:]`` (scoring; ensembles are not trained as one)."""
        return average_probabilities([F.log_softmax(member(features, tokens, lengths).float(), -1)
                                      for member in self.decoders()])


def sequence_log_probs(decoder: Decoder | DecoderEnsemble, features: torch.Tensor, tokens: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-likelihood of each caption (words plus ``<end>``): ``(B,)``."""
    logits = decoder(features, tokens, lengths)
    log_probs = checked(next_log_probs(logits)).gather(2, tokens[:, 1:, None])[:, :, 0]
    mask = tokens[:, 1:] != PAD_ID
    return (log_probs * mask).sum(1)
