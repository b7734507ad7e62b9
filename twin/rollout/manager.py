"""Signed model rollouts from the twin to its edge nodes, canary first.

`start` copies a bundle (deploy/bundle's signed format) into the twin's rollout folder and verifies
the copy's signature against the configured publisher key and every file's hash: what is offered is
what was verified, whatever happens to the source folder later. Then the canary share of the target
nodes is told by NCMD (twin.rollout.protocol); each node downloads the files from this twin over
HTTP(S) with the token the NCMD carried, checks the signature, the hashes and the bundle's test
vectors itself, swaps, and runs its health gate; it reports each step in its node metrics. When every
canary node has passed its gate the other nodes are told; a canary that is refused, rolls back or
does not answer stops the rollout there. Each step is committed to the database before it is acted
on; a thread re-reads the state every `tick_s`, so a restarted twin carries on (an NCMD lost to an
offline node is sent again every `resend_s`).

With twin workers (twin/scaleout) every worker runs a manager on the same tables: each one's API starts,
aborts and reads rollouts and serves the bundle's files, but only the worker that holds the rollout lease
(`service.rollout_fence()`) moves them on, and its writes are fenced by that lease, so each command is
decided once; a worker that takes the lease over carries on from the rows. Node reports are read with
`service.nodes_metrics`, which a worker answers from the state its nodes' owners share.

This module imports nothing from deploy/: the signature check is core.bundle_signing's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twin.rollout.protocol import (
    MAX_BUNDLE_BYTES,
    MODEL_PREVIOUS,
    MODEL_VERSION,
    NODE_REPORTED,
    NODE_TERMINAL,
    ROLLOUT_ID,
    ROLLOUT_REASON,
    ROLLOUT_STATE,
    VERSION_RE,
    HealthGate,
    RolloutCommand,
)
from twin.rollout.store import LeaseLost, Rollout, RolloutNode, RolloutStore
from twin.sparkplug.codec import encode
from twin.sparkplug.payload import Topic

log = logging.getLogger(__name__)
REQUIRED_FILES = ("model.onnx", "card.json", "test_vectors.json")
MANIFEST, SIGNATURE = "manifest.json", "model.sig"
MAX_TARGETS = 10_000
MAX_TOKENS_PER_NODE = 16  # each resend adds one; an agent resuming after a restart still holds an older one


class RolloutError(ValueError):
    """A rollout request the twin refuses (one line: what is wrong)."""


@dataclass(frozen=True)
class RolloutConfig:
    folder: Path                  # accepted bundles are copied here, one folder per rollout
    publisher_key: Path           # EC public key (PEM) that every offered bundle's signature must verify with
    base_url: str                 # how the edge nodes reach this twin's API, e.g. https://twin.plant:8443
    tick_s: float = 0.5           # how often the rollouts move on (node reports arrive with the NDATA)
    resend_s: float = 10.0        # an offered node that has not answered is told again this often
    node_timeout_s: float = 900.0  # a node silent this long after its offer counts as failed

    def __post_init__(self):
        if not str(self.base_url).startswith(("http://", "https://")):
            raise ValueError(f"rollout base URL must start with http:// or https://, got {self.base_url!r}")
        for name in ("tick_s", "resend_s", "node_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value <= 86_400:
                raise ValueError(f"RolloutConfig.{name} must be a positive number of seconds up to a day")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RolloutManager:
    """Starts, advances and aborts rollouts for one TwinService (its plant, its MQTT client, its node state)."""

    def __init__(self, *, config: RolloutConfig, service, store: RolloutStore | None = None):
        if not Path(config.publisher_key).is_file():
            raise RolloutError(f"no such publisher key: {config.publisher_key}")
        self.config = config
        self.service = service
        self.store = store or RolloutStore(service.config.db)
        service.enable_rollouts()
        self._lock = threading.RLock()   # one change at a time: API calls and the ticker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ life cycle
    def start_thread(self) -> RolloutManager:
        self._thread = threading.Thread(target=self._loop, name="twin-rollouts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.store.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a database hiccup costs one tick, not the rollouts
                log.exception("rollout tick failed")

    # ------------------------------------------------------------------ operator's requests
    def start(self, *, bundle: Path, nodes: list[str], canary_share: float, gate: HealthGate,
              created_by: str) -> dict[str, Any]:
        from core.bundle_signing import BundleIntegrityError, check_manifest, verify_signature

        known = self.service.plant.nodes
        if not nodes or len(nodes) > MAX_TARGETS:
            raise RolloutError(f"give 1..{MAX_TARGETS} target nodes")
        unknown = sorted(set(nodes) - set(known))
        if unknown:
            raise RolloutError(f"unknown edge nodes {unknown[:5]}")
        if not isinstance(canary_share, int | float) or not 0 < canary_share <= 1:
            raise RolloutError("canary share must be in (0, 1]")
        targets = sorted(set(nodes))
        with self._lock:
            busy = {n.node for r in self.store.rollouts(active_only=True) for n in self.store.nodes(r.id)
                    if n.state not in NODE_TERMINAL}
            if busy & set(targets):
                raise RolloutError(f"nodes {sorted(busy & set(targets))[:5]} are in a rollout still running")
            rollout_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
            folder = Path(self.config.folder) / rollout_id
            try:
                self._copy_bundle(Path(bundle), folder)
                verify_signature(folder, Path(self.config.publisher_key))
                manifest = check_manifest(folder)
                missing = [name for name in REQUIRED_FILES if name not in manifest["files"]]
                if missing:
                    raise RolloutError(f"the bundle has no {missing}")
                card = json.loads((folder / "card.json").read_text())
                version = str(card["model"]["version"])
                if not VERSION_RE.match(version):
                    raise RolloutError(f"model version {version[:70]!r} is not 1-64 letters, digits or . _ : + -")
            except (BundleIntegrityError, RolloutError, OSError, ValueError, KeyError, TypeError) as error:
                shutil.rmtree(folder, ignore_errors=True)
                raise RolloutError(f"bundle refused: {str(error).splitlines()[0][:300]}") from None
            now = int(time.time() * 1000)
            size = sum(p.stat().st_size for p in folder.iterdir())
            canaries = max(1, math.ceil(canary_share * len(targets)))
            rollout = Rollout(rollout_id, now, created_by, version, _sha256((folder / MANIFEST).read_bytes()), size,
                              str(folder), float(canary_share), asdict(gate), "canary", None, now)
            rows = [RolloutNode(rollout_id, node, "canary" if i < canaries else "rest", "pending", updated_ms=now)
                    for i, node in enumerate(targets)]
            self.store.save(rollout, rows)
            log.info("rollout %s of %s to %d nodes (%d canary) started by %s", rollout_id, version, len(targets),
                     canaries, created_by)
            self.tick()
        return self.status(rollout_id)

    def abort(self, rollout_id: str, *, by: str) -> dict[str, Any] | None:
        with self._lock:
            rollout = self.store.rollout(rollout_id)
            if rollout is None:
                return None
            if rollout.state not in ("canary", "rolling"):
                raise RolloutError(f"rollout {rollout_id} is {rollout.state}, not running")
            now = int(time.time() * 1000)
            rollout.state, rollout.reason, rollout.updated_ms = "aborted", f"aborted by {by}", now
            nodes = self.store.nodes(rollout_id)
            told = [n for n in nodes if n.state in ("offered", "downloading", "verifying")]
            for node in nodes:
                if node.state == "pending":
                    node.state, node.updated_ms = "skipped", now
            self.store.save(rollout, nodes)
            for node in told:  # a node that already swapped keeps its model and its own health gate
                self._publish(node.node, RolloutCommand(rollout_id, "abort"))
        return self.status(rollout_id)

    # ------------------------------------------------------------------ reads
    def status(self, rollout_id: str) -> dict[str, Any] | None:
        rollout = self.store.rollout(rollout_id)
        if rollout is None:
            return None
        nodes = self.store.nodes(rollout_id)
        counts: dict[str, int] = {}
        for node in nodes:
            counts[node.state] = counts.get(node.state, 0) + 1
        out = {k: v for k, v in vars(rollout).items() if k != "folder"}
        return out | {"counts": counts, "nodes": [n.public() for n in nodes]}

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        return [self.status(r.id) for r in self.store.rollouts(limit=limit)]

    def edge_models(self) -> list[dict[str, Any]]:
        """Each edge node's active and previous model and its latest rollout step, as it reported them."""
        out = []
        reports = self.service.nodes_metrics(sorted(self.service.plant.nodes))
        for node in sorted(self.service.plant.nodes):
            metrics = dict(reports.get(node, {}))
            out.append({"node": node, "online": metrics.pop("_online", False),
                        "model_version": metrics.get(MODEL_VERSION), "previous_version": metrics.get(MODEL_PREVIOUS),
                        "rollout_id": metrics.get(ROLLOUT_ID), "rollout_state": metrics.get(ROLLOUT_STATE),
                        "rollout_reason": metrics.get(ROLLOUT_REASON)})
        return out

    # ------------------------------------------------------------------ downloads
    def bundle_file(self, rollout_id: str, name: str) -> Path | None:
        """The path of a file of a rollout's bundle, or None. Only names the verified manifest lists (and the
        manifest and signature themselves) are served: nothing from the request is joined onto a path."""
        rollout = self.store.rollout(rollout_id)
        if rollout is None or rollout.state == "aborted":
            return None
        folder = Path(rollout.folder)
        try:
            listed = set(json.loads((folder / MANIFEST).read_text())["files"]) | {MANIFEST, SIGNATURE}
        except (OSError, ValueError, KeyError):
            return None
        return {n: folder / n for n in listed}.get(name)

    def token_allows(self, rollout_id: str, token: str | None) -> bool:
        if not token or len(token) > 256:
            return False
        digest = _sha256(token.encode())
        return any(digest in n.token_hashes for n in self.store.nodes(rollout_id))

    # ------------------------------------------------------------------ moving on
    def tick(self) -> None:
        fence = self.service.rollout_fence()
        if fence is False:
            return  # another worker drives the rollouts
        with self._lock:
            try:
                for rollout in self.store.rollouts(active_only=True):
                    self._advance(rollout, fence)
            except LeaseLost as lost:  # stalled past the lease: its next holder carries on from the rows
                log.warning("rollouts handed on: %s", lost)

    def _advance(self, rollout: Rollout, fence: tuple[str, str, int] | None = None) -> None:
        now = int(time.time() * 1000)
        nodes = self.store.nodes(rollout.id)
        changed: list[RolloutNode] = []
        to_offer: list[RolloutNode] = []
        reports = self.service.nodes_metrics([n.node for n in nodes
                                              if n.state not in NODE_TERMINAL and n.state != "pending"])
        for node in nodes:
            if node.state in NODE_TERMINAL or node.state == "pending":
                continue
            metrics = reports.get(node.node, {})
            reported = metrics.get(ROLLOUT_STATE)
            if metrics.get(ROLLOUT_ID) == rollout.id and reported in NODE_REPORTED and reported != node.state:
                node.state, node.reason = reported, _bounded(metrics.get(ROLLOUT_REASON))
                node.version, node.updated_ms = _bounded(metrics.get(MODEL_VERSION)), now
                changed.append(node)
            elif now - (node.offered_ms or now) > self.config.node_timeout_s * 1000:
                node.state, node.reason, node.updated_ms = "timeout", "no answer from the node", now
                changed.append(node)
            elif node.state == "offered" and now - (node.sent_ms or 0) >= self.config.resend_s * 1000:
                to_offer.append(node)  # offline when told, or the NCMD was lost: tell it again
        canary = [n for n in nodes if n.wave == "canary"]
        rest = [n for n in nodes if n.wave == "rest"]
        if rollout.state == "canary":
            to_offer += [n for n in canary if n.state == "pending"]
            if all(n.state in NODE_TERMINAL for n in canary):
                failed = [n for n in canary if n.state != "healthy"]
                if failed:
                    rollout.state = "failed"
                    rollout.reason = (f"canary {failed[0].node} {failed[0].state}"
                                      + (f": {failed[0].reason}" if failed[0].reason else ""))[:300]
                    for node in rest:
                        node.state, node.updated_ms = "skipped", now
                    changed += rest
                else:
                    rollout.state = "rolling"
        if rollout.state == "rolling":
            to_offer += [n for n in rest if n.state == "pending"]
        if rollout.state == "rolling" and all(n.state in NODE_TERMINAL for n in nodes) and not to_offer:
            bad = [n for n in nodes if n.state != "healthy"]
            rollout.state = "partial" if bad else "completed"
            rollout.reason = f"{len(bad)} of {len(nodes)} nodes did not take the model" if bad else None
        tokens = {}
        for node in to_offer:
            token = secrets.token_urlsafe(32)
            tokens[node.node] = token
            node.token_hashes = (node.token_hashes + [_sha256(token.encode())])[-MAX_TOKENS_PER_NODE:]
            node.state, node.sent_ms, node.updated_ms = "offered", now, now
            node.offered_ms = node.offered_ms or now
        rollout_changed = rollout.state != self.store.rollout(rollout.id).state
        if rollout_changed:
            rollout.updated_ms = now
        written = set()
        if changed or to_offer or rollout_changed:
            written = self.store.save(rollout if rollout_changed else None,
                                      list({id(n): n for n in changed + to_offer}.values()), fence=fence)
        gate = HealthGate(**rollout.gate)
        for node in [n for n in to_offer if n.node in written]:  # committed first: a twin killed here re-sends,
            # it never forgets a node it told; a node an abort skipped meanwhile is not told
            url = f"{self.config.base_url.rstrip('/')}/api/rollouts/{rollout.id}/files/"
            self._publish(node.node, RolloutCommand(rollout.id, "install", url, tokens[node.node], rollout.sha256,
                                                    rollout.version, rollout.bytes, gate))

    def _publish(self, node: str, command: RolloutCommand) -> None:
        client = self.service.client
        if client is None:
            return  # not connected yet: the resend picks the node up
        payload = encode(command.payload(int(time.time() * 1000)), self.service.config.payload)  # as its rebirths
        client.publish(str(Topic(self.service.plant.group, "NCMD", node)), payload, qos=1)

    @staticmethod
    def _copy_bundle(source: Path, folder: Path) -> None:
        """A bounded copy of the bundle's regular files (no links, no subfolders: a bundle has neither)."""
        if not source.is_dir():
            raise RolloutError(f"{source} is not a bundle folder")
        entries = list(source.iterdir())
        if len(entries) > 64:
            raise RolloutError(f"{source} holds {len(entries)} entries: not a bundle")
        total = 0
        for entry in entries:
            if entry.is_symlink() or not entry.is_file():
                raise RolloutError(f"{entry.name}: a bundle holds regular files only")
            total += entry.stat().st_size
        if total > MAX_BUNDLE_BYTES:
            raise RolloutError(f"the bundle is larger than {MAX_BUNDLE_BYTES >> 20} MiB")
        folder.mkdir(parents=True)
        for entry in entries:
            shutil.copyfile(entry, folder / entry.name, follow_symlinks=False)


def _bounded(value: Any, limit: int = 300) -> str | None:
    return None if value is None else str(value)[:limit]
