"""Installing an npm package for a test that runs node (partner and interoperability tests)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def npm_install(folder: Path, package: str) -> Path:
    """`npm install package` into folder; its node_modules, or the test is skipped with the reason.

    --ignore-scripts: install scripts only fetch optional extras (onnxruntime-node's CUDA provider,
    from nuget.org, unreachable in CI); the packages' CPU code ships in the tarballs.
    """
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.skip("node and npm are not installed")
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", package],
                             cwd=folder, capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.skip(f"cannot install {package} from npm: {install.stderr.strip().splitlines()[-1:]}")
    return folder / "node_modules"
