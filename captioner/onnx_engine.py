"""ONNX export, and ONNX Runtime sessions that stand in for the encoder and decoder at inference.

The export writes three graphs into a checkpoint directory, batch/row axes dynamic:
``encoder.onnx`` (pixels -> pooled features), ``decoder_init.onnx`` (features -> LSTM state) and
``decoder_step.onnx`` (previous tokens, state -> next-token logits, state). At run time
:class:`OnnxEncoder` and :class:`OnnxDecoder` answer the calls inference makes of :class:`Encoder` and
:class:`Decoder` (``encoder(pixels)``, ``decoder.init_state``, ``decoder.step``) with torch tensors, so
the one batched search in :mod:`captioner.decoding` drives either engine. On a CPU this is several
times faster than eager PyTorch: a beam-search step is a few small matmuls, where PyTorch's per-op
overhead dominates.

A checkpoint directory is untrusted input: only these fixed file names inside it are read, graphs
with external data are refused, every input and output must have the expected name, type and shape,
and the graphs must carry the fingerprint of the weights beside them (so stale graphs cannot
silently caption with other weights than ``model.safetensors``).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .decoder import Decoder, DecoderConfig, DecoderEnsemble, State, average_probabilities, lstm_cell
from .encoder import Encoder, EncoderConfig
from .errors import CheckpointError, ConfigError
from .vocab import START_ID

ENCODER_ONNX, DECODER_INIT_ONNX, DECODER_STEP_ONNX = "encoder.onnx", "decoder_init.onnx", "decoder_step.onnx"
ONNX_FILES = (ENCODER_ONNX, DECODER_INIT_ONNX, DECODER_STEP_ONNX)
ENGINES = ("auto", "onnx", "torch")
ENGINE_NAMES = {"onnx": "ONNX Runtime", "torch": "PyTorch"}
FINGERPRINT_KEY = "captioner_weights_sha256"
OPSET = 17
TOLERANCE = 1e-3  # export check: largest difference allowed between PyTorch's and ONNX Runtime's outputs


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
    ``MatMul`` over the members measured slower in ONNX Runtime (1.15 against 0.66 ms for a 3-row step).
    """

    def __init__(self, decoder: Decoder | DecoderEnsemble):
        super().__init__()
        self.config, self.decoder = decoder.config, decoder  # the module owns the weights; members index them
        self.members: list[Decoder] = decoder.decoders() if isinstance(decoder, DecoderEnsemble) else [decoder]
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


def weights_fingerprint(directory: Path) -> str:
    """SHA-256 of the weights and model configuration in a checkpoint (not its decoding defaults)."""
    config = checkpoint.read_json(directory / checkpoint.CONFIG_FILE)
    digest = hashlib.sha256(json.dumps([config.get("encoder"), config.get("decoder")], sort_keys=True).encode())
    for name in (checkpoint.MODEL_FILE, checkpoint.ENCODER_FILE):
        if (directory / name).is_file():
            digest.update(name.encode() + (directory / name).read_bytes())
    return digest.hexdigest()


@torch.no_grad()
def export_onnx(encoder: Encoder, decoder: Decoder | DecoderEnsemble, directory: str | os.PathLike) -> list[Path]:
    """Write the three graphs into ``directory``, a checkpoint holding these same weights.

    Each graph is checked with ``onnx.checker`` and its outputs compared with PyTorch's on random
    inputs before it replaces any previous file (written under a temporary name, then renamed).
    """
    import onnx

    directory = Path(directory)
    fingerprint = weights_fingerprint(directory)
    encoder, decoder = copy.deepcopy(encoder).cpu().float(), copy.deepcopy(decoder).cpu().float()
    generator = torch.Generator().manual_seed(0)
    crop, config = encoder.config.preprocessing.crop_size, decoder.config
    state = torch.randn(config.members * config.num_layers, 2, config.hidden_size, generator=generator)
    graphs = {
        ENCODER_ONNX: (encoder.eval(), (torch.randn(2, 3, crop, crop, generator=generator),)),
        DECODER_INIT_ONNX: (_DecoderInit(decoder).eval(), (torch.randn(2, config.feature_size, generator=generator),)),
        DECODER_STEP_ONNX: (_DecoderStep(decoder).eval(), (torch.tensor([START_ID, 4]), state, state.clone())),
    }
    written = []
    for name, (inputs, outputs) in signatures(encoder.config, config).items():
        module, arguments = graphs[name]
        axes = {key: {i: size for i, size in enumerate(shape) if isinstance(size, str)}
                for key, (_, shape) in {**inputs, **outputs}.items()}
        temporary = directory / f".{name}.tmp-{os.getpid()}"
        try:
            with warnings.catch_warnings():  # tracer and deprecation notices; the outputs are checked below
                warnings.simplefilter("ignore")
                torch.onnx.export(module, arguments, str(temporary), input_names=list(inputs),
                                  output_names=list(outputs), dynamic_axes=axes, opset_version=OPSET, dynamo=False)
            graph = onnx.load(str(temporary))
            graph.metadata_props.add(key=FINGERPRINT_KEY, value=fingerprint)
            onnx.checker.check_model(graph, full_check=True)
            onnx.save(graph, str(temporary))
            expected = module(*arguments)
            expected = expected if isinstance(expected, tuple) else (expected,)
            got = _run(_session(temporary.read_bytes(), temporary), **dict(zip(inputs, arguments)))
            difference = max((a - b).abs().max().item() for a, b in zip(expected, got))
            if difference > TOLERANCE:
                raise RuntimeError(f"{name}: ONNX Runtime differs from PyTorch by {difference:.2g}")
            os.replace(temporary, directory / name)
        finally:
            temporary.unlink(missing_ok=True)
        written.append(directory / name)
    return written


