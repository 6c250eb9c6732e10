"""Turning a decoder's next-word scores into captions: the frozen, validated generation config and the search.

``config`` holds :class:`GenerationConfig` (strategy, beam size, length limits, sampling, n-best) with its
bounds; ``step`` declares the ``StepDecoder`` calls a search makes (the PyTorch decoder, an ensemble, or the
ONNX Runtime graphs answer them) and how a step's scores are read; ``search`` runs greedy, sampled and
beam-searched decoding over a whole batch at once on any step decoder, and turns the results into
:class:`Caption` objects. It never imports ``models``: models use generation.
"""

# The public surface: its submodules. None is imported here: importing the package loads no PyTorch.
__all__ = ["config", "search", "step"]
