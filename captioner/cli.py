"""The ``captioner`` command: ``train``, ``caption``, ``merge``, ``evaluate``, ``export``, ``demo`` and ``serve``,
thin layers over the package.

User mistakes (bad files, bad options) print ``error: <one line>`` and exit with status 2; a file
that cannot be captioned is reported and skipped, and the exit status is 1 at the end, as it is when
a loader process is killed (one line too).

Building the parser imports no PyTorch (nor torchvision, ONNX Runtime or Gradio): the option dataclasses it reads
live in torch-free modules (``train.config``, ``models.config``, ``generation.config``, ``serve.limits``), and
each command's handler imports what it runs. So ``--help`` and ``captioner merge`` start at once
(tests/test_import_cost.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .bounds import check_options, describe_bounds, field_types
from .errors import CaptionerError, ConfigError
from .files import read_json


def add_dataclass_options(parser: argparse._ActionsContainer, cls, defaults: dict | None = None,
                          default_note: str = "") -> None:
    """One ``--flag`` per dataclass field, default ``None`` so that only explicit flags override.

    Help shows each field's help, bounds and default: the dataclass's, or, where the real default comes
    from elsewhere (a model's ``config.json``), ``default_note`` with the value in ``defaults``.
    """
    kinds = field_types(cls)
    for item in fields(cls):
        if item.name.isupper():
            continue
        if default_note:
            default = default_note + (f" ({defaults[item.name]!r} for the bundled one)" if defaults else "")
        else:
            factory = item.default_factory
            default = repr(item.default if item.default is not MISSING else factory() if factory is not MISSING else None)
        text = item.metadata.get("help", "")
        # A help text that names its default already ("... (default: the first)"), or an empty-string default,
        # shows no second "default:".
        shown = None if "(default" in text or default == "''" else f"default: {default}"
        details = "; ".join(filter(None, [describe_bounds(item), shown]))
        kwargs: dict = {"default": None, "help": f"{text} ({details})" if details else text}
        kind = kinds[item.name][0]  # X of X | None: an absent flag is None already
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:  # a repeated flag; explicit_options reads each value with the field's own parser
            kwargs.update(action="append", metavar=item.name.upper().removesuffix("S"))
        else:
            kwargs["type"] = kind
            if "choices" in item.metadata:
                kwargs["choices"] = item.metadata["choices"]
            else:
                kwargs["metavar"] = item.name.upper()
        parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name, **kwargs)


def explicit_options(args: argparse.Namespace, cls) -> dict:
    """The options given on the command line, a repeated flag's values each read by its field's ``parse``."""
    parsers = {item.name: item.metadata.get("parse") for item in fields(cls)}
    options = {}
    for key, value in vars(args).items():
        if key in parsers and value is not None:
            parse = parsers[key]
            options[key] = [parse(v) for v in value] if parse is not None else value
    return options


MAX_CONFIG_BYTES = 1_000_000


def read_config_file(path: str) -> dict:
    """Options from a JSON or TOML file (keys are option names, with ``_`` or ``-``) of at most 1 MB."""
    data = read_json(path, MAX_CONFIG_BYTES, "config file", ConfigError, toml=Path(path).suffix == ".toml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config file must hold a table/object of options")
    return data


# ---------------------------------------------------------------------------------------- train
def _train_parser(sub) -> None:
    from .train.config import TrainConfig

    parser = sub.add_parser("train", help="train a captioner on COCO-style data", parents=[_common()],
                            description="Train a Show-and-Tell captioner. Options come from the defaults, then "
                                        "--config FILE, then flags; with --resume, from the interrupted run.")
    parser.add_argument("--config", help="JSON or TOML file of options (flags given here override it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its last complete epoch (optimizer, schedule and "
                             "random state included); its saved options apply unless given again")
    add_dataclass_options(parser, TrainConfig)
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from . import checkpoint
    from .train.config import TrainConfig, resume_folder, run_options
    from .train.state import TRAINER_FILE, read_trainer_file
    from .train.trainer import train

    flags = explicit_options(args, TrainConfig)
    file = {k.replace("-", "_"): v for k, v in read_config_file(args.config).items()} if args.config else {}
    saved: dict = {}
    if args.resume:
        out = resume_folder(flags, file)
        trainer_file = checkpoint.recover(out / "last") / TRAINER_FILE
        if not trainer_file.is_file():
            raise ConfigError(f"{out}: nothing to resume (no last/{TRAINER_FILE})")
        saved = read_trainer_file(trainer_file.parent)["config"]
    best = train(run_options(flags, file, saved, args.config or "config file"), resume=args.resume)
    print(f"best checkpoint: {best}")
    return 0


# ---------------------------------------------------------------------------------------- caption
def _engine_option(parser: argparse.ArgumentParser) -> None:
    from .runtime import ENGINES

    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="run the model with ONNX Runtime (CPU only; graphs exported from the weights on first use "
                             "and cached) or PyTorch; auto: ONNX Runtime on the CPU (default: auto)")


def _decoding_options(parser: argparse.ArgumentParser) -> None:
    from .generation.config import GenerationConfig

    group = parser.add_argument_group("decoding (defaults come from the model's config.json)")
    add_dataclass_options(group, GenerationConfig, _bundled_generation(), "from the model")
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    _engine_option(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="images decoded together (1 to 4096; default: 32)")


def _bundled_generation() -> dict:
    """The bundled model's decoding defaults, for help texts (empty if it is missing or unreadable)."""
    from .runtime import BUNDLED_MODEL

    try:
        return json.loads((BUNDLED_MODEL / "config.json").read_text(encoding="utf-8"))["generation"]
    except (OSError, ValueError, KeyError):
        return {}


def _decoding_arguments(args: argparse.Namespace) -> dict:
    """The decoding options given on the command line, checked before any model is loaded."""
    from .generation.config import GenerationConfig
    from .models.captioner import check_batch_size
    from .runtime import pick_device

    check_batch_size(args.batch_size)
    pick_device(args.device)
    options = explicit_options(args, GenerationConfig)
    if getattr(args, "num_return_sequences_alias", None) is not None:
        options["num_return_sequences"] = args.num_return_sequences_alias
    check_options(GenerationConfig, options)  # each on its own; combined with the model's defaults later
    return options


def _workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-workers", type=int, default=2, metavar="N",
                        help="processes that load and preprocess images while the model runs (0 to 64; 0: the main "
                             "process; default: 2)")


