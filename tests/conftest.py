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
    from tests.services import Mosquitto

    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    with Mosquitto(workdir=tmp_path / "mosquitto") as b:
        yield b


def _tiny_rul_estimator(kind: str, num_regimes: int = 1):
    """A RUL estimator small enough to fit in seconds. kind: lstm, moe, or moe-ensemble (two
    members over the regime-history and running-mean features, the MoE recipe's shape)."""
    from dataclasses import replace

    from manufacturing.maintenance.features import FeatureConfig
    from manufacturing.maintenance.models import RULNetConfig
    from manufacturing.maintenance.rul import RULEstimator, RULTrainConfig

    ensemble = kind == "moe-ensemble"
    net = RULNetConfig(kind="moe" if ensemble else kind, hidden_size=16, num_layers=1, members=2 if ensemble else 1,
                       moe=replace(RULNetConfig().moe, hidden_size=16, intermediate_size=32))
    features = FeatureConfig(num_regimes=num_regimes, history=ensemble, running_mean=ensemble)
    return RULEstimator(net=net, features=features,
                        train=RULTrainConfig(max_epochs=1, windows_per_epoch=512, progress=False))


@pytest.fixture(scope="session")
def tiny_rul_estimator():
    """The factory `_tiny_rul_estimator(kind, num_regimes=1)`."""
    return _tiny_rul_estimator
