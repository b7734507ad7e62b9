"""The edge node's model: the active signed bundle, the previous one kept for rollback, and the health
gate that watches a new model after a swap.

On disk (`root`): `models/<version>/` holds each verified bundle; `slot.json` names the active and the
previous version, the gate under way and the last rollout's outcome. `slot.json` is replaced
atomically (written aside, fsynced, os.replace), so a node killed at any moment restarts on one
model or the other, never on half of each. At start-up the active bundle is verified again
(signature, hashes, test vectors): a file changed on the device while it was off is not run.

The swap itself is one reference assignment, made on the agent's own thread between two rows:
telemetry is published from the spool all along, and each row says which model scored it
(`edge_model`). For the gate's window the previous model scores the same rows beside the new one;
the gate rolls back by itself when the new model fails rows, is too slow, or drifts from the
previous model's outputs by more than the rollout allows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from twin.rollout.protocol import (
    MODEL_PREVIOUS,
    MODEL_VERSION,
    NO_MODEL,
    ROLLOUT_BYTES,
    ROLLOUT_ID,
    ROLLOUT_REASON,
    ROLLOUT_STATE,
    VERSION_RE,
    HealthGate,
)
from twin.sparkplug.payload import Metric

log = logging.getLogger(__name__)
SLOT_FILE = "slot.json"
# the agent's metric names -> the AI4I bundle's graph inputs (deploy.bundle.ai4i_graph)
AI4I_FEEDS = {"air_temperature": "Air temperature [K]", "process_temperature": "Process temperature [K]",
              "rotational_speed": "Rotational speed [rpm]", "torque": "Torque [Nm]", "tool_wear": "Tool wear [min]"}
PREDICTION, MODEL_METRIC = "edge_failure", "edge_model"   # what each data row carries (twin/domain/plant.yaml's mill)


class ModelError(ValueError):
    """A bundle the node will not run (one line: why)."""


class BundleScorer:
    """One verified AI4I bundle's graph in onnxruntime: a mill's readings in, the failure probability out."""

    def __init__(self, folder: Path, version: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one row a tick: threads would only contend with the agent's
        self.version = version
        self.folder = folder
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        if names != {"Type", *AI4I_FEEDS.values()}:
            raise ModelError(f"model {version} is not an AI4I failure model (inputs {sorted(names)[:8]})")

    def failure_probability(self, values: dict[str, Any]) -> float:
        feeds = {"Type": np.array([[str(values.get("product_type", ""))]], dtype=object)}
        for metric, name in AI4I_FEEDS.items():
            value = values.get(metric)
            feeds[name] = np.array([[np.nan if value is None else float(value)]], dtype=np.float64)
        (probability,) = self.session.run(["failure"], feeds)
        return float(probability.reshape(-1)[0])


class _GateWindow:
    """Counts of the rows scored since the swap."""

    def __init__(self, gate: HealthGate, rollout_id: str | None):
        self.gate, self.rollout_id = gate, rollout_id
        self.rows = self.errors = 0
        self.drift_sum = 0.0
        self.compared = 0
        self.latencies_ms: list[float] = []

    def verdict(self) -> str | None:
        """None while healthy; the reason to roll back otherwise (checked on every row: a model that fails
        every row is rolled back as soon as the allowed error share is exceeded, not at the window's end)."""
        gate = self.gate
        if self.errors > gate.max_error_rate * gate.rows:
            return f"{self.errors} of {self.rows} rows failed to score (allowed {gate.max_error_rate:g})"
        if self.rows < gate.rows:
            return None
        drift = self.drift_sum / self.compared if self.compared else 0.0
        if drift > gate.max_drift:
            return (f"prediction drift {drift:.3f} from the previous model over {self.rows} rows "
                    f"(allowed {gate.max_drift:g})")
        p95 = float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else 0.0
        if p95 > gate.max_latency_ms:
            return f"p95 scoring time {p95:.1f} CPU ms over {self.rows} rows (allowed {gate.max_latency_ms:g} ms)"
        return None


class ModelSlot:
    """The node's active model and its previous one. `score` runs on the agent's thread; `install` (from the
    rollout's worker thread) hands a verified bundle over, and the agent's thread swaps it in."""

    def __init__(self, root: Path, *, publisher_key: Path):
        self.root = Path(root)
        self.publisher_key = Path(publisher_key)
        if not self.publisher_key.is_file():
            raise ModelError(f"no such publisher key: {publisher_key}")
        (self.root / "models").mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # slot.json's document: the agent's thread and the rollout worker both write
        self._doc = self._read()
        self.active: BundleScorer | None = None
        self.previous: BundleScorer | None = None
        self._pending: tuple[BundleScorer, str, HealthGate] | None = None  # verified, waiting for the agent's thread
        self._window: _GateWindow | None = None
        self.report_due = threading.Event()  # the agent publishes an NDATA at once when set
        self.stats = {"scored": 0, "score_errors": 0, "swaps": 0, "rollbacks": 0}
        self.swapped_at: float | None = None
        self.rolled_back_at: float | None = None
        for key in ("active", "previous"):
            version = self._doc.get(key)
            if version:
                try:
                    setattr(self, key, self._load(version))
                except ModelError as error:  # e.g. a file changed while the device was off
                    log.error("model %s not loaded: %s", version, error)
                    self._doc[key] = None
        if self._doc.get("gate") and self.active is not None:  # a swap whose gate a restart interrupted
            gate = self._doc["gate"]
            self._window = _GateWindow(HealthGate(**gate["gate"]), gate.get("rollout_id"))

    @property
    def version(self) -> str:
        active = self.active
        return active.version if active is not None else NO_MODEL

    # ------------------------------------------------------------------ files
    def _read(self) -> dict[str, Any]:
        path = self.root / SLOT_FILE
        if not path.is_file():
            return {"active": None, "previous": None, "gate": None, "rollout": None}
        if path.stat().st_size > 64 << 10:
            raise ModelError(f"{path} is larger than 64 KiB")
        try:
            doc = json.loads(path.read_text())
            for key in ("active", "previous"):
                if doc.get(key) is not None and not VERSION_RE.match(str(doc[key])):
                    raise ValueError(f"bad {key} version")
            return doc
        except (ValueError, TypeError, AttributeError) as error:
            raise ModelError(f"{path} is not a model slot file ({error})") from None

    def _write(self, **changes: Any) -> None:
        with self._lock:
            self._doc.update(changes)
            temporary = self.root / f".{SLOT_FILE}.tmp"
            with temporary.open("w") as f:
                json.dump(self._doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.root / SLOT_FILE)

    def _load(self, version: str) -> BundleScorer:
        from core.bundle_signing import BundleIntegrityError
        from deploy.bundle.build import verify_bundle

        folder = self.root / "models" / version
        try:
            verify_bundle(folder, key=self.publisher_key)
        except (BundleIntegrityError, OSError, ValueError, KeyError) as error:
            raise ModelError(f"model {version}: {str(error).splitlines()[0][:300]}") from None
        return BundleScorer(folder, version)

    # ------------------------------------------------------------------ install and swap
    def install(self, bundle: Path, *, version: str, gate: HealthGate, rollout_id: str | None = None) -> None:
        """Move a verified bundle folder into the slot and queue the swap (the agent's thread makes it).
        Raises ModelError if the bundle does not verify here or is no AI4I model."""
        target = self.root / "models" / version
        if target.exists() and version not in (self._doc.get("active"), self._doc.get("previous")):
            shutil.rmtree(target)  # a leftover of an earlier, unfinished install
        if not target.exists():
            os.replace(bundle, target)  # same file system: a rename, whole or not at all
        try:
            scorer = self._load(version)
        except ModelError:
            if version not in (self._doc.get("active"), self._doc.get("previous")):
                shutil.rmtree(target, ignore_errors=True)  # a refused model is not kept on the device
            raise
        with self._lock:
            self._pending = (scorer, rollout_id, gate)

    def install_initial(self, bundle: Path) -> str:
        """Install a bundle by hand (`edge run --bundle`) when the node has no model yet: no gate, nothing to
        compare against. Returns the version."""
        staging = self.root / "staging" / "initial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundle, staging, symlinks=True)
        try:
            version = str(json.loads((staging / "card.json").read_text())["model"]["version"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelError(f"{bundle}: no readable card.json ({error})") from None
        if not VERSION_RE.match(version):
            raise ModelError(f"{bundle}: model version {version[:70]!r} is malformed")
        self.install(staging, version=version, gate=HealthGate(rows=1, max_drift=1.0, max_error_rate=1.0,
                                                               max_latency_ms=60_000.0))
        self._swap()
        self._window = None
        self._write(gate=None)
        return version

    def _swap(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        scorer, rollout_id, gate = pending
        if self.active is not None and self.active.version == scorer.version:
            self.set_report(rollout_id, "healthy", "already the active model")
            return
        old_previous = self._doc.get("previous")
        self.previous, self.active = self.active, scorer
        self._write(previous=self.previous.version if self.previous else None, active=scorer.version,
                    gate={"gate": asdict(gate), "rollout_id": rollout_id})
        if old_previous and old_previous not in (self._doc["active"], self._doc["previous"]):
            shutil.rmtree(self.root / "models" / old_previous, ignore_errors=True)  # two models kept, not more
        self._window = _GateWindow(gate, rollout_id)
        self.stats["swaps"] += 1
        self.swapped_at, self.rolled_back_at = time.monotonic(), None
        self.set_report(rollout_id, "active", None)

    def _rollback(self, reason: str) -> None:
        window, bad = self._window, self.active
        self.active, self.previous = self.previous, None
        self._write(active=self.active.version if self.active else None, previous=None, gate=None)
        shutil.rmtree(self.root / "models" / bad.version, ignore_errors=True)
        self._window = None
        self.stats["rollbacks"] += 1
        self.rolled_back_at = time.monotonic()
        log.warning("model %s rolled back to %s: %s", bad.version, self._doc["active"], reason)
        self.set_report(window.rollout_id, "rolled_back", f"{bad.version}: {reason}")

    def _gate_passed(self) -> None:
        window = self._window
        self._window = None
        self._write(gate=None)
        self.set_report(window.rollout_id, "healthy", f"gate passed over {window.rows} rows")

    # ------------------------------------------------------------------ scoring (the agent's thread)
    def score(self, values: dict[str, Any]) -> dict[str, Any]:
        """The row's extra metrics: the failure probability (when a model could score it) and the model's version."""
        if self._pending is not None:
            self._swap()
        active = self.active
        if active is None:
            return {MODEL_METRIC: NO_MODEL}
        window = self._window
        # the gate judges the model's own CPU time: wall time would also count the agent's wait for the
        # GIL and the CPU (50 agents in one process on 2 loaded cores read 290-570 ms p95 for a ~1 ms model)
        started = time.thread_time()
        try:
            probability = active.failure_probability(values)
            if not math.isfinite(probability):
                raise ModelError("non-finite output")
        except Exception:  # noqa: BLE001 - onnxruntime's errors share no base class; a failed row is counted
            probability = None
        elapsed_ms = (time.thread_time() - started) * 1000.0
        self.stats["scored"] += 1
        if probability is None:
            self.stats["score_errors"] += 1
        if window is None:
            return {MODEL_METRIC: active.version} | ({} if probability is None else {PREDICTION: probability})
        window.rows += 1
        window.latencies_ms.append(elapsed_ms)
        baseline = None
        if self.previous is not None:
            try:
                baseline = self.previous.failure_probability(values)
            except Exception:  # noqa: BLE001 - the previous model's trouble is not the new one's
                baseline = None
        if probability is None:
            window.errors += 1
        elif baseline is not None and math.isfinite(baseline):
            window.drift_sum += abs(probability - baseline)
            window.compared += 1
        reason = window.verdict()
        if reason is not None:
            self._rollback(reason)  # this row keeps the previous model's output: the gate never publishes a bad one
            fallback = self.active.version if self.active else NO_MODEL
            return {MODEL_METRIC: fallback} | ({} if baseline is None else {PREDICTION: baseline})
        if window.rows >= window.gate.rows:
            self._gate_passed()
        return {MODEL_METRIC: active.version} | ({} if probability is None else {PREDICTION: probability})

    # ------------------------------------------------------------------ report
    def set_report(self, rollout_id: str | None, state: str, reason: str | None, downloaded: int | None = None) -> None:
        with self._lock:
            rollout = dict(self._doc.get("rollout") or {})
            if rollout.get("id") != rollout_id:
                rollout = {"id": rollout_id}
            rollout.update(state=state, reason=(reason or "")[:300])
            if downloaded is not None:
                rollout["bytes"] = downloaded
            if state in ("healthy", "rolled_back", "refused", "aborted"):
                self._write(rollout=rollout)  # the outcome survives a restart: the next NBIRTH tells it again
            else:
                self._doc["rollout"] = rollout
        self.report_due.set()

    def last_rollout(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._doc.get("rollout") or {})

    def metrics(self) -> list[Metric]:
        """Node metrics for NBIRTH and NDATA: the active and previous model, the latest rollout's step."""
        rollout = self.last_rollout()
        out = [Metric(MODEL_VERSION, self.active.version if self.active else NO_MODEL, "String"),
               Metric(MODEL_PREVIOUS, self.previous.version if self.previous else NO_MODEL, "String")]
        if rollout.get("id"):
            out += [Metric(ROLLOUT_ID, rollout["id"], "String"), Metric(ROLLOUT_STATE, rollout["state"], "String"),
                    Metric(ROLLOUT_REASON, rollout.get("reason", ""), "String"),
                    Metric(ROLLOUT_BYTES, int(rollout.get("bytes", 0)), "Int64")]
        return out
