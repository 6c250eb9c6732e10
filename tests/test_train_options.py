"""Where each training option comes from: flags over the --config file over a resumed run's saved options over
the defaults (a pure function, so every order is checked without training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioner.errors import ConfigError
from captioner.train.config import TrainConfig, resume_folder, run_options


def test_each_option_comes_from_the_first_place_that_gives_it():
    saved = {"epochs": 7, "lr": 0.01, "batch_size": 16, "seed": 3}
    file = {"lr": 0.02, "batch_size": 32}
    flags = {"batch_size": 64}
    config = run_options(flags, file, saved)
    assert config.batch_size == 64  # the flag beats the file and the saved run
    assert config.lr == 0.02  # the file beats the saved run
    assert (config.epochs, config.seed) == (7, 3)  # the saved run beats the defaults
    assert config.hidden_size == TrainConfig().hidden_size  # given nowhere: the default


def test_nothing_given_is_the_defaults():
    assert run_options({}) == TrainConfig()


def test_an_unknown_option_in_the_file_is_named_by_its_file():
    with pytest.raises(ConfigError, match=r"^run\.toml: unknown option\(s\) surprise"):
        run_options({"epochs": 2}, {"surprise": 1}, file_name="run.toml")


def test_a_bad_value_in_the_file_is_refused_even_when_a_flag_overrides_it():
    with pytest.raises(ConfigError, match="run.toml: epochs must be an integer"):
        run_options({"epochs": 2}, {"epochs": "many"}, file_name="run.toml")


@pytest.mark.parametrize("flags, file, expected", [
    ({"out": "runs/flag"}, {"out": "runs/file"}, "runs/flag"),
    ({}, {"out": "runs/file"}, "runs/file"),
    ({}, {}, TrainConfig.out),
])
def test_resume_finds_the_run_folder_in_the_same_order(flags, file, expected):
    assert resume_folder(flags, file) == Path(expected)