def _inputs_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", help="image files, or folders searched recursively")
    parser.add_argument("--files-from", metavar="LIST",
                        help="also the files listed in LIST, one path per line ('-': standard input)")


def _caption_parser(sub) -> None:
    parser = sub.add_parser("caption", help="caption image files or folders, a few or millions", parents=[_common()],
                            description="Caption images: to stdout, or appended to --out as JSON lines, resuming where "
                                        "an interrupted run stopped. See README, 'Caption a collection'.")
    _inputs_options(parser)
    parser.add_argument("--out", metavar="FILE",
                        help="append one JSON line per image to FILE, skipping images it already has (default: "
                             "print to stdout); under torchrun each rank K writes its part beside it, "
                             "captions.rank-K.jsonl for captions.jsonl")
    parser.add_argument("--shard", metavar="I/N", help="caption only images I, I+N, I+2N... of the inputs (0 <= I < N)")
    parser.add_argument("--num-captions", type=int, dest="num_return_sequences_alias", default=None, metavar="N",
                        help="alias of --num-return-sequences")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image, with scores and labels")
    _workers_option(parser)
    _decoding_options(parser)
    parser.set_defaults(handler=_caption)


def _caption(args: argparse.Namespace) -> int:
    from .models.captioner import Captioner
    from .runtime import stage_threads
    from .bulk.captioning import caption_files, rank_device
    from .bulk.inputs import Shard, check_workers, collect_inputs, this_share
    from .bulk.jsonl import open_output

    options = _decoding_arguments(args)
    shard = Shard.parse(args.shard) if args.shard is not None else Shard()
    num_workers = check_workers(args.num_workers)
    files = this_share(collect_inputs(args.paths, args.files_from), shard)
    writer = open_output(args.out, args.json)
    try:
        model = Captioner.from_pretrained(args.model, device=rank_device(args.device), engine=args.engine,
                                          num_threads=stage_threads())  # see caption_records
        config = model.generation_config.updated(**options)  # bad combinations fail before any work
        summary = caption_files(model, files, writer, config, args.batch_size, num_workers,
                                labels=args.json or args.out is not None)
    finally:
        writer.close()
    if summary.failed:
        print(f"error: {summary.failed} of {summary.files} images could not be captioned", file=sys.stderr)
    return 1 if summary.failed else 0


