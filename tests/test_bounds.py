"""The shared checks of captioner.bounds, on small dataclasses of their own."""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, fields
from typing import Optional

import pytest
from conftest import ROOT

from captioner.bounds import check_fields, field_types, from_dict, json_schema, option
from captioner.generation.config import GenerationConfig
from captioner.models.encoder import EncoderConfig
from captioner.errors import CaptionerError, ConfigError
from captioner.models.captioner import CaptionerConfig
from captioner.train.config import TrainConfig


@dataclass
class Options:
    count: int | None = option(None, range=(1, 9))
    ratio: Optional[float] = option(None, range=(0.0, 1.0))
    name: None | str = option(None)
    flag: bool = option(False)
    sizes: list[int] | None = None

    def __post_init__(self) -> None:
        check_fields(self)


def test_field_types_are_read_from_the_types_not_their_spelling():
    assert field_types(Options) == {"count": (int, True), "ratio": (float, True), "name": (str, True),
                                    "flag": (bool, False), "sizes": (list, True)}


@pytest.mark.parametrize("options, message", [
    (dict(count=0), "count must be between 1 and 9, not 0"),
    (dict(count=2.5), "count must be an integer, not 2.5"),
    (dict(ratio="0.5"), "ratio must be a number, not '0.5'"),
    (dict(ratio=float("nan")), "ratio must be a finite number"),
    (dict(name=3), "name must be a string, not 3"),
    (dict(flag=None), "flag must be true or false, not None"),
])
def test_optional_fields_are_checked_like_the_others(options, message):
    with pytest.raises(ConfigError, match=message):
        Options(**options)


def test_optional_fields_accept_none_and_their_type():
    assert Options() == Options(None, None, None, False, None)
    assert Options(count=3, ratio=1, name="x", sizes=[1]).ratio == 1.0 and isinstance(Options(ratio=1).ratio, float)


@dataclass
class Rates:
    """Bounds with open ends, declared once and enforced, described and exported from that one declaration."""

    lr: float = option(0.1, "a learning rate", range=(0, 1), open="low")
    smoothing: float = option(0.0, "label smoothing", range=(0, 1), open="high")
    gap: float = option(0.5, range=(0, 1), open="both")
    size: int | None = option(None, "a size", range=(1, 9))
    mode: str = option("a", choices=("a", "b"))

    def __post_init__(self) -> None:
        check_fields(self)


@pytest.mark.parametrize("options, message", [
    (dict(lr=0), "lr must be above 0 and at most 1, not 0"),
    (dict(smoothing=1), "smoothing must be at least 0 and below 1, not 1"),
    (dict(gap=1.0), "gap must be above 0 and below 1, not 1.0"),
    (dict(gap=0.0), "gap must be above 0 and below 1, not 0.0"),
])
def test_open_ends_of_a_range_are_refused(options, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        Rates(**options)
    Rates(lr=1, smoothing=0, gap=0.999)  # the closed ends and the inside pass


@pytest.mark.parametrize("key, value", [("lr", 0.0), ("encoder_lr", 0.0), ("scst_lr", 0.0),
                                        ("label_smoothing", 1.0)])
def test_training_rates_are_bounded_by_their_declaration(key, value):
    """TrainConfig's rates are bounded in their fields, not by a hand-written check in validate()."""
    item = {f.name: f for f in fields(TrainConfig)}[key]
    low, high = item.metadata["range"]
    assert low <= value <= high  # inside the closed range: only the declared open end refuses it
    with pytest.raises(ConfigError, match=f"^{key} must be "):
        TrainConfig(**{key: value}).validate()


def test_json_schema_is_the_declaration():
    schema = json_schema(Rates, {"mode": "b"})
    assert schema["lr"] == {"type": "number", "default": 0.1, "description": "a learning rate",
                            "exclusiveMinimum": 0, "maximum": 1}
    assert schema["smoothing"]["minimum"] == 0 and schema["smoothing"]["exclusiveMaximum"] == 1
    assert schema["size"]["type"] == ["integer", "null"] and "nullable" not in schema["size"]
    assert schema["mode"] == {"type": "string", "default": "b", "enum": ["a", "b"]}
    generation = json_schema(GenerationConfig)
    for item in fields(GenerationConfig):
        if "range" in item.metadata:
            assert (generation[item.name]["minimum"], generation[item.name]["maximum"]) == item.metadata["range"]


BUNDLED_CONFIG = json.loads((ROOT / "assets" / "model" / "config.json").read_text())


def _with(path: tuple[str, ...], **extra) -> dict:
    config = copy.deepcopy(BUNDLED_CONFIG)
    functools.reduce(lambda node, key: node[key], path, config).update(extra)
    return config


@pytest.mark.parametrize("load, message", [
    (lambda: CaptionerConfig.from_dict(_with((), surprise=1)), "unknown field(s) surprise"),
    (lambda: CaptionerConfig.from_dict(_with(("decoder",), surprise=1)), "decoder: unknown field(s) surprise"),
    (lambda: EncoderConfig.from_dict(_with(("encoder",), surprise=1)["encoder"]), "encoder: unknown field(s) surprise"),
    (lambda: EncoderConfig.from_dict(_with(("encoder", "preprocessing"), surprise=1)["encoder"]),
     "preprocessing: unknown field(s) surprise"),
    (lambda: GenerationConfig.from_dict({"surprise": 1, "beam_size": 2}), "generation: unknown decoding option(s) surprise"),
    (lambda: GenerationConfig().updated(surprise=1, other=2), "unknown decoding option(s) other, surprise"),
    (lambda: TrainConfig.from_dict({"surprise": 1, "epochs": 2}, "run.toml"), "run.toml: unknown option(s) surprise"),
])
def test_every_config_dataclass_refuses_unknown_fields_in_one_line(load, message):
    with pytest.raises(CaptionerError) as error:
        load()
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("load, message", [
    (lambda: CaptionerConfig.from_dict(_with((), decoder=[1])), "decoder: must be an object of fields, not list"),
    (lambda: EncoderConfig.from_dict("mobilenet_v2"), "encoder: must be an object of fields, not str"),
    (lambda: GenerationConfig.from_dict([1, 2]), "generation: must be an object of decoding options, not list"),
    (lambda: TrainConfig.from_dict({"epochs": "3"}, "run.toml"), "run.toml: epochs must be an integer, not '3'"),
])
def test_config_dataclasses_refuse_what_is_not_an_object_of_their_fields(load, message):
    with pytest.raises(CaptionerError) as error:
        load()
    assert message in str(error.value)


def test_from_dict_builds_the_dataclass():
    assert from_dict(Options, {"count": 3, "name": "x"}) == Options(count=3, name="x")
    with pytest.raises(ConfigError, match=r"^here: unknown field\(s\) size$"):
        from_dict(Options, {"size": 3}, where="here")
