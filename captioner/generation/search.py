"""Turning decoder outputs into captions: greedy, sampling and beam search, all batched.

Every strategy advances all images (and all beams or samples) together, one tensor operation per
step, through :meth:`Decoder.step`. Finished hypotheses stay in place and only extend with
``<pad>`` at log-probability 0, so no per-image Python bookkeeping is needed; the decoder itself is
only asked for the rows still being written (:func:`step_unfinished`).

Scores: ``log_prob`` is always the model's own log-likelihood of the words plus ``<end>`` (the
log-softmax of the unmodified logits), whatever masks, temperature or filters steered the search;
``score`` is what beams are ranked by, ``log_prob / length ** length_penalty`` (length counts the
words plus ``<end>``).

NaN scores (unusable weights) are searched as zeros, so that no draw or ranking fails on them, and reported
once at the end as a :class:`DecodingError`: a check every step would wait for the GPU every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..data.vocab import END_ID, PAD_ID, START_ID, UNK_ID, Vocabulary
from ..errors import DecodingError
from .config import GenerationConfig
from .step import UNUSABLE_SCORES, State, StepDecoder, next_log_probs


@dataclass
class Caption:
    """One generated caption with the model's confidence in it."""

    text: str
    tokens: list[str]
    log_prob: float
    token_log_probs: list[float] = field(default_factory=list)  # one per token, then one for <end>
    score: float = 0.0

    @property
    def probability(self) -> float:
        return float(torch.tensor(self.log_prob).exp())


class Hypotheses(NamedTuple):
    tokens: torch.Tensor  # (B, n, T) ids, <end> then <pad> after the caption
    token_log_probs: torch.Tensor  # (B, n, T), 0 after <end>
    scores: torch.Tensor  # (B, n) ranking scores, best first


@torch.inference_mode()
def generate(decoder: StepDecoder, features: torch.Tensor, config: GenerationConfig) -> Hypotheses:
    """Decode a batch of image features with ``config``'s strategy (validated when it was made)."""
    if config.strategy == "beam":
        return beam_search(decoder, features, config)
    return sample_or_greedy(decoder, features, config)


def to_captions(hypotheses: Hypotheses, vocab: Vocabulary) -> list[list[Caption]]:
    results = []
    for tokens, log_probs, scores in zip(*(t.cpu() for t in hypotheses)):
        row = []
        for ids, lps, score in zip(tokens.tolist(), log_probs.tolist(), scores.tolist()):
            length = ids.index(END_ID) + 1 if END_ID in ids else len(ids)
            words = vocab.tokens(ids[:length])
            row.append(Caption(vocab.decode(ids[:length]), words, float(sum(lps[:length])), lps[:length], score))
        results.append(row)
    return results


def constrain(log_probs: torch.Tensor, history: torch.Tensor, step: int, config: GenerationConfig) -> torch.Tensor:
    """Mask (in place) tokens the options forbid at ``step`` (words generated so far)."""
    log_probs[:, PAD_ID] = log_probs[:, START_ID] = float("-inf")
    if config.suppress_unk:
        log_probs[:, UNK_ID] = float("-inf")
    if step < config.min_length:
        log_probs[:, END_ID] = float("-inf")
    if step >= config.max_length:
        end = log_probs[:, END_ID].clone()
        log_probs.fill_(float("-inf"))
        log_probs[:, END_ID] = torch.where(torch.isinf(end), torch.zeros_like(end), end)
    n = config.no_repeat_ngram_size
    if n and history.size(1) >= n:
        windows = history.unfold(1, n, 1)  # (N, W, n): every n-gram generated so far
        prefix = history[:, history.size(1) - n + 1:] if n > 1 else history[:, :0]
        matches = (windows[:, :, :-1] == prefix.unsqueeze(1)).all(-1) & (windows[:, :, -1] > END_ID)
        banned = torch.zeros_like(log_probs).scatter_add_(1, windows[:, :, -1], matches.to(log_probs.dtype))
        log_probs.masked_fill_(banned > 0, float("-inf"))
    return log_probs


def step_unfinished(decoder: StepDecoder, tokens: torch.Tensor, state: State,
                    done: torch.Tensor) -> tuple[torch.Tensor, State]:
    """``decoder.step`` computed for the rows not ``done`` only; finished rows get zeros and keep their state.
    A finished row's outputs are never read (it only extends with ``<pad>``), yet in a batch most rows
    finish well before the longest caption: skipping them saved about a third of the decoder's work for
    32 COCO photos at beam 3 (``benchmarks/bulk_caption.py``).
    """
    if not done.any():
        return decoder.step(tokens, state)
    live = (~done).nonzero()[:, 0]
    logits, (h, c) = decoder.step(tokens[live], (state[0][:, live], state[1][:, live]))
    all_logits = logits.new_zeros((len(tokens), logits.size(1)))
    all_logits[live] = logits
    all_h, all_c = state[0].clone(), state[1].clone()
    all_h[:, live], all_c[:, live] = h, c
    return all_logits, (all_h, all_c)


