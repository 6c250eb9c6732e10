"""The ``captioner`` command: ``train``, ``caption`` and ``evaluate``, thin layers over the package.

User mistakes (bad files, bad options) print ``error: <one line>`` and exit with status 2; a file
that cannot be captioned is reported and skipped, and the exit status is 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .bounds import annotation, check_options, describe_bounds
from .errors import CaptionerError, ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]  # the same parser under its former name

log = logging.getLogger("captioner")

_TYPES = {"int": int, "float": float, "str": str, "int | None": int}


def add_dataclass_options(parser: argparse._ActionsContainer, cls, defaults: dict | None = None,
                          default_note: str = "") -> None:
    """One ``--flag`` per dataclass field, default ``None`` so that only explicit flags override.

    Help shows each field's help, bounds and default: the dataclass's, or, where the real default comes
    from elsewhere (a model's ``config.json``), ``default_note`` with the value in ``defaults``.
    """
    for item in fields(cls):
        if item.name.isupper():
            continue
        if default_note:
            default = default_note + (f" ({defaults[item.name]!r} for the bundled one)" if defaults else "")
        else:
            default = repr(item.default if item.default is not MISSING else None)
        details = "; ".join(filter(None, [describe_bounds(item), f"default: {default}"]))
        kwargs: dict = {"default": None, "help": f"{item.metadata.get('help', '')} ({details})"}
        if item.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _TYPES[annotation(item)]
            if "choices" in item.metadata:
                kwargs["choices"] = item.metadata["choices"]
            else:
                kwargs["metavar"] = item.name.upper()
        parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name, **kwargs)


def explicit_options(args: argparse.Namespace, cls) -> dict:
    names = {item.name for item in fields(cls)}
    return {key: value for key, value in vars(args).items() if key in names and value is not None}


MAX_CONFIG_BYTES = 1_000_000


def read_config_file(path: str) -> dict:
    """Options from a JSON or TOML file (keys are option names, with ``_`` or ``-``) of at most 1 MB."""
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid config file ({str(exc).partition(chr(10))[0]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid config file (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config file must hold a table/object of options")
    return data


# ---------------------------------------------------------------------------------------- train
def _train_parser(sub) -> None:
    from .train_config import TrainConfig

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
    from .train_config import TrainConfig
    from .train_state import TRAINER_FILE, read_trainer_file
    from .training import train

    explicit = explicit_options(args, TrainConfig)
    from_file: dict = {}
    if args.config:
        from_file = {k.replace("-", "_"): v for k, v in read_config_file(args.config).items()}
        TrainConfig.from_dict(from_file, args.config)  # names the file if it has unknown options
    saved: dict = {}
    if args.resume:
        out = Path(explicit.get("out") or from_file.get("out") or TrainConfig.out)
        trainer_file = checkpoint.recover(out / "last") / TRAINER_FILE
        if not trainer_file.is_file():
            raise ConfigError(f"{out}: nothing to resume (no last/{TRAINER_FILE})")
        saved = read_trainer_file(trainer_file.parent)["config"]
    best = train(TrainConfig.from_dict({**saved, **from_file, **explicit}), resume=args.resume)
    print(f"best checkpoint: {best}")
    return 0


# ---------------------------------------------------------------------------------------- caption
def _engine_option(parser: argparse.ArgumentParser) -> None:
    from .onnx_engine import ENGINES

    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="run the model with ONNX Runtime (CPU, needs the model's ONNX export) or PyTorch; "
                             "auto: ONNX Runtime when on the CPU and exported (default: auto)")


def _decoding_options(parser: argparse.ArgumentParser) -> None:
    from .decoding import GenerationConfig

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
    from .decoding import GenerationConfig
    from .model import check_batch_size
    from .runtime import pick_device

    check_batch_size(args.batch_size)
    pick_device(args.device)
    options = explicit_options(args, GenerationConfig)
    if getattr(args, "num_return_sequences_alias", None) is not None:
        options["num_return_sequences"] = args.num_return_sequences_alias
    check_options(GenerationConfig, options)  # each on its own; combined with the model's defaults later
    return options


def _caption_parser(sub) -> None:
    parser = sub.add_parser("caption", help="caption image files or folders", parents=[_common()])
    parser.add_argument("paths", nargs="+", help="image files, or folders searched recursively")
    parser.add_argument("--num-captions", type=int, dest="num_return_sequences_alias", default=None, metavar="N",
                        help="alias of --num-return-sequences")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image, with scores")
    _decoding_options(parser)
    parser.set_defaults(handler=_caption)


def find_images(paths: list[str]) -> list[Path]:
    """Expand folders (recursively, image extensions only); files are taken as given.

    A path that does not exist is a usage mistake (:class:`ConfigError`); a file that exists but cannot
    be read is the captioning loop's to report and skip.
    """
    from .images import IMAGE_EXTENSIONS

    found: list[Path] = []
    for name in paths:
        path = Path(name)
        try:
            is_dir, exists = path.is_dir(), path.exists() or path.is_symlink()
        except OSError:  # a name too long, a loop of links...: the loader reports it with the other failures
            is_dir, exists = False, True
        if is_dir:
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        elif exists:
            found.append(path)
        else:
            raise ConfigError(f"{name}: no such file or folder")
    return found


def _caption(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .model import Captioner

    options = _decoding_arguments(args)
    files = find_images(args.paths)
    if not files:
        raise ConfigError("no images found in the given paths")
    model = Captioner.from_pretrained(args.model, device=args.device)
    config = model.generation_config.updated(**options)  # bad combinations fail before any work
    failures = 0
    with tqdm(total=len(files), unit="image", disable=len(files) < 10 or not sys.stderr.isatty()) as bar:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            good, features = _encode_readable(model, chunk)
            failures += len(chunk) - len(good)
            results = model.generate(features, config) if good else []
            for path, captions in zip(good, results):
                if args.json:
                    print(json.dumps({"file": str(path), "captions": [
                        {"text": c.text, "log_prob": round(c.log_prob, 4), "score": round(c.score, 4)}
                        for c in captions]}), flush=True)
                else:
                    for caption in captions:
                        print(f"{path}\t{caption.text}", flush=True)
            bar.update(len(chunk))
    if failures:
        print(f"error: {failures} of {len(files)} images could not be captioned", file=sys.stderr)
    return 1 if failures else 0


def _encode_readable(model, paths: list[Path]):
    """Load each image on its own, reporting and skipping those that cannot be read; encode the rest together."""
    import torch

    from .errors import ImageError

    good, pixels = [], []
    for path in paths:
        try:
            pixels.append(model.encoder.pixels(path))
            good.append(path)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
    return good, (model.encode_pixels(torch.stack(pixels)) if pixels else None)


# ---------------------------------------------------------------------------------------- evaluate
def _evaluate_parser(sub) -> None:
    parser = sub.add_parser("evaluate", help="caption a COCO-format split and score it (coco-caption metrics)",
                            parents=[_common()])
    parser.add_argument("--images", required=True, help="folder of the split's images")
    parser.add_argument("--captions", required=True, help="COCO captions JSON or Karpathy-split file")
    parser.add_argument("--split", default="test", help="split of a Karpathy file (default: test)")
    parser.add_argument("--out", help="write the metrics here as JSON")
    parser.add_argument("--predictions", help="write the predicted captions here (COCO results format)")
    _decoding_options(parser)
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate

    result = evaluate(args.images, args.captions, model=args.model, split=args.split, device=args.device,
                      engine=args.engine, batch_size=args.batch_size, **_decoding_arguments(args))
    if args.out:
        Path(args.out).write_text(json.dumps(result["metrics"], indent=2) + "\n", encoding="utf-8")
    if args.predictions:
        Path(args.predictions).write_text(json.dumps(result["predictions"], indent=1) + "\n", encoding="utf-8")
    width = max(map(len, result["metrics"]))
    for name, value in result["metrics"].items():
        print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float) else f"{name:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------- export
def _export_parser(sub) -> None:
    from .decoding import GenerationConfig

    parser = sub.add_parser("export", help="copy a checkpoint for inference, optionally in float16, with new "
                                           "default decoding settings or with ONNX graphs", parents=[_common()])
    parser.add_argument("model", help="checkpoint directory to read (e.g. runs/x/best)")
    parser.add_argument("out", help="directory to write (replaced atomically); with --format onnx it may be MODEL "
                                    "itself, to add the ONNX graphs beside its files")
    parser.add_argument("--half-precision", action="store_true", help="store decoder weights as float16 (half size)")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors",
                        help="onnx: also write encoder.onnx, decoder_init.onnx and decoder_step.onnx for ONNX "
                             "Runtime (default: safetensors only)")
    group = parser.add_argument_group("default decoding stored in the copy (unchanged unless given)")
    add_dataclass_options(group, GenerationConfig, default_note="unchanged")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from safetensors import safe_open

    from .decoding import GenerationConfig
    from .model import Captioner
    from .onnx_engine import export_onnx

    options = explicit_options(args, GenerationConfig)
    model = Captioner.from_pretrained(args.model, device="cpu", engine="torch")
    out = Path(args.out)
    if out.resolve() != Path(args.model).resolve():
        model.generation_config = model.generation_config.updated(**options)
        with safe_open(str(Path(args.model) / "model.safetensors"), "pt") as weights:
            stored_half = any(weights.get_slice(name).get_dtype() == "F16" for name in weights.keys())
        if stored_half and not args.half_precision:
            log.warning("%s stores float16 weights; the copy is float32 (twice the size) unless --half-precision",
                        args.model)
        out = model.save_pretrained(out, half_precision=args.half_precision)
        if args.format == "onnx":  # the graphs must hold exactly the weights saved (float16-rounded, say)
            model = Captioner.from_pretrained(out, device="cpu", engine="torch")
    elif args.format != "onnx" or options or args.half_precision:
        raise ConfigError("OUT may be MODEL only to add ONNX graphs (--format onnx, no other options)")
    if args.format == "onnx":
        export_onnx(model.encoder, model.decoder, out)
    size = sum(p.stat().st_size for p in Path(out).iterdir()) / 1e6
    print(f"{out}: {size:.1f} MB, default decoding {model.generation_config.to_dict()}")
    return 0


# ---------------------------------------------------------------------------------------- demo
def _demo_parser(sub) -> None:
    parser = sub.add_parser("demo", help="serve the Gradio web demo", parents=[_common()],
                            description="Serve the web demo on 127.0.0.1:7860 unless --host/--port or "
                                        "GRADIO_SERVER_NAME/GRADIO_SERVER_PORT say otherwise.")
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--host", help="interface to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    _engine_option(parser)
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .runtime import pick_device

    pick_device(args.device)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, not {args.port}")
    from .webapp import launch

    launch(args.model, args.host, args.port, args.device, engine=args.engine)
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
    _evaluate_parser(sub)
    _export_parser(sub)
    _demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.handler(args)
    except CaptionerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_main(argv: list[str] | None = None) -> int:
    """``python train.py ...`` = ``captioner train ...``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])
