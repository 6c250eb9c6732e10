"""The ``captioner`` command: ``train``, ``caption`` and ``evaluate``, thin layers over the package.

User mistakes (bad files, bad options) print ``error: <one line>`` and exit with status 2; a file
that cannot be captioned is reported and skipped, and the exit status is 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from dataclasses import MISSING, fields
from pathlib import Path

from .errors import CaptionerError, ConfigError

log = logging.getLogger("captioner")

DECODING_HELP = {
    "strategy": "beam search, greedy, or sampling",
    "beam_size": "beams kept per image",
    "num_return_sequences": "captions returned per image (n-best list or samples)",
    "max_length": "longest caption in words",
    "min_length": "shortest caption in words",
    "length_penalty": "rank beams by log-prob / length ** this (0 = raw log-prob; >0 favours longer)",
    "no_repeat_ngram_size": "never repeat an n-gram of this size (0 = off)",
    "suppress_unk": "never output <unk>",
    "temperature": "sampling temperature",
    "top_k": "sample among the k likeliest words (0 = all)",
    "top_p": "sample among the likeliest words holding this much probability (1 = all)",
    "seed": "random seed for sampling",
}
_TYPES = {"int": int, "float": float, "str": str, "int | None": int}


def add_dataclass_options(parser: argparse.ArgumentParser, cls, helps: dict[str, str] | None = None) -> None:
    """One ``--flag`` per dataclass field, default ``None`` so that only explicit flags override."""
    for item in fields(cls):
        if item.name.isupper():
            continue
        help_text = (helps or {}).get(item.name) or item.metadata.get("help", "")
        default = item.default if item.default is not MISSING else None
        kwargs: dict = {"default": None, "help": f"{help_text} (default: {default!r})"}
        if item.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = _TYPES[item.type]
            if "choices" in item.metadata:
                kwargs["choices"] = item.metadata["choices"]
        parser.add_argument("--" + item.name.replace("_", "-"), dest=item.name, **kwargs)


def explicit_options(args: argparse.Namespace, cls) -> dict:
    names = {item.name for item in fields(cls)}
    return {key: value for key, value in vars(args).items() if key in names and value is not None}


def read_config_file(path: str) -> dict:
    """Options from a JSON or TOML file (keys are option names, with ``_`` or ``-``)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
        data = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: invalid config file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config file must hold a table/object of options")
    return data


# ---------------------------------------------------------------------------------------- train
def _train_parser(sub) -> None:
    from .training import TrainConfig

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
    from .training import TRAINER_FILE, TrainConfig, train

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
        saved = checkpoint.read_json(trainer_file)["config"]
    best = train(TrainConfig.from_dict({**saved, **from_file, **explicit}), resume=args.resume)
    print(f"best checkpoint: {best}")
    return 0


# ---------------------------------------------------------------------------------------- caption
def _decoding_options(parser: argparse.ArgumentParser) -> None:
    from .decoding import GenerationConfig
    from .onnx_engine import ENGINES

    group = parser.add_argument_group("decoding (defaults come from the model's config.json)")
    add_dataclass_options(group, GenerationConfig, DECODING_HELP)
    parser.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="run the model with ONNX Runtime (CPU, needs the model's ONNX export) or PyTorch; "
                             "auto: ONNX Runtime when on the CPU and exported (default: auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="images decoded together (default: 32)")


def _caption_parser(sub) -> None:
    parser = sub.add_parser("caption", help="caption image files or folders", parents=[_common()])
    parser.add_argument("paths", nargs="+", help="image files, or folders searched recursively")
    parser.add_argument("--num-captions", type=int, dest="num_return_sequences_alias", default=None,
                        help="alias of --num-return-sequences")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image, with scores")
    _decoding_options(parser)
    parser.set_defaults(handler=_caption)


def find_images(paths: list[str]) -> list[Path]:
    """Expand folders (recursively, image extensions only); files are taken as given."""
    from .images import IMAGE_EXTENSIONS

    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
        else:
            found.append(path)
    return found


def _caption(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .decoding import GenerationConfig
    from .model import Captioner

    options = explicit_options(args, GenerationConfig)
    if args.num_return_sequences_alias is not None:
        options["num_return_sequences"] = args.num_return_sequences_alias
    model = Captioner.from_pretrained(args.model, device=args.device, engine=args.engine)
    model.generation_config.updated(**options)  # reject bad options before any work
    files = find_images(args.paths)
    if not files:
        raise ConfigError("no images found in the given paths")
    failures = 0
    with tqdm(total=len(files), unit="image", disable=len(files) < 10 or not sys.stderr.isatty()) as bar:
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            good, features = _encode_each(model, chunk)
            failures += len(chunk) - len(good)
            results = model.generate(features, **options) if good else []
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


def _encode_each(model, paths: list[Path]):
    """Encode a chunk, reporting and skipping images that cannot be read."""
    import torch

    from .errors import ImageError

    try:
        return paths, model.encode(paths)
    except ImageError:
        pass
    good, rows = [], []
    for path in paths:
        try:
            rows.append(model.encode([path]))
            good.append(path)
        except ImageError as exc:
            print(f"error: {exc}", file=sys.stderr)
    return good, (torch.cat(rows) if rows else None)


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
    from .decoding import GenerationConfig

    result = evaluate(args.images, args.captions, model=args.model, split=args.split, device=args.device,
                      engine=args.engine, batch_size=args.batch_size, **explicit_options(args, GenerationConfig))
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
    add_dataclass_options(group, GenerationConfig, DECODING_HELP)
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from .decoding import GenerationConfig
    from .model import Captioner
    from .onnx_engine import export_onnx

    options = explicit_options(args, GenerationConfig)
    model = Captioner.from_pretrained(args.model, device="cpu", engine="torch")
    out = Path(args.out)
    if out.resolve() != Path(args.model).resolve():
        model.generation_config = model.generation_config.updated(**options)
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
