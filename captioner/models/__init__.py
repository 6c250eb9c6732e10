"""The networks and the model users hold: weights, preprocessing, encoder, decoder and the :class:`Captioner`.

``config`` declares the networks' options and names without PyTorch (what config files and ``--help`` read);
``weights`` knows the torchvision backbones and where their ImageNet weights come from (offline package,
torchvision's cache, a user's file); ``preprocessing`` is the resize-crop-normalise those weights were
trained with; ``encoder`` is the CNN without its head; ``decoder`` is the Show-and-Tell LSTM (and
ensembles of it); ``onnx_engine`` exports both to ONNX Runtime graphs of our own making, which
``onnx_cache`` keeps per user; ``captioner`` joins them into the checkpoint users load with ``from_pretrained``
and call ``caption`` or ``generate`` on; ``pipeline`` is the captioning steps every front end shares. Models never
import ``train``, ``bulk`` or ``serve``.
"""

# The public surface: its submodules. None is imported here: importing the package loads no PyTorch.
__all__ = ["captioner", "config", "decoder", "encoder", "onnx_cache", "onnx_engine", "pipeline", "preprocessing",
           "weights"]
