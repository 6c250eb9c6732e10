"""The public model: ``Captioner`` = encoder + decoder + vocabulary + default decoding options.

``from_pretrained`` / ``save_pretrained`` read and write checkpoint directories; ``encode`` turns
images into feature vectors once, and ``generate`` / ``caption`` / ``score`` accept either images
or those features, so a photo never goes through the CNN twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from torch import nn

from . import checkpoint, onnx_engine
from .decoder import Decoder, DecoderConfig
from .decoding import Caption, GenerationConfig, generate, sequence_log_probs, to_captions
from .encoder import Encoder, EncoderConfig, resolve_weights
from .errors import CheckpointError, ConfigError
from .images import ImageInput, load_image
from .vocab import END_ID, START_ID, PAD_ID, Vocabulary

FORMAT_VERSION = 1
# assets/ sits beside the package in a checkout and inside it (captioner/assets) in an installed wheel.
_PACKAGE = Path(__file__).resolve().parent
ASSETS = _PACKAGE / "assets" if (_PACKAGE / "assets").is_dir() else _PACKAGE.parent / "assets"
BUNDLED_MODEL = ASSETS / "model"
Inputs = Union[ImageInput, Sequence[ImageInput], torch.Tensor]


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA, then Apple's MPS, then the CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a model and its preprocessing: ``config.json``."""

    encoder: EncoderConfig
    decoder: DecoderConfig
    generation: GenerationConfig

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "encoder": self.encoder.to_dict(),
                "decoder": self.decoder.to_dict(), "generation": self.generation.to_dict()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "CaptionerConfig":
        try:
            if data.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(f"{source}: unsupported format_version {data.get('format_version')!r}")
            generation = GenerationConfig(**data.get("generation", {}))
            generation.validate()
            return cls(EncoderConfig.from_dict(data["encoder"]), DecoderConfig(**data["decoder"]), generation)
        except (KeyError, TypeError, ConfigError, AttributeError) as exc:
            raise CheckpointError(f"{source}: invalid model configuration ({exc})") from None


