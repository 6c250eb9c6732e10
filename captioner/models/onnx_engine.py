"""ONNX export, and ONNX Runtime sessions that stand in for the encoder and decoder at inference.

The export makes three graphs, batch/row axes dynamic: ``encoder.onnx`` (pixels -> pooled features),
``decoder_init.onnx`` (features -> LSTM state) and ``decoder_step.onnx`` (previous tokens, state ->
next-token logits, state). At run time :class:`OnnxEncoder` and :class:`OnnxDecoder` answer the calls
inference makes of :class:`Encoder` and :class:`Decoder` (``encoder(pixels)``, ``decoder.init_state``,
``decoder.step``) with torch tensors, so the one batched search in :mod:`captioner.decoding` drives either
engine. On a CPU this is faster than eager PyTorch: a beam-search step is a few small matmuls, where
PyTorch's per-op overhead dominates.

The engine runs only graphs this module exported itself, from weights already loaded and checked. A
graph is a program: one from outside could read local files through external data, loop forever or
ignore the weights beside it, and no check of its contents proves otherwise. So graph files inside a
checkpoint directory are never executed (``captioner export --format onnx`` writes them for other
runtimes); the engine's own graphs live in a per-user cache keyed by the fingerprint of the weights
they compute, written atomically and bounded in size, so the export costs seconds once per model.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from ..data.vocab import START_ID
from ..errors import CheckpointError, ConfigError
from ..files import read_bounded
from ..generation.search import State
from ..runtime import cache_dir
from .decoder import (
    Decoder,
    DecoderConfig,
    DecoderEnsemble,
    average_probabilities,
    lstm_cell,
)
from .encoder import Encoder, EncoderConfig

log = logging.getLogger(__name__)

ONNX_FILES = checkpoint.GRAPH_FILES
ENCODER_ONNX, DECODER_INIT_ONNX, DECODER_STEP_ONNX = ONNX_FILES
ENGINES = ("auto", "onnx", "torch")
ENGINE_NAMES = {"onnx": "ONNX Runtime", "torch": "PyTorch"}
FINGERPRINT_KEY = "captioner_weights_sha256"
EXPORT_VERSION = 1  # part of the fingerprint: raise it when the export code changes, so cached graphs are redone
OPSET = 17
TOLERANCE = 1e-3  # export check: largest difference allowed between PyTorch's and ONNX Runtime's outputs
MAX_GRAPH_BYTES = 2 << 30  # protobuf's own limit for one model
MAX_CACHE_BYTES = 4 << 30  # the graph cache; the least recently used models go first
_EXPORTING = threading.Lock()  # torch.onnx.export keeps global state: one export at a time in a process

class OnnxEncoder:
    """``encoder(pixels)`` through an ONNX Runtime session: ``(B, 3, H, W)`` -> ``(B, feature_size)``."""

    def __init__(self, session):
        self.session = session

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return _run(self.session, pixels=pixels)[0]


class OnnxDecoder:
    """The decoder's inference calls, :meth:`init_state` and :meth:`step`, through ONNX Runtime sessions."""

    def __init__(self, init_session, step_session):
        self.init_session, self.step_session = init_session, step_session

    def init_state(self, features: torch.Tensor) -> State:
        h, c = _run(self.init_session, features=features.float())
        return h, c

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, h, c = _run(self.step_session, tokens=tokens, h=state[0], c=state[1])
        return logits, (h, c)


class OnnxRuntime(NamedTuple):
    encoder: OnnxEncoder
    decoder: OnnxDecoder


def _run(session, **inputs: torch.Tensor) -> list[torch.Tensor]:
    """Feed CPU tensors as numpy arrays and wrap the outputs back without copying."""
    feeds = {name: np.ascontiguousarray(tensor.numpy()) for name, tensor in inputs.items()}
    return [torch.from_numpy(output) for output in session.run(None, feeds)]


# ---------------------------------------------------------------------------------------- export
class _DecoderInit(nn.Module):
    def __init__(self, decoder: Decoder | DecoderEnsemble):
        super().__init__()
        self.decoder = decoder

    def forward(self, features: torch.Tensor) -> State:
        return self.decoder.init_state(features)


