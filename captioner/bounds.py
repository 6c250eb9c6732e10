"""Strict checks of values that come from outside (options, config files, checkpoints).

Every option dataclass declares each option once, in its field: type (the annotation), default, help text and
bounds (``range=(low, high)``, inclusive unless ``open="low"``, ``"high"`` or ``"both"``; ``choices=(...)``). That
one declaration drives everything: :func:`check_fields` enforces it with the declared type where a value enters,
:func:`options_from_text` parses URL queries and forms to those types, the CLI's flags and their help are made
from it (``cli.add_dataclass_options``), and :func:`json_schema` gives the HTTP API's OpenAPI parameters. Types are strict: ``True`` is not an ``int``,
``"3"`` is not a number, ``2.5`` is not an ``int``; an ``int`` is accepted where a ``float`` is
declared. Floats must be finite.
"""

from __future__ import annotations

import functools
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, field, fields
from typing import Any, TypeVar

from .errors import CaptionerError, ConfigError


T = TypeVar("T")
SCALAR_TYPES = (int, float, str, bool)
MAX_NAMED = 5  # unknown names listed in one error line; the rest are counted, so a line stays one line
_WANTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@functools.cache
def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """``{name: (type, optional)}`` of a dataclass's fields, each type resolved from its annotation (a string
    under ``from __future__ import annotations``) and ``X | None`` split into ``(X, True)``.

    Read from the types themselves (:func:`typing.get_type_hints`), not their spelling, so ``Optional[int]``,
    ``None | int`` and ``int | None`` are one type. A field of another type (a list, a nested config) maps to
    its origin (``list``) or itself: those check themselves.
    """
    hints = typing.get_type_hints(cls)
    types_ = {}
    for item in fields(cls):
        hint, optional = hints[item.name], False
        arguments = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in arguments:
            rest = [argument for argument in arguments if argument is not type(None)]
            hint, optional = (rest[0], True) if len(rest) == 1 else (hint, False)
        types_[item.name] = (typing.get_origin(hint) or hint, optional)
    return types_


OPEN_ENDS = ("low", "high", "both")


def option(default: Any, help: str = "", **metadata: Any):
    """A dataclass field carrying its help text and bounds (``range``, its ``open`` ends, ``choices``)."""
    if metadata.get("open") not in (None, *OPEN_ENDS):
        raise TypeError(f"open must be one of {OPEN_ENDS}, not {metadata['open']!r}")
    return field(default=default, metadata={"help": help, **metadata})


def option_like(cls: type, name: str, help: str = "") -> Any:
    """The field ``name`` of dataclass ``cls`` again (default and bounds), for an option that sets it: its
    default and range are then written once."""
    source = {item.name: item for item in fields(cls)}[name]
    metadata = {**source.metadata, "help": help or source.metadata.get("help", "")}
    return field(default=source.default, metadata=metadata)


def check_value(name: str, value: Any, kind: type, range: tuple | None = None, choices: tuple | None = None,
                error: type[CaptionerError] = ConfigError, where: str = "", optional: bool = False,
                open: str | None = None) -> Any:
    """``value`` if it is of ``kind`` (``int``, ``float``, ``str`` or ``bool``; or ``None`` when ``optional``)
    and within ``range`` (inclusive but at its ``open`` ends) or ``choices``; otherwise ``error``."""
    prefix = f"{where}: " if where else ""
    if value is None and optional:
        return None
    if kind not in SCALAR_TYPES:
        raise TypeError(f"unsupported option type {kind!r} for {name}")
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if ok and kind is float and not math.isfinite(value):
            raise error(f"{prefix}{name} must be a finite number, not {value!r}")
    if not ok:
        raise error(f"{prefix}{name} must be {_WANTED[kind]}, not {_show(value)}")
    if choices is not None and value not in choices:
        raise error(f"{prefix}{name} must be one of {', '.join(map(str, choices))}, not {_show(value)}")
    if range is not None:
        low, high = range
        above = value > low if open in ("low", "both") else value >= low
        below = value < high if open in ("high", "both") else value <= high
        if not (above and below):
            raise error(f"{prefix}{name} must be {describe_range(range, open)}, not {_show(value)}")
    return float(value) if kind is float else value


def describe_range(range: tuple, open: str | None = None) -> str:
    """``"between 1 and 64"``, or with an open end ``"above 0 and at most 1"``: the words of errors and help."""
    low, high = range
    if open is None:
        return f"between {low} and {high}"
    lower = f"above {low}" if open in ("low", "both") else f"at least {low}"
    upper = f"below {high}" if open in ("high", "both") else f"at most {high}"
    return f"{lower} and {upper}"


def _field_bounds(item) -> dict[str, Any]:
    """A field's bounds as :func:`check_value`'s keywords, from its metadata."""
    return {key: item.metadata.get(key) for key in ("range", "choices", "open")}


