"""The step-decoder protocol: what a search asks of a decoder, and how a step's scores are read.

Declared here, below both sides: the decoders of ``models`` (and the ONNX Runtime graphs) implement it, the
searches of :mod:`captioner.generation.search` drive it, and neither depends on the other's internals.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import DecodingError

State = tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), each (num_layers, N, hidden_size)

UNUSABLE_SCORES = "the decoder's next-word scores are NaN or infinite; its weights are unusable"


class StepDecoder(Protocol):
    """What decoding needs of a decoder: :class:`Decoder`, :class:`DecoderEnsemble`, or ONNX Runtime's (``onnx_engine``)."""

    def init_state(self, features: torch.Tensor) -> State: ...

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...


def next_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax of a step's logits, in float32 (an ensemble's outputs are normalised already: unchanged).

    NaN (from NaN or overflowing logits: finite but huge weights) is not checked here, since reading a tensor's
    values on the host waits for the GPU: a search checks once, at its end; :func:`checked` checks now.
    """
    return F.log_softmax(logits.float(), -1)


def checked(log_probs: torch.Tensor) -> torch.Tensor:
    """``log_probs``, or :class:`DecodingError` if any is NaN: no caption can be ranked by it, and a NaN
    log-probability is not valid JSON. A host sync: call it once per result, not once per step."""
    if torch.isnan(log_probs).any():
        raise DecodingError(UNUSABLE_SCORES)
    return log_probs