def searchable(logits: torch.Tensor, unusable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's log-probabilities with NaN read as 0, and ``unusable`` (a flag on the device) raised if there was
    any: no host sync, unlike ``if isnan(...).any()``. :func:`report_unusable` reads the flag once, at the end."""
    log_probs = next_log_probs(logits)
    return torch.nan_to_num(log_probs, nan=0.0, neginf=float("-inf")), unusable | torch.isnan(log_probs).any()


def report_unusable(unusable: torch.Tensor) -> None:
    """The one host sync of the NaN check: a :class:`DecodingError` if any step's scores were NaN."""
    if unusable:
        raise DecodingError(UNUSABLE_SCORES)


def sample_or_greedy(decoder: StepDecoder, features: torch.Tensor, config: GenerationConfig) -> Hypotheses:
    """Greedy (argmax) or sampling (temperature, top-k, top-p) decoding, ``n`` samples per image."""
    batch = features.size(0)
    n = config.num_return_sequences
    features = features.repeat_interleave(n, 0)
    generator = None
    if config.strategy == "sample" and config.seed is not None:
        generator = torch.Generator(device=features.device).manual_seed(config.seed)
    state = decoder.init_state(features)
    tokens = torch.full((features.size(0),), START_ID, dtype=torch.long, device=features.device)
    done = torch.zeros_like(tokens, dtype=torch.bool)
    history: list[torch.Tensor] = []
    chosen_lps: list[torch.Tensor] = []
    unusable = torch.zeros((), dtype=torch.bool, device=features.device)
    for step in range(config.max_length + 1):
        logits, state = step_unfinished(decoder, tokens, state, done)
        log_probs, unusable = searchable(logits, unusable)
        allowed = constrain(log_probs.clone(), _stack(history, tokens), step, config)
        if config.strategy == "greedy":
            tokens = allowed.argmax(-1)
        else:
            tokens = _sample(allowed / config.temperature, config, generator)  # log-softmax = logits - constant
        token_lp = log_probs.gather(1, tokens[:, None])[:, 0]
        tokens = tokens.masked_fill(done, PAD_ID)
        history.append(tokens)
        chosen_lps.append(token_lp.masked_fill(done, 0.0))
        done = done | (tokens == END_ID)
        if done.all():
            break
    report_unusable(unusable)
    ids, lps = torch.stack(history, 1), torch.stack(chosen_lps, 1)
    lengths = (ids != PAD_ID).sum(1)
    scores = lps.sum(1) / lengths.float().pow(config.length_penalty)
    scores, order = scores.view(batch, n).sort(1, descending=True)
    pick = lambda t: t.view(batch, n, -1).gather(1, order[:, :, None].expand(-1, -1, t.size(1)))
    return Hypotheses(pick(ids), pick(lps), scores)


def _stack(history: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(history, 1) if history else like.new_empty((like.size(0), 0))


def _sample(logits: torch.Tensor, config: GenerationConfig, generator) -> torch.Tensor:
    """Draw one token per row from ``softmax(logits)`` after the top-k and top-p filters."""
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.size(-1)), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keep the token crossing p
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def beam_search(decoder: StepDecoder, features: torch.Tensor, config: GenerationConfig) -> Hypotheses:
    """Batched beam search: all images x all beams advance as one tensor per step.

    Candidates are ranked by ``log_prob / length ** length_penalty``; a finished beam keeps its
    slot and competes with its final score. With ``beam_size=1`` this is exactly greedy decoding.
    """
    batch, beams, device = features.size(0), config.beam_size, features.device
    rows = batch * beams
    h, c = decoder.init_state(features)
    state = (h.repeat_interleave(beams, 1), c.repeat_interleave(beams, 1))
    totals = torch.full((batch, beams), float("-inf"), device=device)
    totals[:, 0] = 0.0  # identical beams at the start: only one is live
    totals = totals.view(-1)
    tokens = torch.full((rows,), START_ID, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, device=device)
    history = torch.empty((rows, 0), dtype=torch.long, device=device)
    history_lps = torch.empty((rows, 0), device=device)
    offsets = (torch.arange(batch, device=device) * beams)[:, None]
    unusable = torch.zeros((), dtype=torch.bool, device=device)
    for step in range(config.max_length + 1):
        logits, state = step_unfinished(decoder, tokens, state, done)
        log_probs, unusable = searchable(logits, unusable)
        candidates = constrain(log_probs.clone(), history, step, config)
        candidates[done] = float("-inf")
        candidates[done, PAD_ID] = 0.0
        new_totals = totals[:, None] + candidates  # (rows, V)
        new_lengths = lengths + (~done).float()
        ranking = new_totals / new_lengths.clamp(min=1).pow(config.length_penalty)[:, None]
        top = ranking.view(batch, -1).topk(beams, 1).indices  # (B, K) over K*V candidates
        source = (offsets + top // candidates.size(1)).view(-1)
        tokens = (top % candidates.size(1)).view(-1)
        totals = new_totals.view(batch, -1).gather(1, top).view(-1)
        token_lp = log_probs[source, tokens].masked_fill(done[source], 0.0)
        state = (state[0][:, source], state[1][:, source])
        history = torch.cat([history[source], tokens[:, None]], 1)
        history_lps = torch.cat([history_lps[source], token_lp[:, None]], 1)
        lengths, done = new_lengths[source], done[source] | (tokens == END_ID)
        if done.all():
            break
    report_unusable(unusable)
    scores = (totals / lengths.pow(config.length_penalty)).view(batch, beams)
    scores, order = scores.sort(1, descending=True)
    n = config.num_return_sequences
    order, scores = order[:, :n], scores[:, :n]
    pick = lambda t: t.view(batch, beams, -1).gather(1, order[:, :, None].expand(-1, -1, t.size(1)))
    return Hypotheses(pick(history), pick(history_lps), scores)