# ---------------------------------------------------------------------------------------- merge
def _merge_parser(sub) -> None:
    parser = sub.add_parser("merge", help="join the parts of a sharded or torchrun caption run into one file",
                            parents=[_common()],
                            description="Join caption parts into --out in the order of the inputs (give the same "
                                        "paths or --files-from as the caption runs), checking that every input has "
                                        "exactly one record.")
    _inputs_options(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="the merged JSON lines file to write")
    parser.add_argument("--parts", nargs="+", metavar="PART",
                        help="the files to join (default: FILE's torchrun parts beside it, named as caption "
                             "--out writes them: captions.rank-K.jsonl for --out captions.jsonl)")
    parser.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace) -> int:
    from .bulk.inputs import collect_inputs
    from .bulk.merge import default_parts, merge

    out = Path(args.out)
    merge(collect_inputs(args.paths, args.files_from), [Path(p) for p in args.parts] if args.parts else default_parts(out),
          out)
    return 0


# ---------------------------------------------------------------------------------------- evaluate
def _evaluate_parser(sub) -> None:
    parser = sub.add_parser("evaluate", help="caption a COCO-format split and score it (coco-caption metrics)",
                            parents=[_common()])
    parser.add_argument("--images", required=True, help="folder of the split's images")
    parser.add_argument("--captions", required=True, help="COCO captions JSON or Karpathy-split file")
    parser.add_argument("--split", default="test", help="split of a Karpathy file (default: test)")
    parser.add_argument("--out", help="write the metrics here as JSON")
    parser.add_argument("--predictions", help="write the predicted captions here (COCO results format)")
    _workers_option(parser)
    _decoding_options(parser)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .files import check_output_file, write_atomically
    from .bulk.evaluation import evaluate
    from .bulk.inputs import check_workers

    options, num_workers = _decoding_arguments(args), check_workers(args.num_workers)
    # The output files are checked now, not when the split has been captioned and scored.
    outputs = [(flag, check_output_file(Path(path), flag), key) for flag, path, key in
               (("--out", args.out, "metrics"), ("--predictions", args.predictions, "predictions")) if path]
    taken = {Path(args.captions).resolve(): "--captions"}
    for flag, path, _ in outputs:
        if path.resolve() in taken:
            raise ConfigError(f"{flag} {path} is also {taken[path.resolve()]}; choose another file")
        taken[path.resolve()] = flag
    result = evaluate(args.images, args.captions, model=args.model, split=args.split, device=args.device,
                      engine=args.engine, batch_size=args.batch_size, num_workers=num_workers, **options)
    width = max(map(len, result["metrics"]))
    for name, value in result["metrics"].items():  # printed first: kept even if a file below cannot be written
        print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    for flag, path, key in outputs:
        write_atomically(path, json.dumps(result[key], indent=2) + "\n", flag)
    return 0


# ---------------------------------------------------------------------------------------- export
def _export_parser(sub) -> None:
    from .generation.config import GenerationConfig

    parser = sub.add_parser("export", help="copy a checkpoint for inference, optionally in float16, with new "
                                           "default decoding settings or with ONNX graphs; or join several "
                                           "into an ensemble", parents=[_common()])
    parser.add_argument("model", nargs="+", help="checkpoint directory to read (e.g. runs/x/best); several make an "
                                                 "ensemble averaging their decoders (same encoder and vocabulary)")
    parser.add_argument("out", help="directory to write: new, empty or a checkpoint (replaced atomically, anything "
                                    "else is refused); with --format onnx it may be MODEL itself, to add the ONNX "
                                    "graphs beside its files")
    parser.add_argument("--half-precision", action="store_true", help="store decoder weights (and a fine-tuned "
                        "encoder's) as float16 (half size)")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                        help="onnx: also write encoder.onnx, decoder_init.onnx and decoder_step.onnx, for ONNX "
                             "Runtime elsewhere; this package's ONNX engine never runs graph files from a checkpoint "
                             "(default: safetensors only)")
    group = parser.add_argument_group("default decoding stored in the copy (unchanged unless given)")
    add_dataclass_options(group, GenerationConfig, default_note="unchanged")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from .generation.config import GenerationConfig
    from .models.captioner import export_checkpoint

    out, model = export_checkpoint(args.model, args.out, args.half_precision, args.format,
                                   explicit_options(args, GenerationConfig))
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    print(f"{out}: {size:.1f} MB, default decoding {model.generation_config.to_dict()}")
    return 0


