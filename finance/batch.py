"""The batch scoring job: raw records in (CSV, CSV.gz, Parquet or a generated folder), Parquet out.

A job is bound to what it scores. `OUTPUT/_JOB.json` records each input file's SHA-256, the model
(dataset, name, version and the SHA-256 of its folder's files) and the settings that shape the
output (chunk rows, reasons, duplicates). A rerun resumes only when all of them are unchanged; any
change is refused with one line, and `restart=True` (`--restart`) clears the job's own files and
scores again, so two inputs or two models never mix in one output.

Chunks are planned by reading the files: CSV records are located by a quote-aware scan
(`finance.csv_records`: blank lines and newlines inside quoted fields are handled), Parquet rows by
position. The local and the Dask paths cut the same chunks and write the same files:

    OUTPUT/_JOB.json                           what the job is bound to (inputs, model, settings)
    OUTPUT/scored/part-FFFF-CCCCC.parquet      id, pd, points, decision, reason_1..k, reason_codes,
                                               model_version, source_file, source_row, source_line, duplicate_of
    OUTPUT/quarantine/part-FFFF-CCCCC.parquet  bad rows as read (text), source_file, source_row, source_line, reason
    OUTPUT/quarantine/files.json               files quarantined whole (unreadable, empty, wrong columns), with reasons
    OUTPUT/_chunks/FFFF-CCCCC.json             counts of a finished chunk, written last
    OUTPUT/_files/FFFF.json                    a file found unreadable while scoring (kept for resumes)
    OUTPUT/_SUMMARY.json                       status, counts (read = scored + quarantined), files; always written

`source_row` is the 1-based data record of the file (header and blank lines not counted),
`source_line` the physical line where a CSV record starts. A file that cannot be read as a whole
(bad or truncated gzip, not UTF-8, a quoted field never closed, a record with more fields than the
header, another dataset's columns, no rows) is quarantined whole with its reason and the rest of the
job goes on. A repeated id is quarantined as "duplicate of FILE row N" (its first occurrence in
file and row order is scored), or scored and flagged in `duplicate_of` with duplicates="keep".

Every file is written to a temporary name, fsynced and renamed (and the folder fsynced), and a
chunk counts as finished only once its manifest exists, so a job killed at any point resumes
where it stopped without rescoring.

Statuses and the exit codes of `moeworks finance score`: complete (0); complete_with_quarantine
(3: every readable row scored, some rows or files quarantined); incomplete (4: stopped by
max_chunks or an interrupt, run again to resume); failed (2 when nothing could be scored because of
the input, 1 for any other failure, such as an input that changed while the job ran). A refusal
before the job starts (bad arguments, a changed input on resume) exits with 2 and leaves the output
as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from finance.csv_records import (
    UnreadableFile,
    open_text_bytes,
    plan_csv,
    read_chunk_bytes,
    read_error_reason,
    record_lines,
)
from finance.data import (
    check_columns,
    data_files,
    dataset_spec,
    file_columns,
    parse_csv_bytes,
    read_ids,
    read_parquet_records,
    typed_ids,
)
from finance.errors import CreditDataError
from finance.file_hash import file_sha256, folder_sha256
from finance.schema import check_records, coerce
from finance.scorer import CreditScorer, load_model

EXIT_CODES = {"complete": 0, "complete_with_quarantine": 3, "incomplete": 4, "failed": 1}
EXIT_INPUT_FAILED = 2  # failed: nothing could be scored because of the input
DUPLICATE_POLICIES = ("quarantine", "keep")
REASON_POLICIES = ("declined", "all", "none")
_OWN_ENTRIES = ("scored", "quarantine", "_chunks", "_files", "_JOB.json", "_SUMMARY.json")


class JobRefused(CreditDataError):
    """The job was not started (bad settings, or an output folder bound to another job)."""


@dataclass(frozen=True)
class ChunkSpec:
    file_index: int
    file: str
    chunk_index: int
    start: int  # first data record (0-based, header and blank lines excluded)
    stop: int
    byte_start: int = -1  # CSV: [byte_start, byte_stop) of the decompressed text; -1 for Parquet
    byte_stop: int = -1
    first_line: int = 0  # CSV: the physical line of its first record

    @property
    def id(self) -> str:
        return f"{self.file_index:04d}-{self.chunk_index:05d}"


@dataclass
class FilePlan:
    index: int
    path: str
    sha256: str = ""
    bytes: int = 0
    rows: int = 0
    header: bytes = b""  # CSV: the header record, put before each chunk's bytes
    chunks: list[ChunkSpec] = field(default_factory=list)
    reason: str = ""  # why the file is quarantined whole; "" when it is scored

    @property
    def scorable(self) -> bool:
        return not self.reason

    def report(self) -> dict[str, Any]:
        return {"file": self.path, "sha256": self.sha256, "bytes": self.bytes,
                "status": "scored" if self.scorable else "quarantined", "rows": self.rows, "reason": self.reason}


@dataclass
class BatchSummary:
    read: int
    scored: int
    quarantined: int
    chunks: int
    chunks_scored_now: int  # chunks this run scored (the rest were finished before: resume)
    seconds: float
    rows_per_s: float
    model_version: str
    scheduler: str
    status: str = "complete"
    exit_code: int = 0
    message: str = ""  # one line: what went wrong or what was quarantined
    files_quarantined: int = 0
    duplicates: int = 0  # rows whose id repeats an earlier row's (quarantined or flagged)
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reconciled(self) -> bool:
        return self.read == self.scored + self.quarantined

    @property
    def complete(self) -> bool:
        return self.status in ("complete", "complete_with_quarantine")


# ------------------------------------------------------------------------------------ durable writes


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    """fsync a written temporary file, rename it over `path` and fsync the folder (durable rename)."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    _publish(tmp, path)


