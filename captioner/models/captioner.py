"""The public model: ``Captioner`` = encoder + decoder + vocabulary + default decoding options.

``from_pretrained`` / ``save_pretrained`` read and write checkpoint directories; ``encode`` turns
images into feature vectors once, and ``generate`` / ``caption`` / ``score`` accept either images
or those features, so a photo never goes through the CNN twice.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .. import checkpoint
from ..bounds import check_object, check_value, from_dict
from ..data.images import ImageInput
from ..data.vocab import END_ID, START_ID, Vocabulary, pad
from ..errors import CheckpointError, ConfigError
from ..generation.config import GenerationConfig
from ..generation.search import Caption, generate, to_captions
from ..runtime import BUNDLED_MODEL, pick_device
from . import onnx_engine
from .config import MAX_MEMBERS, DecoderConfig
from .decoder import Decoder, DecoderEnsemble, build_decoder, join_decoders, sequence_log_probs, weight_shapes
from .encoder import Encoder, EncoderConfig
from .weights import fetch_pretrained, resolve_weights

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
Inputs = Union[ImageInput, Sequence[ImageInput], torch.Tensor]


MAX_BATCH_SIZE = 4096  # images decoded together; bounds the memory of one step
LOAD_CHUNK = 64  # images held as pixels at once by encode()
MAX_THREADS = 1024
EXPORT_FORMATS = ("safetensors", "onnx")  # onnx: the weights and the three graphs of onnx_engine


def check_batch_size(batch_size: object) -> int:
    return check_value("batch_size", batch_size, int, (1, MAX_BATCH_SIZE))


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
    def from_dict(cls, data: object, source: str = "config") -> "CaptionerConfig":
        """Every value checked (types, bounds, consistency) before anything is built from it."""
        try:
            if not isinstance(data, dict):
                raise ConfigError("must be a JSON object")
            if data.get("format_version") != FORMAT_VERSION:
                raise ConfigError(f"unsupported format_version {str(data.get('format_version'))[:20]!r}")
            check_object(cls, {key: value for key, value in data.items() if key != "format_version"})
            encoder = EncoderConfig.from_dict(data.get("encoder"))
            decoder = from_dict(DecoderConfig, data.get("decoder"), where="decoder")
            if decoder.feature_size != encoder.feature_size:
                raise ConfigError(f"decoder expects {decoder.feature_size}-d features, encoder {encoder.name} gives "
                                  f"{encoder.feature_size}")
            return cls(encoder, decoder, GenerationConfig.from_dict(data.get("generation", {})))
        except (TypeError, ConfigError) as exc:
            raise CheckpointError(f"{source}: invalid model configuration ({exc})") from None


class Captioner(nn.Module):
    """An image captioner: ``Captioner.from_pretrained().caption("photo.jpg")``."""

    def __init__(self, encoder: Encoder, decoder: Decoder | DecoderEnsemble, vocab: Vocabulary,
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

    def __getstate__(self) -> dict:
        """Copies and pickles leave the ONNX Runtime sessions behind and run on PyTorch: the sessions compute a
        snapshot of these weights, which a copy is free to change."""
        return {**super().__getstate__(), "onnx_runtime": None}

    @property
    def config(self) -> CaptionerConfig:
        return CaptionerConfig(self.encoder.config, self.decoder.config, self.generation_config)

    @property
    def engine(self) -> str:
        """``"onnx"`` or ``"torch"``: what runs ``encode`` and ``generate`` (``score`` always runs on PyTorch)."""
        return "torch" if self._onnx() is None else "onnx"

    def _onnx(self) -> onnx_engine.OnnxRuntime | None:
        """The ONNX Runtime sessions while the weights are on the CPU they run on: moved to a GPU (``to("cuda")``),
        the model runs on PyTorch there, and back on the CPU it runs on the sessions again."""
        return self.onnx_runtime if self.onnx_runtime is not None and self.device.type == "cpu" else None

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                        encoder_weights: str | os.PathLike | None = None, engine: str = "auto",
                        num_threads: int | None = None) -> "Captioner":
        """Load a checkpoint directory.

        Args:
            path (str or os.PathLike, optional): the checkpoint directory (``config.json``, ``vocab.json``,
                ``model.safetensors``). Default: the bundled model in ``assets/model``.
            device (str or torch.device, optional): ``"auto"`` (CUDA, then Apple's MPS, then the CPU; the CPU
                for ``engine="onnx"``), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``. Default: ``"auto"``.
            encoder_weights (str or os.PathLike, optional): a file of encoder weights to use instead of the
                checkpoint's; the preprocessing the decoder learnt with stays. Default: the checkpoint's own
                (fine-tuned or user-supplied) if it carries them, else the pretrained ones, resolved as in training
                (see :func:`captioner.models.weights.resolve_weights`).
            engine (str, optional): ``"torch"``, ``"onnx"`` (ONNX Runtime on the CPU) or ``"auto"`` (ONNX Runtime
                when on the CPU and onnxruntime is installed). The ONNX engine runs graphs it exports itself from
                the loaded weights (cached per user, see :mod:`captioner.models.onnx_engine`), never graph files
                found in ``path``. Default: ``"auto"``.
            num_threads (int, optional): CPU threads of each ONNX Runtime session, 1 to 1024; bulk captioning runs
                two stages at once, each on half the cores (:func:`captioner.runtime.stage_threads`). Default:
                PyTorch's thread count.

        Returns:
            Captioner: the model, in eval mode, on ``device``.

        Raises:
            CheckpointError: the directory is missing, incomplete, unsafe or inconsistent.
            ConfigError: a bad ``device``, ``engine`` or ``num_threads``.
            WeightsError: no pretrained encoder weights could be found (the message lists every remedy).
        """
        if num_threads is not None:
            num_threads = check_value("num_threads", num_threads, int, (1, MAX_THREADS))
        if path is None:
            path = BUNDLED_MODEL
            if not (path / checkpoint.CONFIG_FILE).is_file():
                raise CheckpointError(f"the bundled model is missing from {path}; pass a checkpoint directory")
        path = checkpoint.check_directory(path)
        config = CaptionerConfig.from_dict(checkpoint.read_json(path / checkpoint.CONFIG_FILE), str(path))
        vocab = Vocabulary.load(path / checkpoint.VOCAB_FILE)
        if config.decoder.vocab_size != len(vocab):
            raise CheckpointError(f"{path}: config.json says {config.decoder.vocab_size} words, vocab.json has {len(vocab)}")
        # Shapes from the safetensors header before any module is built: a lying config.json costs nothing.
        weights_file = path / checkpoint.MODEL_FILE
        checkpoint.check_shapes(checkpoint.tensor_shapes(weights_file), weight_shapes(config.decoder),
                                f"{path}: weights do not match config.json")
        device = pick_device("cpu" if engine == "onnx" and str(device) == "auto" else device)
        requested, engine = engine, onnx_engine.resolve_engine(engine, device)
        stored = path / checkpoint.ENCODER_FILE
        if encoder_weights is not None:  # the weights change, the preprocessing the decoder learnt with stays
            state, identity, source = resolve_weights(config.encoder.name, encoder_weights)
            config = replace(config, encoder=replace(config.encoder, weights=identity))
        elif stored.is_file():
            state, source = checkpoint.load_tensors(stored), str(stored)
        elif config.encoder.weights.stored:
            raise CheckpointError(f"{path}: {checkpoint.ENCODER_FILE} is missing (encoder weights "
                                  f"'{config.encoder.weights}' are not pretrained ones that can be fetched)")
        else:
            state, source = fetch_pretrained(config.encoder.name, config.encoder.weights.enum)
        encoder = Encoder(config.encoder, state, source)
        weights = checkpoint.load_tensors(weights_file)
        checkpoint.check_values(weights, str(weights_file))
        decoder = build_decoder(config.decoder)
        decoder.load_state_dict({k: v.float() for k, v in weights.items()})
        model = cls(encoder, decoder, vocab, config.generation).to(device)
        if engine == "onnx":
            try:
                model.onnx_runtime = onnx_engine.load_runtime(model.encoder, model.decoder, num_threads)
            except CheckpointError as exc:
                if requested == "onnx":
                    raise
                log.warning("%s: ONNX Runtime engine unavailable (%s); running on PyTorch", path, exc)
        return model

    @classmethod
    def ensemble(cls, models: Sequence["Captioner"]) -> "Captioner":
        """One captioner whose decoding averages the next-word probabilities of ``models``' decoders.

        Members trained apart (e.g. with different seeds) on the same data must share the encoder
        (configuration and weights) and the vocabulary; the decoding defaults are the first model's.
        Members that are ensembles themselves contribute each of their decoders; an ensemble of one decoder
        is a copy of that model.
        """
        if not models:
            raise ConfigError("an ensemble needs at least one model")
        first = models[0]
        for number, model in enumerate(models[1:], 2):
            if model.vocab.words != first.vocab.words:
                raise ConfigError(f"model {number} has another vocabulary than model 1")
            mine, theirs = model.encoder.config, first.encoder.config
            if mine.weights.stored or theirs.weights.stored:  # the same tensors, whichever file they came from
                same = replace(mine, weights=theirs.weights) == theirs and _same_tensors(
                    model.encoder.weights_state_dict(), first.encoder.weights_state_dict())
            else:
                same = mine == theirs
            if not same:
                raise ConfigError(f"model {number} has another encoder than model 1")
        decoders = [member for model in models for member in model.decoder.decoders()]
        return cls(first.encoder, join_decoders(decoders), first.vocab, first.generation_config).to(first.device)

    def save_pretrained(self, path: str | os.PathLike, half_precision: bool = False,
                        extra_files: dict[str, Callable[[Path], None]] | None = None) -> Path:
        """Write a checkpoint directory atomically (config, vocab, safetensors weights).

        ``path`` must be missing, empty or a checkpoint of ours (:func:`captioner.checkpoint.check_replaceable`):
        the save replaces the whole folder, so a folder of anything else is refused untouched.
        Encoder weights are stored only when they cannot be fetched again: fine-tuned, random or from
        a user's file. ``half_precision`` stores the decoder's and any stored encoder's floating-point weights as
        float16 (half the size).
        ``extra_files`` maps file names to ``writer(path)`` callables (training state).
        """
        with checkpoint.atomic_directory(checkpoint.check_replaceable(path)) as directory:
            checkpoint.write_json(directory / checkpoint.CONFIG_FILE, self.config.to_dict())
            self.vocab.save(directory / checkpoint.VOCAB_FILE)
            stored = {checkpoint.MODEL_FILE: self.decoder.state_dict()}
            if self.encoder.config.weights.stored:
                stored[checkpoint.ENCODER_FILE] = self.encoder.weights_state_dict()
            for name, weights in stored.items():
                if half_precision:  # BatchNorm's step counter stays an integer
                    weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
                checkpoint.save_tensors(weights, directory / name)
            for name, writer in (extra_files or {}).items():
                writer(directory / name)
        return Path(path)

    # ---------------------------------------------------------------- inference
    def encode(self, images: ImageInput | Sequence[ImageInput], batch_size: int | None = None) -> torch.Tensor:
        """Encoder features ``(N, feature_size)`` for a list of images, reusable by ``generate``.

        Images are loaded ``LOAD_CHUNK`` at a time, so a long list never sits in memory as pixels.
        """
        images = _as_list(images)
        chunks = [torch.empty((0, self.encoder.config.feature_size), device=self.device)]
        for start in range(0, len(images), LOAD_CHUNK):
            pixels = torch.stack([self.encoder.pixels(image) for image in images[start:start + LOAD_CHUNK]])
            chunks.append(self.encode_pixels(pixels, batch_size))
        return torch.cat(chunks)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Run the CNN over preprocessed images ``(N, 3, H, W)`` (see ``Encoder.pixels``).

        ``batch_size`` images go through the CNN together: by default one at a time on the CPU, where
        larger chunks were measured slower per image (benchmarks/decode_speed.py), and 32 on a GPU.
        """
        if batch_size is None:
            batch_size = 1 if self.device.type == "cpu" else 32
        batch_size = check_batch_size(batch_size)
        runtime = self._onnx()
        encoder = self.encoder if runtime is None else runtime.encoder
        chunks = [torch.empty((0, self.encoder.config.feature_size), device=self.device)]
        for start in range(0, len(pixels), batch_size):
            chunks.append(encoder(pixels[start:start + batch_size].to(self.device)))
        return torch.cat(chunks)

    def generate(self, inputs: Inputs, generation_config: GenerationConfig | None = None, batch_size: int = 32,
                 **options) -> list[list[Caption]]:
        """Captions for each image (or feature row): a list of ``num_return_sequences`` per image.

        Decoding follows ``generation_config`` (default: the model's own), with any ``options``
        (``strategy``, ``beam_size``, ``num_return_sequences``, ``max_length``, ``temperature``, ``top_k``,
        ``top_p``, ``length_penalty``, ...) applied on top. Images are processed ``batch_size`` at a time,
        so memory stays bounded for long lists.
        """
        config = generation_config or self.generation_config
        if options:
            config = config.updated(**options)
        batch_size = check_batch_size(batch_size)
        runtime = self._onnx()
        decoder = self.decoder if runtime is None else runtime.decoder
        results: list[list[Caption]] = []
        for features in self._feature_batches(inputs, batch_size):
            results.extend(to_captions(generate(decoder, features, config), self.vocab))
        return results

    def caption(self, images: ImageInput | Sequence[ImageInput] | torch.Tensor, **options) -> str | list[str]:
        """The best caption: a ``str`` for one image, a ``list[str]`` for a list (or feature batch)."""
        texts = [captions[0].text for captions in self.generate(images, **options)]
        return texts if _is_batch(images) else texts[0]

    @torch.inference_mode()
    def classify(self, inputs: Inputs, top_k: int = 5) -> list[list[tuple[str, float]]] | list[tuple[str, float]]:
        """What the CNN recognises: its ImageNet head's ``top_k`` ``(label, probability)`` pairs per image.

        The labels come from ImageNet, not from the caption model; empty when the encoder's weights carry
        no ImageNet head. Accepts images or ``encode()`` features, like ``generate``.
        """
        top_k = check_value("top_k", top_k, int, (1, 1000))
        results = [row for features in self._feature_batches(inputs, 64) for row in self.encoder.classify(features, top_k)]
        return results if _is_batch(inputs) else results[0]

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
        tokens, lengths = pad(ids)
        scores = sequence_log_probs(self.decoder, features, tokens.to(self.device), lengths).tolist()
        return scores if batch else scores[0]

    def _feature_batches(self, inputs: Inputs, batch_size: int):
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 2:
            features = self._check_features(inputs)
            for start in range(0, len(features), batch_size):
                yield features[start:start + batch_size].to(self.device)
            return
        images = _as_list(inputs)
        for start in range(0, len(images), batch_size):
            yield self.encode(images[start:start + batch_size])

    def _check_features(self, features: torch.Tensor) -> torch.Tensor:
        """Feature rows given by a caller (e.g. from ``encode`` or a cache): float, finite, the encoder's width."""
        if not features.is_floating_point():
            raise ConfigError(f"features must be floating point, not {features.dtype}")
        if features.size(1) != self.encoder.config.feature_size:
            raise ConfigError(f"features have {features.size(1)} columns, the encoder gives "
                              f"{self.encoder.config.feature_size}")
        if not torch.isfinite(features).all():
            raise ConfigError("features hold NaN or infinite values")
        return features.to(next(self.decoder.parameters()).dtype)