# ---------------------------------------------------------------------------------------- demo, serve
def _server_options(parser: argparse.ArgumentParser, host: str, port: str) -> None:
    """The options of a server of the model: ``demo`` and ``serve`` take the same."""
    from .serve.limits import BatchConfig

    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--host", help=f"interface to listen on (default: {host})")
    parser.add_argument("--port", type=int, help=f"port (default: {port})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    _engine_option(parser)
    add_dataclass_options(parser.add_argument_group("micro-batching of concurrent requests"), BatchConfig)


def _server_arguments(args: argparse.Namespace):
    """The batching options, checked (one line naming a bad one) before any model is loaded."""
    from .runtime import pick_device
    from .serve.limits import BatchConfig

    pick_device(args.device)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, not {args.port}")
    return BatchConfig(**explicit_options(args, BatchConfig))


def _demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="serve the Gradio web demo (and the HTTP API under /v1)",
                            parents=[_common()],
                            description="Serve the web demo, and beside it the HTTP API under /v1, on 127.0.0.1:7860 "
                                        "unless --host/--port or GRADIO_SERVER_NAME/GRADIO_SERVER_PORT say otherwise.")
    _server_options(parser, "$GRADIO_SERVER_NAME or 127.0.0.1", "$GRADIO_SERVER_PORT or 7860")
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    batching = _server_arguments(args)
    from .serve.webapp import launch

    launch(args.model, args.host, args.port, args.device, engine=args.engine, batching=batching)
    return 0


def _serve_parser(sub) -> None:
    from .serve.limits import ServerLimits

    parser = sub.add_parser("serve", help="serve the HTTP API alone: POST /v1/caption", parents=[_common()],
                            description="Serve the JSON API (POST /v1/caption, GET /v1/health, GET /v1/model, "
                                        "GET /metrics; documented at /v1/docs) on 127.0.0.1:8000 unless "
                                        "--host/--port say otherwise, until SIGTERM or Ctrl-C. A --host beyond "
                                        "loopback needs an API key, or --no-auth.")
    _server_options(parser, "127.0.0.1", "8000")
    access = parser.add_argument_group("who may call it")
    access.add_argument("--api-key-file", metavar="FILE",
                        help="require 'Authorization: Bearer <key>' with the key on FILE's first line (default: "
                             "$CAPTIONER_API_KEY if set, else no key; /v1/health is always open)")
    access.add_argument("--no-auth", action="store_true",
                        help="serve a --host reachable from the network without an API key, on purpose")
    add_dataclass_options(parser.add_argument_group("bounds per connection, upload and decode"), ServerLimits)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    batching = _server_arguments(args)
    from .serve.access import Access
    from .serve.http import serve
    from .serve.limits import ServerLimits

    limits = ServerLimits(**explicit_options(args, ServerLimits))
    access = Access.from_options(args.api_key_file, args.no_auth)
    serve(args.model, args.host, args.port, args.device, args.engine, batching, limits, access)
    return 0


def demo_main(argv: list[str] | None = None) -> int:
    """``python app.py ...`` = ``captioner demo ...``."""
    return main(["demo", *(sys.argv[1:] if argv is None else argv)])


# ---------------------------------------------------------------------------------------- main
def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner", description="Show-and-Tell image captioning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _caption_parser(sub)
    _merge_parser(sub)
    _evaluate_parser(sub)
    _export_parser(sub)
    _demo_parser(sub)
    _serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.handler(args)
    except CaptionerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_main(argv: list[str] | None = None) -> int:
    """``python train.py ...`` = ``captioner train ...``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])