def _write_json(payload: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    _publish(tmp, path)


# ------------------------------------------------------------------------------------ planning


def plan_file(index: int, path: Path, spec: Any, chunk_rows: int) -> FilePlan:
    """Hash and plan one file; an unreadable one comes back with its reason (quarantined whole)."""
    plan = FilePlan(index, str(path))
    try:
        plan.bytes = path.stat().st_size
        plan.sha256 = file_sha256(path)
    except OSError as error:
        plan.reason = read_error_reason(error)
        return plan
    if plan.bytes == 0:
        plan.reason = "empty file (0 bytes)"
        return plan
    try:
        if path.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            columns = file_columns(path, spec)
            plan.rows = pq.ParquetFile(path).metadata.num_rows
            plan.chunks = [ChunkSpec(index, str(path), j, start, min(start + chunk_rows, plan.rows))
                           for j, start in enumerate(range(0, plan.rows, chunk_rows))]
        else:
            csv = plan_csv(path, chunk_rows)
            plan.header, plan.rows = csv.header, csv.rows
            if not csv.header:
                plan.reason = "no header and no rows (blank lines only)"
                return plan
            columns = file_columns(path, spec, csv.header)
            plan.chunks = [ChunkSpec(index, str(path), j, j * chunk_rows, min((j + 1) * chunk_rows, csv.rows),
                                     begin, end, line)
                           for j, ((begin, end), line) in enumerate(zip(csv.chunk_bytes, csv.chunk_first_line,
                                                                         strict=True))]
        check_columns(pd.DataFrame(columns=columns), spec, str(path), require_target=False)
    except UnreadableFile as error:
        plan.reason = str(error)
    except CreditDataError as error:
        plan.reason = str(error).removeprefix(f"file {path}, ")
    except (OSError, EOFError, zlib.error, ValueError) as error:  # pyarrow's errors are ValueError/OSError
        plan.reason = f"not a readable {'Parquet' if path.name.endswith('.parquet') else 'CSV'} file: " \
                      f"{read_error_reason(error)}"
    if plan.scorable and plan.rows == 0:
        plan.reason = "a header only: no data rows"
    if not plan.scorable:
        plan.chunks = []
    return plan


def _id_keys(values: pd.Series) -> pd.Series:
    """Ids compared as text, whole numbers by value ('007' and '7.0' are the same applicant), NaN for missing."""
    text = values.astype("string").str.strip()
    text = text.mask(text.isna() | (text == ""))
    number = pd.to_numeric(text, errors="coerce")
    whole = number.notna() & np.isfinite(number) & (number % 1 == 0) & (number.abs() < 2**53)
    return text.mask(whole, number[whole].astype("int64").astype("string"))


def find_repeats(plans: list[FilePlan], spec: Any, chunk_rows: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per chunk id: (positions in the chunk, "FILE row N" of the id's first occurrence) of repeated ids.

    The first occurrence in file and row order is the original; missing ids are not compared (they
    are quarantined as missing). A file whose id column cannot be read as planned is quarantined.
    """
    keys, owners = [], []
    for plan in plans:
        if not plan.scorable:
            continue
        try:
            ids = read_ids(Path(plan.path), spec, file_columns(Path(plan.path), spec, plan.header or None))
        except (OSError, EOFError, zlib.error, ValueError) as error:
            plan.reason, plan.chunks = f"cannot read the id column: {read_error_reason(error)}", []
            continue
        if len(ids) != plan.rows:  # the C parser and the record scan must agree on every record
            plan.reason = f"the CSV parser read {len(ids)} rows where the record scan found {plan.rows}"
            plan.chunks = []
            continue
        keys.append(_id_keys(ids))
        owners.append(plan)
    if not keys:
        return {}
    key = pd.concat(keys, ignore_index=True)
    codes, _ = pd.factorize(key, use_na_sentinel=True)
    present = codes >= 0
    order = np.flatnonzero(present)
    _, first_index = np.unique(codes[order], return_index=True)  # the first position of each id
    first_of_code = order[first_index]
    repeat = np.flatnonzero(present & (first_of_code[np.maximum(codes, 0)] != np.arange(len(codes))))
    file_of_row = np.concatenate([np.full(p.rows, i) for i, p in enumerate(owners)])
    row_in_file = np.concatenate([np.arange(p.rows) for p in owners])
    out: dict[str, tuple[list[int], list[str]]] = {}
    for position in repeat.tolist():
        plan, row = owners[file_of_row[position]], int(row_in_file[position])
        first = int(first_of_code[codes[position]])
        chunk = plan.chunks[row // chunk_rows]  # every chunk but a file's last holds chunk_rows records
        entry = out.setdefault(chunk.id, ([], []))
        entry[0].append(row - chunk.start)
        entry[1].append(f"{owners[file_of_row[first]].path} row {row_in_file[first] + 1}")
    return {k: (np.asarray(v[0], dtype=np.int64), np.asarray(v[1], dtype=object)) for k, v in out.items()}


# ------------------------------------------------------------------------------------ reading and scoring


class ChunkReader:
    """Reads the chunks of one file, in order (a CSV stream is opened once, so a .gz is decompressed
    once; a Parquet file is read once). Read failures raise UnreadableFile."""

    def __init__(self, plan_path: str, header: bytes, spec: Any) -> None:
        self.path, self.header, self.spec = Path(plan_path), header, spec
        self._stream = None
        self._table: pd.DataFrame | None = None

    def __enter__(self) -> ChunkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stream is not None:
            self._stream.close()

    def read(self, chunk: ChunkSpec) -> tuple[pd.DataFrame, np.ndarray | None]:
        """The chunk's records as read (text) and the physical line of each (None for Parquet)."""
        try:
            if chunk.byte_start < 0:
                if self._table is None:
                    self._table = read_parquet_records(self.path, self.spec)
                frame, lines = self._table.iloc[chunk.start:chunk.stop].reset_index(drop=True), None
            else:
                if self._stream is None:
                    self._stream = open_text_bytes(self.path)
                data = read_chunk_bytes(self._stream, chunk.byte_start, chunk.byte_stop)
                frame = parse_csv_bytes(self.header + data, self.spec)
                lines = record_lines(data, chunk.first_line)
        except UnreadableFile:
            raise
        except (OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.ParserError, ValueError) as error:
            raise UnreadableFile(f"cannot read chunk {chunk.id}: {read_error_reason(error)}") from None
        planned = chunk.stop - chunk.start
        if len(frame) != planned or (lines is not None and len(lines) != planned):
            raise UnreadableFile(f"chunk {chunk.id}: the CSV parser read {len(frame)} rows where the plan has "
                                 f"{planned}")
        return frame, lines


def score_chunk(scorer: CreditScorer, chunk: ChunkSpec, frame: pd.DataFrame, output: Path, *, reasons: str,
                lines: np.ndarray | None = None, repeats: tuple[np.ndarray, np.ndarray] | None = None,
                duplicates: str = "quarantine") -> dict[str, int]:
    """Validate, score and write one chunk; returns its counts (also written as its manifest)."""
    spec = dataset_spec(scorer.dataset)
    check_columns(frame, spec, chunk.file, require_target=False)
    fields = list(spec.fields)
    why = check_records(frame, fields).to_numpy()
    ids = frame[spec.id_column]
    missing_id = ids.isna().to_numpy() | (ids.astype("string").str.strip() == "").to_numpy(dtype=bool)
    why = np.where(missing_id, np.where(why == "", "", why + "; ") + f"{spec.id_column}: missing", why)
    duplicate_of = np.full(len(frame), "", dtype=object)
    if repeats is not None:
        duplicate_of[repeats[0]] = repeats[1]
    if duplicates == "quarantine":
        repeated = duplicate_of != ""
        why[repeated] = np.where(why[repeated] == "", "", why[repeated] + "; ") + \
            f"{spec.id_column}: duplicate of " + duplicate_of[repeated]
    bad = why != ""
    source_row = chunk.start + np.arange(len(frame)) + 1
    source_line = pd.array(lines if lines is not None else [pd.NA] * len(frame), dtype="Int64")
    good = coerce(frame.loc[~bad] if bad.any() else frame, fields).reset_index(drop=True)
    good[spec.id_column] = typed_ids(good[spec.id_column])
    scored = scorer.score(good, reasons=reasons) if len(good) else pd.DataFrame()
    if len(good):
        scored["source_file"] = chunk.file
        scored["source_row"] = source_row[~bad]
        scored["source_line"] = source_line[~bad]
        scored["duplicate_of"] = duplicate_of[~bad]
    _write_parquet(scored, output / "scored" / f"part-{chunk.id}.parquet")
    quarantine = frame.loc[bad].astype("string").reset_index(drop=True)
    quarantine["source_file"] = chunk.file
    quarantine["source_row"] = source_row[bad]
    quarantine["source_line"] = source_line[bad]
    quarantine["reason"] = why[bad]
    _write_parquet(quarantine, output / "quarantine" / f"part-{chunk.id}.parquet")
    counts = {"read": int(len(frame)), "scored": int(len(good)), "quarantined": int(bad.sum()),
              "duplicates": int((duplicate_of != "").sum())}
    _write_json({**asdict(chunk), **counts}, output / "_chunks" / f"{chunk.id}.json")
    return counts


def _score_chunk_task(scorer: CreditScorer, chunk: ChunkSpec, header: bytes, output: str, reasons: str,
                      repeats: tuple[np.ndarray, np.ndarray] | None, duplicates: str) -> dict[str, Any]:
    """A Dask task: read its chunk by position and score it with the scorer (scattered to every
    worker once, not loaded from disk by every task). An unreadable chunk comes back as a reason."""
    import sys

    if "torch" in sys.modules:  # one core per worker (torch is imported only when the model needs it)
        sys.modules["torch"].set_num_threads(1)
    spec = dataset_spec(scorer.dataset)
    try:
        with ChunkReader(chunk.file, header, spec) as reader:
            frame, lines = reader.read(chunk)
    except UnreadableFile as error:
        return {"unreadable": str(error), "read": 0}
    return score_chunk(scorer, chunk, frame, Path(output), reasons=reasons, lines=lines, repeats=repeats,
                       duplicates=duplicates)


# ------------------------------------------------------------------------------------ the job


def _finished(output: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in (output / "_chunks").glob("*.json"):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):  # a manifest is renamed into place whole; anything else is rescored
            continue
    return out


def _failed_files(output: Path) -> dict[int, str]:
    out = {}
    for path in (output / "_files").glob("*.json"):
        try:
            record = json.loads(path.read_text())
            out[int(record["file_index"])] = str(record["reason"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def _quarantine_file(output: Path, plan: FilePlan, reason: str) -> None:
    """Quarantine a file found unreadable while scoring: drop its chunks' outputs, remember why."""
    plan.reason, plan.chunks = reason, []
    _write_json({"file_index": plan.index, "file": plan.path, "sha256": plan.sha256, "reason": reason},
                output / "_files" / f"{plan.index:04d}.json")
    prefix = f"{plan.index:04d}-"
    for folder, pattern in (("_chunks", f"{prefix}*.json"), ("scored", f"part-{prefix}*.parquet"),
                            ("quarantine", f"part-{prefix}*.parquet")):
        for path in (output / folder).glob(pattern):
            path.unlink()


def _identity(scorer: CreditScorer, model_dir: Path, plans: list[FilePlan], settings: dict[str, Any]) -> dict:
    return {"inputs": [{"file": p.path, "sha256": p.sha256, "bytes": p.bytes} for p in plans],
            "model": {"path": str(model_dir.resolve()), "dataset": scorer.dataset, "model": scorer.model_name,
                      "version": scorer.version_, "sha256": folder_sha256(model_dir)},
            "settings": settings}


def _identity_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """What differs between a recorded job and this one, in words (None: the same job)."""
    old_inputs = {i["file"]: i["sha256"] for i in old.get("inputs", [])}
    new_inputs = {i["file"]: i["sha256"] for i in new["inputs"]}
    if set(old_inputs) != set(new_inputs):
        added, removed = sorted(set(new_inputs) - set(old_inputs)), sorted(set(old_inputs) - set(new_inputs))
        return f"its input files differ ({'added ' + added[0] if added else 'removed ' + removed[0]})"
    changed = [f for f in new_inputs if new_inputs[f] != old_inputs[f]]
    if changed:
        return f"input {changed[0]} has changed (SHA-256 {new_inputs[changed[0]][:12]}, was " \
               f"{str(old_inputs[changed[0]])[:12]})"
    old_model, new_model = old.get("model", {}), new["model"]
    for key in ("dataset", "model", "version", "sha256"):
        if old_model.get(key) != new_model[key]:
            return f"it was scored with another model ({key} {str(old_model.get(key))[:24]}, now " \
                   f"{str(new_model[key])[:24]})"
    for key, value in new["settings"].items():
        if old.get("settings", {}).get(key) != value:
            return f"its setting {key} was {old.get('settings', {}).get(key)!r}, now {value!r}"
    return None


def _prepare_output(output: Path, identity: dict[str, Any], restart: bool) -> None:
    """Bind `output` to this job, or refuse: a resume must find the same inputs, model and settings."""
    if output.exists() and not output.is_dir():
        raise JobRefused(f"{output} is a file, not a folder", field="output")
    try:
        output.mkdir(parents=True, exist_ok=True)
        entries = {p.name for p in output.iterdir() if not p.name.endswith(".tmp")}
    except OSError as error:
        raise JobRefused(f"cannot use {output}: {read_error_reason(error)}", field="output") from None
    foreign = sorted(entries - set(_OWN_ENTRIES))
    if foreign:
        raise JobRefused(f"{output} holds other files ({foreign[0]}, ...); use an empty or new output folder",
                         field="output")
    job = output / "_JOB.json"
    if restart:
        for name in _OWN_ENTRIES:
            target = output / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif job.is_file():
        try:
            old = json.loads(job.read_text())
        except ValueError:
            old = {}
        change = _identity_change(old, identity)
        if change:
            raise JobRefused(f"{output} holds a job that cannot be resumed: {change}; use --restart to score "
                             "again into a clean output", field="output")
    elif entries:
        raise JobRefused(f"{output} holds batch output without a job record (_JOB.json); use --restart to "
                         "score again into a clean output", field="output")
    for sub in ("scored", "quarantine", "_chunks", "_files"):
        (output / sub).mkdir(exist_ok=True)
    if not job.is_file():
        _write_json(identity, job)


def run_batch(model_dir: str | Path, input_path: str | Path, output: str | Path, *, chunk_rows: int = 100_000,
              scheduler: str | None = None, reasons: str = "declined", max_chunks: int | None = None,
              progress: bool = True, restart: bool = False, duplicates: str = "quarantine") -> BatchSummary:
    """Score every record under `input_path` with the model saved in `model_dir` into `output`.

    scheduler: None for in-process streaming, "local" for a dask.distributed LocalCluster of two
    single-threaded workers, or a scheduler address ("tcp://host:8786").
    reasons: which applicants get reason codes: "declined" (the adverse-action case), "all" or "none".
    max_chunks: stop after scoring this many chunks (a time-boxed run; the next run resumes).
    restart: clear this output's job files and score everything again (for another input or model).
    duplicates: "quarantine" the rows that repeat an earlier row's id (default), or "keep" them
    scored and flagged in `duplicate_of`.

    Raises JobRefused (a CreditDataError) before anything is written when the settings are wrong
    or the output belongs to another job. Otherwise returns the summary also written to
    `_SUMMARY.json`, whatever the status; an unexpected error writes a failed summary and is raised.
    """
    if chunk_rows < 1:
        raise JobRefused("chunk_rows must be >= 1", field="chunk_rows")
    if reasons not in REASON_POLICIES:
        raise JobRefused(f"reasons must be one of {', '.join(REASON_POLICIES)}, got {reasons!r}", field="reasons")
    if duplicates not in DUPLICATE_POLICIES:
        raise JobRefused(f"duplicates must be quarantine or keep, got {duplicates!r}", field="duplicates")
    if max_chunks is not None and max_chunks < 0:
        raise JobRefused("max_chunks must be >= 0", field="max_chunks")
    output, model_dir = Path(output), Path(model_dir)
    scorer = load_model(model_dir)
    spec = dataset_spec(scorer.dataset)
    plans = [plan_file(i, path, spec, chunk_rows) for i, path in enumerate(data_files(input_path, spec))]
    settings = {"chunk_rows": chunk_rows, "reasons": reasons, "duplicates": duplicates}
    _prepare_output(output, _identity(scorer, model_dir, plans, settings), restart)
    started = time.perf_counter()
    todo: list[ChunkSpec] = []
    summary_args = {"scorer": scorer, "scheduler": scheduler or "in-process", "started": started}
    try:
        for index, reason in _failed_files(output).items():
            if index < len(plans):
                plans[index].reason, plans[index].chunks = reason, []
        repeats = find_repeats(plans, spec, chunk_rows)
        chunks = [c for p in plans for c in p.chunks]
        done = _finished(output)
        done = {k: v for k, v in done.items() if k in {c.id for c in chunks}}
        todo = [c for c in chunks if c.id not in done][: max_chunks if max_chunks is not None else None]
        bar = tqdm(total=sum(p.rows for p in plans if p.scorable), unit="rows", desc="scoring",
                   disable=not progress, initial=sum(v["read"] for v in done.values()))
        if scheduler is None:
            failures = _run_local(scorer, plans, todo, output, reasons, repeats, duplicates, spec, bar)
        else:
            failures = _run_dask(scheduler, scorer, plans, todo, str(output), reasons, repeats, duplicates, bar)
        bar.close()
        for plan in plans:
            if plan.index in failures:
                _quarantine_file(output, plan, failures[plan.index])
        changed = [p.path for p in plans if p.scorable and _sha_or_none(p.path) != p.sha256]
        failure = f"input {changed[0]} changed while the job ran; score it again with --restart" if changed else ""
    except BaseException as error:  # noqa: BLE001 - the summary is written for every outcome, then re-raised
        interrupted = isinstance(error, KeyboardInterrupt)
        _write_summary(output, plans, todo, failure=None if interrupted else f"{type(error).__name__}: {error}",
                       **summary_args)
        raise
    return _write_summary(output, plans, todo, failure=failure or None, **summary_args)


def _sha_or_none(path: str) -> str | None:
    try:
        return file_sha256(path)
    except OSError:
        return None


def _run_local(scorer: CreditScorer, plans: list[FilePlan], todo: list[ChunkSpec], output: Path, reasons: str,
               repeats: dict, duplicates: str, spec: Any, bar: Any) -> dict[int, str]:
    failures: dict[int, str] = {}
    wanted = {c.id for c in todo}
    for plan in plans:
        mine = [c for c in plan.chunks if c.id in wanted]
        if not mine:
            continue
        try:
            with ChunkReader(plan.path, plan.header, spec) as reader:
                for chunk in mine:
                    frame, lines = reader.read(chunk)
                    score_chunk(scorer, chunk, frame, output, reasons=reasons, lines=lines,
                                repeats=repeats.get(chunk.id), duplicates=duplicates)
                    bar.update(chunk.stop - chunk.start)
        except UnreadableFile as error:
            failures[plan.index] = str(error)
    return failures


def _run_dask(scheduler: str, scorer: CreditScorer, plans: list[FilePlan], todo: list[ChunkSpec], output: str,
              reasons: str, repeats: dict, duplicates: str, bar: Any) -> dict[int, str]:
    from dask.distributed import Client, LocalCluster, as_completed

    headers = {p.index: p.header for p in plans}
    failures: dict[int, str] = {}
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) \
        if scheduler == "local" else None
    client = Client(cluster if cluster is not None else scheduler)
    try:
        shared = client.scatter(scorer, broadcast=True)  # every worker holds the model once
        futures = {client.submit(_score_chunk_task, shared, chunk, headers[chunk.file_index], output, reasons,
                                 repeats.get(chunk.id), duplicates, key=f"score-{chunk.id}", pure=False): chunk
                   for chunk in todo}
        for future in as_completed(futures):  # every task finishes before a failed file's outputs are dropped
            counts = future.result()
            if "unreadable" in counts:
                failures.setdefault(futures[future].file_index, counts["unreadable"])
            bar.update(counts["read"])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return failures


def _write_summary(output: Path, plans: list[FilePlan], todo: list[ChunkSpec], *, scorer: CreditScorer,
                   scheduler: str, started: float, failure: str | None) -> BatchSummary:
    chunks = [c for p in plans for c in p.chunks]
    finished = _finished(output)
    ours = [finished[c.id] for c in chunks if c.id in finished]
    totals = {k: sum(int(m.get(k, 0)) for m in ours) for k in ("read", "scored", "quarantined", "duplicates")}
    quarantined_files = [p for p in plans if not p.scorable]
    seconds = time.perf_counter() - started
    scorable = [p for p in plans if p.scorable]
    files_note = "; ".join(f"{p.path}: {p.reason}" for p in quarantined_files[:3]) + (
        f"; and {len(quarantined_files) - 3} more" if len(quarantined_files) > 3 else "")
    if failure is not None:
        status, code, message = "failed", EXIT_CODES["failed"], failure
    elif not scorable or sum(p.rows for p in scorable) == 0:
        status, code, message = "failed", EXIT_INPUT_FAILED, f"nothing to score: {files_note or 'no rows'}"
    elif len(ours) < len(chunks):
        status, code = "incomplete", EXIT_CODES["incomplete"]
        message = f"{len(chunks) - len(ours)} of {len(chunks)} chunks still to score; run the same command again"
    elif totals["quarantined"] or quarantined_files:
        status, code = "complete_with_quarantine", EXIT_CODES["complete_with_quarantine"]
        message = f"{totals['quarantined']:,} rows and {len(quarantined_files)} files quarantined" + (
            f" ({files_note})" if files_note else "")
    else:
        status, code, message = "complete", EXIT_CODES["complete"], ""
    files = []
    for plan in plans:
        record = plan.report()
        mine = [finished[c.id] for c in plan.chunks if c.id in finished]
        record.update({k: sum(int(m.get(k, 0)) for m in mine) for k in ("scored", "quarantined")})
        files.append(record)
    summary = BatchSummary(**totals, chunks=len(chunks), chunks_scored_now=len(todo), seconds=seconds,
                           rows_per_s=sum(c.stop - c.start for c in todo) / max(seconds, 1e-9),
                           model_version=scorer.version_, scheduler=scheduler, status=status, exit_code=code,
                           message=message, files_quarantined=len(quarantined_files), files=files)
    try:
        _write_json([{"file": p.path, "sha256": p.sha256, "reason": p.reason} for p in quarantined_files],
                    output / "quarantine" / "files.json")
        _write_json(summary_json(summary), output / "_SUMMARY.json")
    except OSError:
        if failure is None:
            raise
    return summary


def summary_json(summary: BatchSummary) -> dict[str, Any]:
    return {**asdict(summary), "reconciled": summary.reconciled, "complete": summary.complete}


def read_scored(output: str | Path) -> pd.DataFrame:
    """All scored rows of a finished job, in chunk order."""
    parts = sorted((Path(output) / "scored").glob("part-*.parquet"))
    frames = [f for f in (pd.read_parquet(p) for p in parts) if len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_quarantine(output: str | Path) -> pd.DataFrame:
    parts = sorted((Path(output) / "quarantine").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
