"""How to decode: :class:`GenerationConfig`, frozen and checked when it is made, with its bounds.

The same fields, names and limits serve the API (``generate(images, config, **overrides)``), the CLI
flags and the demo's controls, so a value is refused the same way whichever way it comes in.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

from ..bounds import check_fields, check_object, check_options, from_dict, option
from ..errors import ConfigError

log = logging.getLogger(__name__)

STRATEGIES = ("beam", "greedy", "sample")


MAX_BEAM_SIZE = MAX_RETURN_SEQUENCES = 64  # bounds memory: batch x 64 rows x vocabulary per step
MAX_LENGTH = 100  # words; bounds time (steps) and memory (the history of every row)


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options; the same names are API keywords, CLI flags and app controls.

    Each field's bounds live in its metadata and are enforced on construction (strict types: ``True``
    is not an ``int``), so a bad value from an option, a config file or a checkpoint fails the same way.
    Frozen, so that no field changes without that check: :meth:`updated` builds a new, checked config.
    """

    strategy: str = option("beam", "beam search, greedy, or sampling", choices=STRATEGIES)
    beam_size: int = option(3, "beams kept per image", range=(1, MAX_BEAM_SIZE))
    num_return_sequences: int = option(1, "captions returned per image (n-best list or samples)",
                                       range=(1, MAX_RETURN_SEQUENCES))
    max_length: int = option(20, "longest caption in words (<end> is forced after this many)", range=(1, MAX_LENGTH))
    min_length: int = option(1, "shortest caption in words", range=(0, MAX_LENGTH))
    length_penalty: float = option(0.0, "rank beams by log-prob / length ** this (0 = raw log-prob; >0 favours "
                                        "longer)", range=(-5.0, 5.0))
    no_repeat_ngram_size: int = option(0, "never repeat an n-gram of this size (0 = off)", range=(0, 10))
    suppress_unk: bool = option(True, "never output <unk>")
    temperature: float = option(1.0, "sampling temperature", range=(1e-4, 100.0))
    top_k: int = option(0, "sample among the k likeliest words (0 = all)", range=(0, 1_000_000))
    top_p: float = option(1.0, "sample among the likeliest words holding this much probability (1 = all)",
                          range=(1e-9, 1.0))
    seed: int | None = option(None, "random seed for sampling", range=(0, 2**63 - 1))

    def __post_init__(self) -> None:
        check_fields(self, ConfigError)
        if self.strategy == "beam" and self.num_return_sequences > self.beam_size:
            # An n-best list needs as many beams; a config that says otherwise is refused, as Hugging Face does,
            # rather than quietly changed. updated() widens the beam when only the number of captions is given.
            raise ConfigError(f"num_return_sequences ({self.num_return_sequences}) cannot exceed beam_size "
                              f"({self.beam_size}) in beam search; ask for a beam at least as wide, or leave beam_size "
                              "out to widen it")
        if self.strategy == "greedy" and self.num_return_sequences != 1:
            raise ConfigError("greedy decoding returns one caption; use beam or sample for several")
        if self.min_length > self.max_length:
            raise ConfigError("min_length cannot exceed max_length")

    def updated(self, **options) -> "GenerationConfig":
        """A copy with ``options`` applied (``None`` values keep the current setting), checked on construction.

        Asking beam search for more captions (``num_return_sequences``) than this config's beams, without giving
        ``beam_size``, widens the beam to as many (logged): ``generate(x, num_return_sequences=5)`` and
        ``captioner caption --num-captions 5`` just work. Giving both, inconsistent, is refused.
        """
        check_object(GenerationConfig, options, "decoding option")
        given = {k: v for k, v in options.items() if v is not None}
        check_options(GenerationConfig, given, what="decoding option")  # each in its bounds before they combine
        wanted, strategy = given.get("num_return_sequences"), given.get("strategy", self.strategy)
        if strategy == "beam" and "beam_size" not in given and wanted is not None and wanted > self.beam_size:
            log.info("beam_size raised from %d to %d to return %d captions", self.beam_size, wanted, wanted)
            given["beam_size"] = wanted
        return replace(self, **given)

    @classmethod
    def from_dict(cls, data: object, where: str = "generation") -> "GenerationConfig":
        """A checked config from a JSON object (a checkpoint's ``generation``), every problem naming ``where``."""
        try:
            return from_dict(cls, data, "decoding option")
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)
