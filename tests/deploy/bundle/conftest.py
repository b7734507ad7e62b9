"""Fixtures shared by the bundle tests: the partners' runtimes (made once per session)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.npm import npm_install


@pytest.fixture(scope="session")
def partner_python(tmp_path_factory):
    """A fresh virtual environment with only onnxruntime and numpy (from PyPI), made once per session."""
    venv = tmp_path_factory.mktemp("partner") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "onnxruntime", "numpy"],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"cannot install onnxruntime from PyPI: {install.stderr.strip().splitlines()[-1:]}")
    return python


@pytest.fixture(scope="session")
def partner_node(tmp_path_factory):
    """onnxruntime-node from npm in a test folder (its CPU binaries ship in the package)."""
    return npm_install(tmp_path_factory.mktemp("node"), "onnxruntime-node")
