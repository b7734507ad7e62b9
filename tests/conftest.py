import os
import shutil
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tests run under xdist, one process per core


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real datasets (CI sets MOEWORKS_DATA=../shared/data); tests that need them skip without."""
    root = Path(os.environ.get("MOEWORKS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    return root


@pytest.fixture
def broker(tmp_path):
    """A real Mosquitto on a free loopback port (.ci/run installs Debian's mosquitto)."""
    from twin.services import Mosquitto

    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    with Mosquitto(workdir=tmp_path / "mosquitto") as b:
        yield b
