"""The edge node's side of a model rollout: fetch the bundle the twin offered, check it, hand it to the slot.

An NCMD's rollout command (twin.rollout.protocol, checked field by field) is queued to a worker
thread, so the agent keeps publishing while the bundle downloads and verifies. The command is kept
in `staging/<rollout id>/command.json` (mode 0600: it holds the download token) and the files grow
in `staging/<rollout id>/bundle/<name>.part`: an agent killed mid-download finds both at its next
start and asks the twin only for the bytes it lacks (HTTP Range). What is fetched is bounded
throughout: the manifest's SHA-256 must be the one the command named, the manifest's sizes must add
up to at most the command's, a file longer than listed is cut off and refused, each file's SHA-256
must match the manifest. Then the slot checks the publisher's signature and runs the bundle's test
vectors (deploy.bundle.build.verify_bundle) before it swaps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.bundle_signing import sha256_file
from deploy.edge.model_slot import ModelError, ModelSlot
from twin.rollout.protocol import CommandError, RolloutCommand
from twin.sparkplug.payload import Payload

log = logging.getLogger(__name__)
MAX_SMALL_FILE = 1 << 20          # manifest.json and model.sig
MAX_FILES = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a bundle file's name: no folders, no dot-files


class Refused(Exception):
    """The bundle is not the one offered, or is not safe to run (one line: why). Not retried."""


@dataclass(frozen=True)
class RolloutAgentConfig:
    ca: Path | None = None                 # CA certificate (PEM) of the twin's HTTPS; None: the system's
    max_download_bps: float | None = None  # spare a thin plant uplink (None: as fast as it goes)
    chunk_bytes: int = 64 << 10
    timeout_s: float = 30.0                # per request: connect and between bytes
    attempts: int = 6                      # a lost connection is retried (resuming) this many times, backing off

    def __post_init__(self):
        if self.max_download_bps is not None and not self.max_download_bps > 0:
            raise ValueError("max_download_bps must be positive (or None)")
        if type(self.chunk_bytes) is not int or not 1024 <= self.chunk_bytes <= 16 << 20:
            raise ValueError("chunk_bytes must be 1 KiB..16 MiB")
        if type(self.attempts) is not int or not 1 <= self.attempts <= 100:
            raise ValueError("attempts must be 1..100")
        if not 0 < self.timeout_s <= 600:
            raise ValueError("timeout_s must be in (0, 600]")


class RolloutClient:
    def __init__(self, *, slot: ModelSlot, config: RolloutAgentConfig = RolloutAgentConfig()):
        self.slot = slot
        self.config = config
        self.staging = slot.root / "staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self._commands: queue.Queue = queue.Queue(maxsize=16)
        self._current: str | None = None
        self._cancel = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"bytes_fetched": 0, "requests": 0, "resumed": 0, "commands_refused": 0}

    # ------------------------------------------------------------------ life cycle
    def start(self) -> RolloutClient:
        for command_file in sorted(self.staging.glob("*/command.json")):  # killed mid-download: carry on
            try:
                self._commands.put_nowait(self._read_command(command_file))
                self.stats["resumed"] += 1
            except (CommandError, OSError, ValueError, queue.Full) as error:
                log.warning("dropping staged rollout %s: %s", command_file.parent.name, error)
                shutil.rmtree(command_file.parent, ignore_errors=True)
        self._thread = threading.Thread(target=self._loop, name="edge-rollout", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ commands (paho's thread)
    def on_command(self, payload: Payload) -> None:
        try:
            command = RolloutCommand.from_payload(payload)
        except CommandError as error:
            self.stats["commands_refused"] += 1
            log.warning("rollout command refused: %s", error)
            return
        if command is None:
            return
        if command.action == "abort":
            if self._current == command.rollout_id:
                self._cancel.set()
            return
        try:
            self._commands.put_nowait(command)
        except queue.Full:  # the twin sends again
            self.stats["commands_refused"] += 1

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                command = self._commands.get(timeout=0.2)
            except queue.Empty:
                continue
            last = self.slot.last_rollout()
            if last.get("id") == command.rollout_id and last.get("state") not in ("downloading", "verifying", None):
                self.slot.report_due.set()  # told again (a resend): say again how it went
                continue
            self._current = command.rollout_id
            self._cancel.clear()
            try:
                self._install(command)
            except (Refused, ModelError) as error:
                self._finish(command, "refused", str(error))
            except _Cancelled:
                self._finish(command, "aborted", "aborted by the twin" if not self._stop.is_set() else None)
            except Exception as error:  # noqa: BLE001 - a bug or a full disk costs this rollout, not the agent
                log.exception("rollout %s failed", command.rollout_id)
                self._finish(command, "refused", f"{type(error).__name__}: {str(error)[:200]}")
            finally:
                self._current = None

    def _finish(self, command: RolloutCommand, state: str, reason: str | None) -> None:
        if reason is None:  # the agent is stopping: keep the staging folder, resume at the next start
            return
        shutil.rmtree(self.staging / command.rollout_id, ignore_errors=True)
        self.slot.set_report(command.rollout_id, state, reason)

    def _install(self, command: RolloutCommand) -> None:
        folder = self.staging / command.rollout_id
        bundle = folder / "bundle"
        bundle.mkdir(parents=True, exist_ok=True)
        self._write_command(folder / "command.json", command)
        self.slot.set_report(command.rollout_id, "downloading", None, downloaded=0)
        with httpx.Client(verify=str(self.config.ca) if self.config.ca else True, timeout=self.config.timeout_s,
                          headers={"Authorization": f"Bearer {command.token}"}) as http:
            manifest_bytes = self._fetch_small(http, command, "manifest.json")
            if hashlib.sha256(manifest_bytes).hexdigest() != command.sha256:
                raise Refused("manifest.json is not the one the rollout named (SHA-256 differs)")
            files = self._listed_files(manifest_bytes, command)
            (bundle / "manifest.json").write_bytes(manifest_bytes)
            downloaded = len(manifest_bytes)
            for name, (sha256, size) in files.items():
                self._fetch_file(http, command, name, bundle / name, size, sha256)
                downloaded += size
                self.slot.set_report(command.rollout_id, "downloading", None, downloaded=downloaded)
            signature = self._fetch_small(http, command, "model.sig")
            (bundle / "model.sig").write_bytes(signature)
        self.slot.set_report(command.rollout_id, "verifying", None, downloaded=downloaded + len(signature))
        try:
            card_version = json.loads((bundle / "card.json").read_text())["model"]["version"]
        except (OSError, ValueError, KeyError, TypeError):
            raise Refused("the bundle has no readable card.json") from None
        if card_version != command.version:
            raise Refused(f"the bundle is version {str(card_version)[:64]!r}, the rollout named {command.version!r}")
        self.slot.install(bundle, version=command.version, gate=command.gate, rollout_id=command.rollout_id)
        shutil.rmtree(folder, ignore_errors=True)  # the bundle moved into the slot; the token goes with the rest

    @staticmethod
    def _listed_files(manifest_bytes: bytes, command: RolloutCommand) -> dict[str, tuple[str, int]]:
        try:
            listed = json.loads(manifest_bytes)["files"]
            files = {str(name): (str(entry["sha256"]), int(entry["bytes"])) for name, entry in listed.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise Refused("manifest.json is not a bundle manifest") from None
        if len(files) > MAX_FILES:
            raise Refused(f"the manifest lists {len(files)} files (at most {MAX_FILES})")
        for name, (sha256, size) in files.items():
            if not _NAME_RE.match(name) or name in ("manifest.json", "model.sig", "command.json"):
                raise Refused(f"the manifest lists a file named {name[:70]!r}")
            if not re.fullmatch(r"[0-9a-f]{64}", sha256) or size < 0:
                raise Refused(f"the manifest's entry for {name} is malformed")
        if sum(size for _, size in files.values()) > command.bytes:
            raise Refused(f"the manifest's files add up to more than the rollout's {command.bytes} bytes")
        return files

    def _fetch_small(self, http, command: RolloutCommand, name: str) -> bytes:
        data = bytearray()
        for attempt in range(self.config.attempts):
            self._check_cancel()
            data.clear()
            try:
                self.stats["requests"] += 1
                with http.stream("GET", command.url + name) as response:
                    self._check_status(response, name)
                    for chunk in response.iter_bytes(self.config.chunk_bytes):
                        data += chunk
                        if len(data) > MAX_SMALL_FILE:
                            raise Refused(f"{name} is larger than {MAX_SMALL_FILE} bytes")
                self.stats["bytes_fetched"] += len(data)
                return bytes(data)
            except (_Transient, httpx.TransportError) as error:
                self._back_off(attempt, name, error)
        raise Refused(f"{name}: could not be fetched in {self.config.attempts} attempts")

    def _fetch_file(self, http, command: RolloutCommand, name: str, target: Path, size: int, sha256: str) -> None:
        if target.is_file() and target.stat().st_size == size and sha256_file(target) == sha256:
            return  # fetched before a restart
        part = target.with_name(target.name + ".part")
        for attempt in range(self.config.attempts):
            self._check_cancel()
            have = part.stat().st_size if part.is_file() else 0
            if have > size:
                part.unlink()
                have = 0
            try:
                if have < size:
                    self._fetch_range(http, command.url + name, part, have, size)
                break
            except (_Transient, httpx.TransportError) as error:
                self._back_off(attempt, name, error)
        else:
            raise Refused(f"{name}: could not be fetched in {self.config.attempts} attempts")
        if part.stat().st_size != size or sha256_file(part) != sha256:
            part.unlink()
            raise Refused(f"{name}: SHA-256 differs from the manifest (tampered or corrupted in transit)")
        os.replace(part, target)

    def _fetch_range(self, http, url: str, part: Path, have: int, size: int) -> None:
        self.stats["requests"] += 1
        headers = {"Range": f"bytes={have}-"} if have else {}
        with http.stream("GET", url, headers=headers) as response:
            self._check_status(response, part.stem)
            if response.status_code == 200 and have:  # the server ignored the range: start over
                have = 0
            started, fetched = time.monotonic(), 0
            with part.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                for chunk in response.iter_bytes(self.config.chunk_bytes):
                    self._check_cancel()
                    if have + fetched + len(chunk) > size:
                        raise Refused(f"{part.stem} is longer than the manifest's {size} bytes")
                    f.write(chunk)
                    fetched += len(chunk)
                    self.stats["bytes_fetched"] += len(chunk)
                    if self.config.max_download_bps:  # pace to the configured rate
                        ahead = fetched / self.config.max_download_bps - (time.monotonic() - started)
                        if ahead > 0:
                            f.flush()
                            time.sleep(ahead)
                f.flush()
                os.fsync(f.fileno())

    @staticmethod
    def _check_status(response, name: str) -> None:
        if response.status_code in (401, 403, 404):
            raise Refused(f"{name}: the twin answered {response.status_code}")
        if response.status_code not in (200, 206):
            raise _Transient(f"HTTP {response.status_code}")

    def _back_off(self, attempt: int, name: str, error: Exception) -> None:
        log.warning("rollout download of %s interrupted (%s); retrying", name, error)
        if self._stop.wait(min(30.0, 0.5 * 2 ** attempt)):
            raise _Cancelled

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Cancelled

    # ------------------------------------------------------------------ the staged command
    @staticmethod
    def _write_command(path: Path, command: RolloutCommand) -> None:
        if path.is_file():
            return
        fields = {"rollout_id": command.rollout_id, "url": command.url, "token": command.token,
                  "sha256": command.sha256, "version": command.version, "bytes": command.bytes,
                  "gate": vars(command.gate)}
        temporary = path.with_name(".command.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as f:
            json.dump(fields, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)

    @staticmethod
    def _read_command(path: Path) -> RolloutCommand:
        from twin.rollout.protocol import HealthGate

        if path.stat().st_size > 64 << 10:
            raise ValueError("command.json is larger than 64 KiB")
        doc = json.loads(path.read_text())
        try:
            return RolloutCommand(str(doc["rollout_id"]), "install", doc["url"], doc["token"], doc["sha256"],
                                  doc["version"], doc["bytes"], HealthGate(**doc["gate"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"command.json is malformed ({error})") from None


class _Cancelled(Exception):
    pass


class _Transient(Exception):
    """A failure worth retrying (connection lost, server busy)."""
