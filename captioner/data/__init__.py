"""What comes in from disk: photos, caption files and the vocabulary, each read once, checked and bounded.

``images`` opens any image input safely (size, pixel count, decompression bombs, odd modes); ``vocab``
tokenises captions and maps words to ids; ``annotations`` reads COCO and Karpathy caption files into
image/caption pairs; ``loader`` batches preprocessed photos from worker processes for every stage that
reads many of them. Nothing here knows about networks: this layer imports only the root modules.
"""

# The public surface: its submodules. None is imported here: importing the package loads no PyTorch.
__all__ = ["annotations", "images", "loader", "vocab"]
