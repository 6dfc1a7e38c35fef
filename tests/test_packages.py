"""`make demo` installs requirements-demo.txt only: what needs more says so in one line (runtime/packages.py)."""
from __future__ import annotations

import importlib.util
import os
import runpy

import pytest
from conftest import ROOT

from runtime.packages import missing_packages
from trainer.config import PRETRAIN, ConfigError, RunConfig, build_parser, check_packages

REAL_FIND_SPEC = importlib.util.find_spec


def hide(monkeypatch, *names: str) -> None:
    """Make `names` look uninstalled to missing_packages."""
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in names else REAL_FIND_SPEC(name, *a, **k))


def test_missing_packages_names_them_and_the_command():
    assert missing_packages(["json", "torch"], "anything") is None
    line = missing_packages(["json", "no_such_package_here"], "the thing")
    assert "needs the Python package(s) no_such_package_here, which" in line  # json is installed: not named
    assert "the thing" in line and "make install" in line and "\n" not in line


def test_training_refuses_wandb_and_parquet_without_their_packages(monkeypatch, tmp_path):
    parquet = str(tmp_path / "data.parquet")
    config = RunConfig.from_args(build_parser(PRETRAIN).parse_args(["--use_wandb", "--data_path", parquet]))
    check_packages(config)  # both installed here
    hide(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match="--use_wandb needs .*wandb"):
        check_packages(config)
    hide(monkeypatch, "pyarrow")
    with pytest.raises(ConfigError, match="parquet data needs .*pyarrow"):
        check_packages(RunConfig.from_args(build_parser(PRETRAIN).parse_args(["--data_path", parquet])))
    check_packages(RunConfig.from_args(build_parser(PRETRAIN).parse_args(["--data_path", "x.json"])))


def test_api_server_says_what_to_install(monkeypatch):
    hide(monkeypatch, "fastapi")
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(os.path.join(ROOT, "serve_openai_api.py"), run_name="__main__")
    assert "error: the API server needs the Python package(s) fastapi" in str(stop.value.code)


def test_benchmark_says_what_to_install(monkeypatch, capsys):
    from evaluation.jobs import check_benchmark

    hide(monkeypatch, "pyarrow")
    assert check_benchmark("pope", None) is None
    assert "pyarrow" in capsys.readouterr().err
