"""Turning a decoder's next-word scores into captions: the frozen, validated generation config and the search.

``config`` holds :class:`GenerationConfig` (strategy, beam size, length limits, sampling, n-best) with its
bounds; ``search`` runs greedy, sampled and beam-searched decoding over a whole batch at once, on any
object with the ``StepDecoder`` calls (the PyTorch decoder, an ensemble, or the ONNX Runtime graphs), and
turns the results into :class:`Caption` objects. It never imports ``models``: models use generation.
"""
