"""The networks and the model users hold: weights, preprocessing, encoder, decoder and the :class:`Captioner`.

``weights`` knows the torchvision backbones and where their ImageNet weights come from (offline package,
torchvision's cache, a user's file); ``preprocessing`` is the resize-crop-normalise those weights were
trained with; ``encoder`` is the CNN without its head; ``decoder`` is the Show-and-Tell LSTM (and
ensembles of it); ``onnx_engine`` exports both to ONNX Runtime graphs of our own making;
``captioner`` joins them into the checkpoint users load with ``from_pretrained`` and call ``caption``
or ``generate`` on. Models never import ``train`` or ``serve``.
"""

# The public surface: its submodules. None is imported here: importing the package loads no PyTorch.
__all__ = ["captioner", "decoder", "encoder", "onnx_cache", "onnx_engine", "pipeline", "preprocessing", "weights"]