_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def json_schema(cls: type, defaults: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{name: JSON Schema}`` of a dataclass's scalar fields, from the same declaration :func:`check_fields`
    enforces: type (``["integer", "null"]`` when optional, as JSON Schema 2020-12 and OpenAPI 3.1 spell it),
    default (from ``defaults`` where the real one lives elsewhere, a model's config), help as ``description``, ``range`` as ``minimum``/``maximum`` (``exclusive...`` at an ``open`` end)
    and ``choices`` as ``enum``."""
    schemas = {}
    for item in fields(cls):
        kind, optional = field_types(cls)[item.name]
        if kind not in SCALAR_TYPES or item.name.isupper():
            continue
        schema: dict[str, Any] = {"type": [_JSON_TYPES[kind], "null"] if optional else _JSON_TYPES[kind]}
        default = (defaults or {}).get(item.name, item.default)
        if default is not MISSING:
            schema["default"] = default
        if item.metadata.get("help"):
            schema["description"] = item.metadata["help"]
        if "range" in item.metadata:
            (low, high), open = item.metadata["range"], item.metadata.get("open")
            schema["exclusiveMinimum" if open in ("low", "both") else "minimum"] = low
            schema["exclusiveMaximum" if open in ("high", "both") else "maximum"] = high
        if "choices" in item.metadata:
            schema["enum"] = list(item.metadata["choices"])
        schemas[item.name] = schema
    return schemas


def check_fields(instance: Any, error: type[CaptionerError] = ConfigError, where: str = "") -> None:
    """Check every field of a dataclass instance against its declared type and metadata bounds."""
    cls: type = type(instance)
    kinds = field_types(cls)
    for item in fields(instance):
        kind, optional = kinds[item.name]
        if kind not in SCALAR_TYPES:
            continue  # lists and nested configs check themselves
        value = check_value(item.name, getattr(instance, item.name), kind, error=error, where=where,
                            optional=optional, **_field_bounds(item))
        object.__setattr__(instance, item.name, value)


def check_object(cls: type, data: object, what: str = "field", where: str = "",
                 error: type[CaptionerError] = ConfigError) -> dict[str, Any]:
    """``data`` if it is an object (a ``dict``) whose every key is a field of dataclass ``cls``; else one ``error``
    line naming all unknown keys, so a typo in a file or an option is reported instead of being ignored."""
    prefix = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise error(f"{prefix}must be an object of {what}s, not {type(data).__name__}")
    unknown = sorted(map(str, set(data) - {item.name for item in fields(cls)}))
    if unknown:
        shown = ", ".join(_show(name)[1:-1] for name in unknown[:MAX_NAMED])
        more = f" and {len(unknown) - MAX_NAMED:,} more" if len(unknown) > MAX_NAMED else ""
        raise error(f"{prefix}unknown {what}(s) {shown}{more}")
    return data


def check_options(cls: type, data: object, error: type[CaptionerError] = ConfigError,
                  where: str = "", what: str = "option") -> dict[str, Any]:
    """``data``, a subset of a dataclass's fields by name (:func:`check_object`), if each value has its field's
    type and bounds."""
    options = check_object(cls, data, what, where, error)
    by_name, kinds = {item.name: item for item in fields(cls)}, field_types(cls)
    for name, value in options.items():
        item, (kind, optional) = by_name[name], kinds[name]
        if kind in SCALAR_TYPES:
            check_value(name, value, kind, error=error, where=where, optional=optional, **_field_bounds(item))
    return options


def from_dict(cls: type[T], data: object, what: str = "field", where: str = "",
              error: type[CaptionerError] = ConfigError) -> T:
    """``cls(**data)`` for a JSON object from outside, strictly: ``data`` must be an object, each key a field
    of dataclass ``cls`` (:func:`check_object`) and each value of its type and bounds, or one ``error`` line
    naming ``where``. The one way a config dataclass is read from a file."""
    return cls(**check_options(cls, data, error, where, what))


MAX_DIGITS = 30  # integers given as text: no bound of ours needs more
_INTEGER = re.compile(r"[+-]?[0-9]+")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def options_from_text(cls: type, pairs: Iterable[tuple[str, str]], what: str = "option",
                      error: type[CaptionerError] = ConfigError) -> dict[str, Any]:
    """Options given as text (a URL's query, a form's fields) as the types of dataclass ``cls``'s fields.

    ``"3"`` becomes ``3`` for an ``int`` field, ``"0.5"`` a number, ``true``/``false`` (or ``1``/``0``) a boolean,
    and an empty value (or ``none``) ``None`` for an optional field; text that is not of its field's type is one
    ``error`` line naming the option. Names are not checked here, nor bounds: the class does both, as for any
    other source. A name given twice is refused rather than one value silently winning.
    """
    kinds = field_types(cls)
    options: dict[str, Any] = {}
    for name, text in pairs:
        if name in options:
            raise error(f"{what} {name} is given twice")
        kind, optional = kinds.get(name, (str, False))
        if optional and text.strip().lower() in ("", "none", "null"):
            options[name] = None
        elif kind is int and _INTEGER.fullmatch(text.strip()):
            digits = len(text.strip().lstrip("+-"))
            if digits > MAX_DIGITS:  # checked before int(), which refuses over 4,300 digits with a traceback
                raise error(f"{name} must be an integer of at most {MAX_DIGITS} digits, not one of {digits:,}")
            options[name] = int(text)
        elif kind is bool and text.strip().lower() in _BOOLEANS:
            options[name] = _BOOLEANS[text.strip().lower()]
        elif kind is float and _is_number(text):
            options[name] = float(text)
        elif kind is str:
            options[name] = text
        else:
            raise error(f"{name} must be {_WANTED.get(kind, 'a scalar')}, not {_show(text)}")
    return options


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "_" not in text


def describe_bounds(item) -> str:
    """``"1-64"`` or ``"beam, greedy, sample"`` for help texts, from a field's metadata."""
    if "choices" in item.metadata:
        return ", ".join(map(str, item.metadata["choices"]))
    if "range" in item.metadata:
        return describe_range(item.metadata["range"], item.metadata.get("open"))
    return ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
