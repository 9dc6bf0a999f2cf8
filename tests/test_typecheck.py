"""The package type-checks clean under mypy, at the strictness stated in pyproject.toml's [tool.mypy]."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_reports_no_errors_in_the_package():
    # The configuration (files, check_untyped_defs, per-module overrides) is read from pyproject.toml;
    # the incremental cache (.mypy_cache) makes reruns take a few seconds instead of ~25 s cold.
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "flax_attention"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy found errors (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
    assert "Success: no issues found" in proc.stdout, proc.stdout + proc.stderr


def test_the_package_ships_its_py_typed_marker():
    """PEP 561: without the marker (packaged as package data) mypy ignores our annotations in user code."""
    assert (ROOT / "flax_attention" / "py.typed").is_file()
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1].split("\n[")[0]
    assert 'flax_attention = ["py.typed"]' in section, section