class Captioner(nn.Module):
    """An image captioner: ``Captioner.from_pretrained().caption("photo.jpg")``."""

    def __init__(self, encoder: Encoder, decoder: Decoder, vocab: Vocabulary,
                 generation: GenerationConfig | None = None):
        super().__init__()
        if decoder.config.vocab_size != len(vocab):
            raise CheckpointError(f"decoder expects {decoder.config.vocab_size} words, vocabulary has {len(vocab)}")
        if decoder.config.feature_size != encoder.config.feature_size:
            raise CheckpointError(f"decoder expects {decoder.config.feature_size}-d features, "
                                  f"encoder {encoder.config.name} gives {encoder.config.feature_size}")
        self.encoder, self.decoder, self.vocab = encoder, decoder, vocab
        self.generation_config = generation or GenerationConfig()
        self.onnx_runtime: onnx_engine.OnnxRuntime | None = None  # set: encode/generate run on ONNX Runtime
        self.eval()

    @property
    def config(self) -> CaptionerConfig:
        return CaptionerConfig(self.encoder.config, self.decoder.config, self.generation_config)

    @property
    def engine(self) -> str:
        """``"onnx"`` or ``"torch"``: what runs ``encode`` and ``generate`` (``score`` always runs on PyTorch)."""
        return "torch" if self.onnx_runtime is None else "onnx"

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                        encoder_weights: str | os.PathLike | None = None, engine: str = "auto") -> "Captioner":
        """Load a checkpoint directory; with no ``path``, the bundled model in ``assets/model``.

        Pretrained encoder weights are resolved as in training (see :mod:`captioner.encoder`) unless
        the checkpoint carries its own (fine-tuned or user-supplied); ``encoder_weights`` overrides.
        ``engine``: ``"torch"``, ``"onnx"`` (ONNX Runtime on the CPU, from the directory's ONNX export)
        or ``"auto"`` (ONNX Runtime when on the CPU with an export and onnxruntime installed).
        """
        if path is None:
            path = BUNDLED_MODEL
            if not (path / checkpoint.CONFIG_FILE).is_file():
                raise CheckpointError(f"the bundled model is missing from {path}; pass a checkpoint directory")
        path = checkpoint.check_directory(path)
        config = CaptionerConfig.from_dict(checkpoint.read_json(path / checkpoint.CONFIG_FILE), str(path))
        vocab = Vocabulary.load(path / checkpoint.VOCAB_FILE)
        if encoder_weights is not None:
            state, _, _ = resolve_weights(config.encoder.name, encoder_weights)
        elif (path / checkpoint.ENCODER_FILE).is_file():
            state = checkpoint.load_tensors(path / checkpoint.ENCODER_FILE)
        elif config.encoder.weights == "none" or config.encoder.weights.startswith(("file:", "checkpoint")):
            raise CheckpointError(f"{path}: {checkpoint.ENCODER_FILE} is missing (encoder weights "
                                  f"{config.encoder.weights!r} are not pretrained ones that can be fetched)")
        else:
            state, _, _ = resolve_weights(config.encoder.name, config.encoder.weights)
        encoder = Encoder(config.encoder, state)
        decoder = Decoder(config.decoder)
        weights = checkpoint.load_tensors(path / checkpoint.MODEL_FILE)
        expected = decoder.state_dict()
        mismatched = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if mismatched or missing or unexpected:
            detail = (f"shape of {mismatched[0]} is {tuple(weights[mismatched[0]].shape)}, config implies "
                      f"{tuple(expected[mismatched[0]].shape)}") if mismatched else (
                      f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            raise CheckpointError(f"{path}: weights do not match config.json ({detail})")
        decoder.load_state_dict({k: v.float() for k, v in weights.items()})
        device = pick_device("cpu" if engine == "onnx" and str(device) == "auto" else device)
        engine = onnx_engine.resolve_engine(engine, path, device, custom_encoder=encoder_weights is not None)
        model = cls(encoder, decoder, vocab, config.generation).to(device)
        if engine == "onnx":
            model.onnx_runtime = onnx_engine.load_runtime(path, config.encoder, config.decoder)
        return model

    def save_pretrained(self, path: str | os.PathLike, half_precision: bool = False,
                        extra_files: dict[str, callable] | None = None) -> Path:
        """Write a checkpoint directory atomically (config, vocab, safetensors weights).

        Encoder weights are stored only when they cannot be fetched again: fine-tuned, random or from
        a user's file. ``half_precision`` stores decoder weights as float16 (half the size).
        ``extra_files`` maps file names to ``writer(path)`` callables (training state).
        """
        with checkpoint.atomic_directory(path) as directory:
            checkpoint.write_json(directory / checkpoint.CONFIG_FILE, self.config.to_dict())
            self.vocab.save(directory / checkpoint.VOCAB_FILE)
            weights = self.decoder.state_dict()
            if half_precision:
                weights = {k: v.half() for k, v in weights.items()}
            checkpoint.save_tensors(weights, directory / checkpoint.MODEL_FILE)
            if not self.encoder.config.weights.count("_Weights."):
                checkpoint.save_tensors(self.encoder.backbone.state_dict(), directory / checkpoint.ENCODER_FILE)
            for name, writer in (extra_files or {}).items():
                writer(directory / name)
        return Path(path)

    # ---------------------------------------------------------------- inference
    @torch.inference_mode()
    def encode(self, images: ImageInput | Sequence[ImageInput], batch_size: int | None = None) -> torch.Tensor:
        """Encoder features ``(N, feature_size)`` for a list of images, reusable by ``generate``.

        ``batch_size`` images go through the CNN together: by default one at a time on the CPU, where
        larger chunks were measured slower per image (benchmarks/decode_speed.py), and 32 on a GPU.
        """
        images = _as_list(images)
        batch_size = batch_size or (1 if self.device.type == "cpu" else 32)
        encoder = self.encoder if self.onnx_runtime is None else self.onnx_runtime.encoder
        chunks = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([self.encoder.preprocess(load_image(image)) for image in images[start:start + batch_size]])
            chunks.append(encoder(pixels.to(self.device)))
        if not chunks:
            return torch.empty((0, self.encoder.config.feature_size), device=self.device)
        return torch.cat(chunks)

    def generate(self, inputs: Inputs, batch_size: int = 32, **options) -> list[list[Caption]]:
        """Captions for each image (or feature row): a list of ``num_return_sequences`` per image.

        Options (``strategy``, ``beam_size``, ``num_return_sequences``, ``max_length``, ``temperature``,
        ``top_k``, ``top_p``, ``length_penalty``, ...) default to the model's generation config.
        Images are processed ``batch_size`` at a time, so memory stays bounded for long lists.
        """
        config = self.generation_config.updated(**options)
        decoder = self.decoder if self.onnx_runtime is None else self.onnx_runtime.decoder
        results: list[list[Caption]] = []
        for features in self._feature_batches(inputs, batch_size):
            results.extend(to_captions(generate(decoder, features, config), self.vocab))
        return results

    def caption(self, images: ImageInput | Sequence[ImageInput] | torch.Tensor, **options) -> str | list[str]:
        """The best caption: a ``str`` for one image, a ``list[str]`` for a list (or feature batch)."""
        texts = [captions[0].text for captions in self.generate(images, **options)]
        return texts if _is_batch(images) else texts[0]

    @torch.inference_mode()
    def score(self, images: Inputs, captions: str | Sequence[str]) -> float | list[float]:
        """Log-likelihood of each given caption (words plus ``<end>``) for the matching image.

        Words outside the vocabulary count as ``<unk>``. Runs on PyTorch whatever the engine: teacher
        forcing needs the decoder's ``forward``, which the ONNX export does not include.
        """
        batch = _is_batch(images)
        texts = [captions] if isinstance(captions, str) else list(captions)
        features = torch.cat(list(self._feature_batches(images, 64)))
        if len(texts) != len(features):
            raise ConfigError(f"got {len(features)} images but {len(texts)} captions")
        ids = [[START_ID, *self.vocab.encode(text), END_ID] for text in texts]
        tokens = torch.full((len(ids), max(map(len, ids))), PAD_ID, dtype=torch.long)
        for row, sequence in zip(tokens, ids):
            row[: len(sequence)] = torch.tensor(sequence)
        lengths = torch.tensor([len(sequence) for sequence in ids])
        scores = sequence_log_probs(self.decoder, features, tokens.to(self.device), lengths).tolist()
        return scores if batch else scores[0]

    def _feature_batches(self, inputs: Inputs, batch_size: int):
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.is_floating_point():
            if inputs.size(1) != self.encoder.config.feature_size:
                raise ConfigError(f"features have {inputs.size(1)} columns, the encoder gives "
                                  f"{self.encoder.config.feature_size}")
            for start in range(0, len(inputs), batch_size):
                yield inputs[start:start + batch_size].to(self.device)
            return
        images = _as_list(inputs)
        for start in range(0, len(images), batch_size):
            yield self.encode(images[start:start + batch_size])


def _is_batch(inputs) -> bool:
    if isinstance(inputs, torch.Tensor):
        return inputs.dim() == 2
    return isinstance(inputs, (list, tuple))


def _as_list(inputs) -> list:
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