# ---------------------------------------------------------------------------------------- loading
def runtime_installed() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def has_onnx_files(directory: Path) -> bool:
    """Whether the checkpoint holds an ONNX export; part of one is an error, not a silent fallback."""
    present = [name for name in ONNX_FILES if (directory / name).exists()]
    if present and len(present) < len(ONNX_FILES):
        missing = sorted(set(ONNX_FILES) - set(present))
        raise CheckpointError(f"{directory}: incomplete ONNX export ({', '.join(missing)} missing)")
    return bool(present)


def resolve_engine(engine: str, directory: Path, device: torch.device, custom_encoder: bool = False) -> str:
    """``"onnx"`` or ``"torch"``: ``"auto"`` picks ONNX Runtime on the CPU when the export and package are there."""
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "torch":
        return "torch"
    if engine == "auto":
        usable = device.type == "cpu" and not custom_encoder and runtime_installed()
        return "onnx" if usable and has_onnx_files(directory) else "torch"
    if device.type != "cpu":
        raise ConfigError(f"the ONNX engine runs on the CPU, not {device.type}; use engine 'torch' there")
    if custom_encoder:
        raise ConfigError("encoder weights cannot be overridden with the ONNX engine (the export holds its own)")
    if not runtime_installed():
        raise ConfigError("the ONNX engine needs onnxruntime (pip install onnxruntime)")
    if not has_onnx_files(directory):
        raise CheckpointError(f"{directory}: no ONNX export; write one with "
                              f"`captioner export {directory} {directory} --format onnx`")
    return "onnx"


def load_runtime(directory: Path, encoder: EncoderConfig, decoder: DecoderConfig,
                 num_threads: int | None = None) -> OnnxRuntime:
    """ONNX Runtime sessions for a checkpoint's three graphs, each checked against what inference expects.

    Each session computes on ``num_threads`` CPU threads (default: PyTorch's count, the physical cores).
    """
    fingerprint = weights_fingerprint(directory)
    sessions = {}
    for name, (inputs, outputs) in signatures(encoder, decoder).items():
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
        session = _session(_checked_model(path, fingerprint), path, num_threads)
        for kind, wanted, found in (("input", inputs, session.get_inputs()), ("output", outputs, session.get_outputs())):
            got = {arg.name: (arg.type, _axes(arg.shape)) for arg in found}
            want = {key: (dtype, _axes(shape)) for key, (dtype, shape) in wanted.items()}
            if got != want:
                raise CheckpointError(f"{path}: {kind}s are {_describe(got)}, expected {_describe(want)}")
        sessions[name] = session
    return OnnxRuntime(OnnxEncoder(sessions[ENCODER_ONNX]),
                       OnnxDecoder(sessions[DECODER_INIT_ONNX], sessions[DECODER_STEP_ONNX]))


def _checked_model(path: Path, fingerprint: str) -> bytes:
    """The graph's bytes, if it is self-contained and was exported from the weights beside it."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    data = path.read_bytes()
    try:
        graph = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-turned-errors and more
        raise CheckpointError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if any(uses_external_data(tensor) for tensor in graph.graph.initializer):
        raise CheckpointError(f"{path}: graphs with external data files are not loaded")
    stored = {prop.key: prop.value for prop in graph.metadata_props}.get(FINGERPRINT_KEY)
    if stored != fingerprint:
        raise CheckpointError(f"{path}: exported from other weights than this checkpoint's; export it again")
    return data


def _session(model: bytes, source: Path, num_threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = num_threads or torch.get_num_threads()  # PyTorch's default: the physical cores
    options.inter_op_num_threads = 1
    # Spinning threads took 175 instead of 37 ms per caption with a second model or PyTorch in the process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors have no common public base class
        raise CheckpointError(f"{source}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None


def _axes(shape: list) -> list:
    return [size if isinstance(size, int) else "dynamic" for size in shape]


def _describe(signature: dict) -> str:
    return ", ".join(f"{name} {kind[7:-1]}{shape}" for name, (kind, shape) in sorted(signature.items()))