def export_checkpoint(paths: Sequence[str | os.PathLike], out: str | os.PathLike, half_precision: bool = False,
                      format: str = "safetensors", options: dict | None = None) -> tuple[Path, Captioner]:
    """``captioner export``: load the checkpoints ``paths``, join several into an ensemble, and save them once.

    The weights, the default decoding (the first model's with ``options`` applied) and, for ``format="onnx"``,
    the graphs are written as one set into a folder swapped in whole, so a failed export leaves ``out`` as it
    was. ``out`` may be the one model itself only to add graphs beside its files (its training state stays).
    ``half_precision`` stores float16 weights, rounded first so that the graphs compute exactly those; a model
    stored in float16 and exported without it is widened to float32, with a warning. Returns ``out`` and the
    model saved.
    """
    from safetensors import safe_open

    options = options or {}
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {str(format)[:20]!r}")
    if len(paths) > MAX_MEMBERS:
        raise ConfigError(f"an ensemble holds at most {MAX_MEMBERS} decoders, not {len(paths)}")
    out = checkpoint.check_replaceable(out)
    in_place = out.resolve() in {Path(path).resolve() for path in paths}
    if in_place and (format != "onnx" or options or half_precision or len(paths) > 1):
        raise ConfigError("OUT may be MODEL only to add ONNX graphs (one MODEL, --format onnx, no other options)")
    models = [Captioner.from_pretrained(path, device="cpu", engine="torch") for path in paths]
    model = models[0] if len(models) == 1 else Captioner.ensemble(models)
    model.generation_config = model.generation_config.updated(**options)
    stored_half = []
    for path in paths:
        with safe_open(str(Path(path) / checkpoint.MODEL_FILE), "pt") as weights:
            stored_half.append(any(weights.get_slice(name).get_dtype() == "F16" for name in weights.keys()))
    half = half_precision or (in_place and stored_half[0])
    for path, is_half in zip(paths, stored_half):
        if is_half and not half:
            log.warning("%s stores float16 weights; the copy is float32 (twice the size) unless --half-precision",
                        path)
    if half:  # the graphs must compute exactly the weights saved
        rounded = [model.decoder, *([model.encoder] if model.encoder.config.weights.stored else [])]
        with torch.no_grad():
            for tensor in (t for module in rounded for t in module.state_dict().values() if t.is_floating_point()):
                tensor.copy_(tensor.half().float())
    files: dict[str, Callable[[Path], None]] = {}
    if format == "onnx":
        files = {name: functools.partial(_write_bytes, data=data)
                 for name, data in onnx_engine.export_graphs(model.encoder, model.decoder).items()}
    if in_place:  # a run's training state and scores stay beside its weights
        files.update({name: functools.partial(shutil.copyfile, out / name) for name in checkpoint.RUN_FILES
                      if (out / name).is_file()})
    model.save_pretrained(out, half_precision=half, extra_files=files)
    return out, model


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _is_batch(inputs) -> bool:
    if isinstance(inputs, torch.Tensor):
        return inputs.dim() == 2
    return isinstance(inputs, (list, tuple))


def _as_list(inputs) -> list:
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