class _DecoderStep(nn.Module):
    """One step of every member with the LSTM's equations written out, its first input projection looked up.

    ``W_ih embedding(word) + b_ih`` is precomputed for the whole vocabulary, so a step reads one row of that
    table instead of the ``W_ih`` matrix: a third less memory traffic per step, for a larger file. Each
    member's matrix products stay 2-D ``Gemm`` nodes over its slice of the stacked state: a batched 3-D
    ``MatMul`` over the members measured slower in ONNX Runtime (see benchmarks/onnx_speed.py).
    """

    def __init__(self, decoder: Decoder | DecoderEnsemble):
        super().__init__()
        self.config, self.decoder = decoder.config, decoder  # the module owns the weights; members index them
        self.members: list[Decoder] = decoder.decoders()
        for number, member in enumerate(self.members):
            lstm = member.lstm
            self.register_buffer(f"word_gates_{number}", F.linear(member.embedding.weight, lstm.get_parameter("weight_ih_l0"),
                                                                  lstm.get_parameter("bias_ih_l0")))

    def forward(self, tokens: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        outputs, hs, cs = [], [], []
        for number, member in enumerate(self.members):
            inputs = getattr(self, f"word_gates_{number}")[tokens]
            for layer in range(self.config.num_layers):
                lstm, row = member.lstm, number * self.config.num_layers + layer
                if layer:
                    inputs = F.linear(inputs, lstm.get_parameter(f"weight_ih_l{layer}"), lstm.get_parameter(f"bias_ih_l{layer}"))
                hidden_gates = F.linear(h[row], lstm.get_parameter(f"weight_hh_l{layer}"), lstm.get_parameter(f"bias_hh_l{layer}"))
                inputs, cell = lstm_cell(inputs, hidden_gates, c[row])
                hs.append(inputs)
                cs.append(cell)
            outputs.append(member.output(inputs))
        logits = outputs[0] if len(outputs) == 1 else average_probabilities([F.log_softmax(x, -1) for x in outputs])
        return logits, torch.stack(hs), torch.stack(cs)


def signatures(encoder: EncoderConfig, decoder: DecoderConfig) -> dict[str, tuple[dict, dict]]:
    """Each graph's ``(inputs, outputs)``: name -> (ONNX type, shape); a str in a shape is a dynamic axis."""
    crop = encoder.preprocessing.crop_size
    state = ("tensor(float)", [decoder.members * decoder.num_layers, "rows", decoder.hidden_size])
    return {
        ENCODER_ONNX: ({"pixels": ("tensor(float)", ["batch", 3, crop, crop])},
                       {"features": ("tensor(float)", ["batch", encoder.feature_size])}),
        DECODER_INIT_ONNX: ({"features": ("tensor(float)", ["rows", decoder.feature_size])},
                            {"h": state, "c": state}),
        DECODER_STEP_ONNX: ({"tokens": ("tensor(int64)", ["rows"]), "h": state, "c": state},
                            {"logits": ("tensor(float)", ["rows", decoder.vocab_size]), "next_h": state,
                             "next_c": state}),
    }


def weights_fingerprint(encoder: Encoder, decoder: Decoder | DecoderEnsemble) -> str:
    """SHA-256 of what the graphs compute: both configurations and every weight as the export reads it."""
    digest = hashlib.sha256(json.dumps([EXPORT_VERSION, encoder.config.to_dict(), decoder.config.to_dict()],
                                       sort_keys=True).encode())
    for prefix, module in (("encoder.", encoder), ("decoder.", decoder)):
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu()
            tensor = tensor.float() if tensor.is_floating_point() else tensor
            digest.update(f"{prefix}{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def export_graphs(encoder: Encoder, decoder: Decoder | DecoderEnsemble) -> dict[str, bytes]:
    """The three graphs of these weights, each checked before it is returned.

    Each passes ``onnx.checker`` and its ONNX Runtime outputs are compared with PyTorch's on random
    inputs; each carries the weights' fingerprint in its metadata, so a deployment can tell which
    weights a graph belongs to.
    """
    with _EXPORTING:
        return _export_graphs(encoder, decoder)


def _export_graphs(encoder: Encoder, decoder: Decoder | DecoderEnsemble) -> dict[str, bytes]:
    import onnx

    fingerprint = weights_fingerprint(encoder, decoder)
    encoder, decoder = copy.deepcopy(encoder).cpu().float(), copy.deepcopy(decoder).cpu().float()
    generator = torch.Generator().manual_seed(0)
    crop, config = encoder.config.preprocessing.crop_size, decoder.config
    state = torch.randn(config.members * config.num_layers, 2, config.hidden_size, generator=generator)
    graphs = {
        ENCODER_ONNX: (encoder.eval(), (torch.randn(2, 3, crop, crop, generator=generator),)),
        DECODER_INIT_ONNX: (_DecoderInit(decoder).eval(), (torch.randn(2, config.feature_size, generator=generator),)),
        DECODER_STEP_ONNX: (_DecoderStep(decoder).eval(), (torch.tensor([START_ID, 4]), state, state.clone())),
    }
    exported = {}
    for name, (inputs, outputs) in signatures(encoder.config, config).items():
        module, arguments = graphs[name]
        axes = {key: {i: size for i, size in enumerate(shape) if isinstance(size, str)}
                for key, (_, shape) in {**inputs, **outputs}.items()}
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # tracer and deprecation notices; the outputs are checked below
            warnings.simplefilter("ignore")
            torch.onnx.export(module, arguments, buffer, input_names=list(inputs), output_names=list(outputs),  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        graph = onnx.load_model_from_string(buffer.getvalue())
        graph.metadata_props.add(key=FINGERPRINT_KEY, value=fingerprint)
        onnx.checker.check_model(graph, full_check=True)
        data = graph.SerializeToString()
        expected = module(*arguments)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = _run(_session(data, name), **dict(zip(inputs, arguments)))
        difference = max((a - b).abs().max().item() for a, b in zip(expected, got))
        if not difference <= TOLERANCE:  # NaN too
            raise CheckpointError(f"{name}: ONNX Runtime differs from PyTorch by {difference:.2g}; use engine 'torch'")
        exported[name] = data
    return exported


# ---------------------------------------------------------------------------------------- loading
def runtime_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnx", "onnxruntime"))


def resolve_engine(engine: str, device: torch.device) -> str:
    """``"onnx"`` or ``"torch"``: ``"auto"`` picks ONNX Runtime on the CPU when onnx and onnxruntime are installed."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "torch":
        return "torch"
    if engine == "auto":
        return "onnx" if device.type == "cpu" and runtime_installed() else "torch"
    if device.type != "cpu":
        raise ConfigError(f"the ONNX engine runs on the CPU, not {device.type}; use engine 'torch' there")
    if not runtime_installed():
        raise ConfigError("the ONNX engine needs onnx and onnxruntime (pip install onnx onnxruntime)")
    return "onnx"


def load_runtime(encoder: Encoder, decoder: Decoder | DecoderEnsemble, num_threads: int | None = None,
                 cache: Path | None = None) -> OnnxRuntime:
    """ONNX Runtime sessions computing these modules: graphs from the cache, exported into it on first use.

    Each session computes on ``num_threads`` CPU threads (default: PyTorch's count, the physical cores).
    A cache that cannot be written (read-only, full, not private) costs an export per load, never a failure.
    """
    folder = cache or cache_dir("onnx")
    fingerprint = weights_fingerprint(encoder, decoder)
    wanted = signatures(encoder.config, decoder.config)
    graphs = _cached_graphs(folder, fingerprint)
    if graphs is None:
        graphs = export_graphs(encoder, decoder)
        _store(folder, fingerprint, graphs)
    sessions = {}
    for name, (inputs, outputs) in wanted.items():
        session = _session(graphs[name], name, num_threads)
        for kind, want, found in (("input", inputs, session.get_inputs()), ("output", outputs, session.get_outputs())):
            got = {arg.name: (arg.type, _axes(arg.shape)) for arg in found}
            expected = {key: (dtype, _axes(shape)) for key, (dtype, shape) in want.items()}
            if got != expected:  # the export's own mistake, not the user's
                raise RuntimeError(f"{name}: {kind}s are {_describe(got)}, expected {_describe(expected)}")
        sessions[name] = session
    return OnnxRuntime(OnnxEncoder(sessions[ENCODER_ONNX]),
                       OnnxDecoder(sessions[DECODER_INIT_ONNX], sessions[DECODER_STEP_ONNX]))


# ---------------------------------------------------------------------------------------- the graph cache
def _private(folder: Path) -> bool:
    """Create ``folder`` (mode 0700); whether it is a real folder of this user that nobody else can write."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        log.warning("ONNX graph cache %s unusable (%s); exporting the graphs again at every load", folder,
                    exc.strerror or exc)
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        log.warning("ONNX graph cache %s is not a private folder of this user; exporting the graphs again at "
                    "every load (chmod 700 it, or set CAPTIONER_CACHE_DIR)", folder)
        return False
    return True


def _cached_graphs(folder: Path, fingerprint: str) -> dict[str, bytes] | None:
    """The graphs cached for ``fingerprint``, or ``None`` when missing, incomplete or not as this module wrote them.

    The entry and its graphs are opened without following links (a link is exported again, never read), the
    graphs relative to the entry's open folder, so no rename meanwhile can put other files in their place.
    """
    if not _private(folder):
        return None
    try:
        entry = os.open(folder / fingerprint, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # a link, a file: exported again, and the export replaces it
            log.info("ONNX graph cache %s unusable (%s); exporting it again", folder / fingerprint,
                     exc.strerror or exc)
        return None
    try:
        graphs = {}
        for name in ONNX_FILES:
            data = _read_graph(entry, name)
            if data is None or _fingerprint_of(data) != fingerprint:
                log.info("ONNX graph cache %s: %s missing or damaged; exporting it again", folder / fingerprint, name)
                return None
            graphs[name] = data
        os.utime(entry)  # recently used: evicted last
        return graphs
    finally:
        os.close(entry)


def _read_graph(entry: int, name: str) -> bytes | None:
    """Graph file ``name`` of open cache folder ``entry``: a regular file's bytes (not a link, at most
    ``MAX_GRAPH_BYTES``), or ``None``. A read that fails, memory included, makes the entry unusable: an export
    costs a second, a failed load a whole process."""
    try:
        return read_bounded(name, MAX_GRAPH_BYTES, name, "graph", error=CheckpointError, follow=False, dir_fd=entry)
    except (CheckpointError, MemoryError, OSError):
        return None


def _fingerprint_of(data: bytes) -> str | None:
    """The fingerprint a self-contained graph carries; ``None`` for anything else (garbage, external data)."""
    import onnx

    try:
        graph = onnx.load_model_from_string(data)
        if _uses_external_data(graph):
            return None
    except Exception:  # protobuf raises DecodeError, RuntimeWarning-turned-errors, RecursionError and more
        return None
    return {prop.key: prop.value for prop in graph.metadata_props}.get(FINGERPRINT_KEY)


def _uses_external_data(message) -> bool:
    """Whether any tensor anywhere in ``message`` (initializers, constants, attributes, subgraphs, functions,
    sparse tensors) points at another file: the message's every field is walked, not a list of known places."""
    import onnx

    if isinstance(message, onnx.TensorProto) and (message.data_location == onnx.TensorProto.EXTERNAL
                                                  or len(message.external_data)):
        return True
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            if any(_uses_external_data(item) for item in (value if field.is_repeated else [value])):
                return True
    return False


def _store(folder: Path, fingerprint: str, graphs: dict[str, bytes]) -> None:
    """Put ``graphs`` in the cache as one entry (swapped in whole), then evict beyond ``MAX_CACHE_BYTES``."""
    if not _private(folder):
        return
    try:
        with checkpoint.atomic_directory(folder / fingerprint) as entry:
            for name, data in graphs.items():
                (entry / name).write_bytes(data)
    except CheckpointError as exc:
        log.warning("ONNX graph cache: %s; exporting the graphs again at the next load", exc)
        return
    _evict(folder, keep=folder / fingerprint)


def _evict(folder: Path, keep: Path) -> None:
    """Delete the least recently used entries until the rest fit in ``MAX_CACHE_BYTES`` (``keep`` stays)."""
    total = 0
    for modified, size, entry in sorted(_entries(folder), reverse=True):
        total += size
        if total > MAX_CACHE_BYTES and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            (folder / f".{entry.name}.lock").unlink(missing_ok=True)


def _entries(folder: Path) -> Iterator[tuple[float, int, Path]]:
    """``(last used, bytes, path)`` of each cache entry; another process may be evicting some meanwhile."""
    for entry in folder.iterdir():
        if len(entry.name) == 64 and all(c in "0123456789abcdef" for c in entry.name):
            try:
                yield entry.stat().st_mtime, sum(file.stat().st_size for file in entry.iterdir()), entry
            except OSError:
                continue


def _session(model: bytes, name: str, num_threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads or torch.get_num_threads()  # PyTorch's default: the physical cores
    options.inter_op_num_threads = 1
    # Spinning threads measured several times slower per caption with a second model or PyTorch in the process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors have no common public base class
        raise CheckpointError(f"{name}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None


def _axes(shape: list) -> list:
    return [size if isinstance(size, int) else "dynamic" for size in shape]


def _describe(signature: dict) -> str:
    return ", ".join(f"{name} {kind[7:-1]}{shape}" for name, (kind, shape) in sorted(signature.items()))
