"""The shared checks of captioner.bounds, on small dataclasses of their own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest

from captioner.bounds import check_fields, field_types, option
from captioner.errors import ConfigError


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
