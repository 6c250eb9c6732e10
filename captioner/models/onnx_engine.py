"""ONNX export, and ONNX Runtime sessions that stand in for the encoder and decoder at inference.

The export makes three graphs, batch/row axes dynamic: ``encoder.onnx`` (pixels -> pooled features),
``decoder_init.onnx`` (features -> LSTM state) and ``decoder_step.onnx`` (previous tokens, state ->
next-token logits, state). At run time :class:`OnnxEncoder` and :class:`OnnxDecoder` answer the calls
inference makes of :class:`Encoder` and :class:`Decoder` (``encoder(pixels)``, ``decoder.init_state``,
``decoder.step``) with torch tensors, so the one batched search in :mod:`captioner.generation.search` drives either
engine. On a CPU this is faster than eager PyTorch: a beam-search step is a few small matmuls, where
PyTorch's per-op overhead dominates.

The engine runs only graphs this module exported itself, from weights already loaded and checked. A
graph is a program: one from outside could read local files through external data, loop forever or
ignore the weights beside it, and no check of its contents proves otherwise. So graph files inside a
checkpoint directory are never executed (``captioner export --format onnx`` writes them for other
runtimes); the engine's own graphs live in a per-user cache (:mod:`captioner.models.onnx_cache`) keyed by
the fingerprint of the weights they compute, so the export costs seconds once per model.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from ..data.vocab import START_ID
from ..errors import CheckpointError, ConfigError
from ..generation.step import State
from ..runtime import ENGINES
from . import onnx_cache
from .config import DecoderConfig
from .decoder import Decoder, DecoderEnsemble, average_probabilities, lstm_cell
from .encoder import Encoder, EncoderConfig
from .onnx_cache import FINGERPRINT_KEY

ONNX_FILES = checkpoint.GRAPH_FILES
ENCODER_ONNX, DECODER_INIT_ONNX, DECODER_STEP_ONNX = ONNX_FILES
EXPORT_VERSION = 1  # part of the fingerprint: raise it when the export code changes, so cached graphs are redone
OPSET = 17
TOLERANCE = 1e-3  # export check: largest difference allowed between PyTorch's and ONNX Runtime's outputs
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
    wanted = signatures(encoder.config, decoder.config)
    graphs = onnx_cache.graphs(weights_fingerprint(encoder, decoder), lambda: export_graphs(encoder, decoder), cache)
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
