"""A rollout set-up in one process, for the rollout tests and benchmarks/rollout.py: a publisher key made on
the spot, signed AI4I bundles of models trained on generated rows (sound ones, and a degraded one whose
labels are inverted: it passes its own test vectors but disagrees with a sound model on nearly every
row), and a twin with its rollout API served over HTTPS by uvicorn in a thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path


def make_keys(folder: Path, name: str = "publisher") -> tuple[Path, Path]:
    """An EC P-256 key pair in PEM: (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def ai4i_bundle(folder: Path, *, sign_key: Path, seed: int, degraded: bool = False, rows: int = 2000) -> Path:
    """Train an AI4I failure model on generated rows (one MoE epoch: the bundle carries LightGBM) and build its
    signed bundle in folder/bundle. `degraded`: every label inverted."""
    from deploy.bundle.build import build_bundle
    from manufacturing.maintenance.ai4i import OUTPUTS, AI4IFailureModel, generate_ai4i

    frame = generate_ai4i(rows, seed=seed)
    if degraded:
        for column in ("Machine failure", *OUTPUTS[1:]):
            frame[column] = 1 - frame[column]
    model = AI4IFailureModel(max_epochs=1, progress=False).fit(frame).save(folder / "model")
    return Path(build_bundle(model, folder / "bundle", sign_key=sign_key)["bundle"])


@dataclass
class HttpsServer:
    """uvicorn serving `app` over HTTPS (or HTTP without a certificate) on 127.0.0.1 in a thread."""
    app: object
    port: int
    cert: Path | None = None
    key: Path | None = None

    def start(self) -> HttpsServer:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    ssl_certfile=self.cert, ssl_keyfile=self.key,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="rollout-https", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.server.started:
            raise RuntimeError(f"the HTTPS server did not start on port {self.port}")
        return self

    @property
    def url(self) -> str:
        return f"{'https' if self.cert else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
