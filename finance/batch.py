"""The batch scoring job: raw records in (CSV, CSV.gz, Parquet or a generated folder), Parquet out.

Chunks are fixed by position (file i, data rows [start, stop)), so the local and the Dask paths cut
the same chunks and write the same files:

    OUTPUT/scored/part-FFFF-CCCCC.parquet      id, pd, points, decision, reason_1..k, reason_codes, model_version
    OUTPUT/quarantine/part-FFFF-CCCCC.parquet  the bad rows as read (text), source_file, row, reason
    OUTPUT/_chunks/FFFF-CCCCC.json             counts of a finished chunk, written last
    OUTPUT/_SUMMARY.json                       read = scored + quarantined, per job

A chunk counts as finished only once its manifest exists (every file is written to a temporary
name and renamed), so a crashed or stopped job resumes where it stopped without rescoring.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from finance.data import check_columns, count_rows, data_files, dataset_spec, iter_rows, read_rows, typed_ids
from finance.errors import CreditDataError
from finance.schema import check_records, coerce
from finance.scorer import CreditScorer, load_model


@dataclass(frozen=True)
class ChunkSpec:
    file_index: int
    file: str
    chunk_index: int
    start: int  # first data row (0-based, header excluded)
    stop: int

    @property
    def id(self) -> str:
        return f"{self.file_index:04d}-{self.chunk_index:05d}"


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

    @property
    def reconciled(self) -> bool:
        return self.read == self.scored + self.quarantined


def plan_chunks(files: list[Path], chunk_rows: int) -> list[ChunkSpec]:
    chunks = []
    for i, file in enumerate(files):
        rows = count_rows(file)
        for j, start in enumerate(range(0, rows, chunk_rows)):
            chunks.append(ChunkSpec(i, str(file), j, start, min(start + chunk_rows, rows)))
    return chunks


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def score_chunk(scorer: CreditScorer, chunk: ChunkSpec, frame: pd.DataFrame, output: Path, *,
                reasons: str) -> dict[str, int]:
    """Validate, score and write one chunk; returns its counts (also written as its manifest)."""
    spec = dataset_spec(scorer.dataset)
    check_columns(frame, spec, chunk.file, require_target=False)
    planned = chunk.stop - chunk.start
    assert len(frame) == planned, f"chunk {chunk.id}: read {len(frame)} rows, planned {planned}"
    fields = list(spec.fields)
    why = check_records(frame, fields).to_numpy()
    ids = frame[spec.id_column]
    why = np.where(ids.isna().to_numpy() & (why == ""), f"{spec.id_column}: missing", why)
    bad = why != ""
    good = coerce(frame.loc[~bad] if bad.any() else frame, fields).reset_index(drop=True)
    good[spec.id_column] = typed_ids(good[spec.id_column])
    scored = scorer.score(good, reasons=reasons) if len(good) else pd.DataFrame()
    _write_atomic(scored, output / "scored" / f"part-{chunk.id}.parquet")
    quarantine = frame.loc[bad].astype("string").reset_index(drop=True)
    quarantine["source_file"] = chunk.file
    quarantine["row"] = chunk.start + np.flatnonzero(bad) + 1  # 1-based data row in the file
    quarantine["reason"] = why[bad]
    _write_atomic(quarantine, output / "quarantine" / f"part-{chunk.id}.parquet")
    counts = {"read": int(len(frame)), "scored": int(len(good)), "quarantined": int(bad.sum())}
    manifest = output / "_chunks" / f"{chunk.id}.json"
    manifest.with_name(manifest.name + ".tmp").write_text(json.dumps({**asdict(chunk), **counts}))
    os.replace(manifest.with_name(manifest.name + ".tmp"), manifest)
    return counts


def _score_chunk_task(scorer: CreditScorer, chunk: ChunkSpec, output: str, reasons: str) -> dict[str, int]:
    """A Dask task: read its chunk by position and score it with the scorer (scattered to every
    worker once, not loaded from disk by every task)."""
    import sys

    if "torch" in sys.modules:  # one core per worker (torch is imported only when the model needs it)
        sys.modules["torch"].set_num_threads(1)
    frame = read_rows(Path(chunk.file), dataset_spec(scorer.dataset), chunk.start, chunk.stop)
    return score_chunk(scorer, chunk, frame, Path(output), reasons=reasons)


def _finished(output: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in (output / "_chunks").glob("*.json")}


def run_batch(model_dir: str | Path, input_path: str | Path, output: str | Path, *, chunk_rows: int = 100_000,
              scheduler: str | None = None, reasons: str = "declined", max_chunks: int | None = None,
              progress: bool = True) -> BatchSummary:
    """Score every record under `input_path` with the model saved in `model_dir` into `output`.

    scheduler: None for in-process streaming, "local" for a dask.distributed LocalCluster of two
    single-threaded workers, or a scheduler address ("tcp://host:8786").
    reasons: which applicants get reason codes: "declined" (the adverse-action case), "all" or "none".
    max_chunks: stop after scoring this many chunks (a time-boxed run; the next run resumes).
    """
    if chunk_rows < 1:
        raise CreditDataError("chunk_rows must be >= 1", field="chunk_rows")
    output = Path(output)
    for sub in ("scored", "quarantine", "_chunks"):
        (output / sub).mkdir(parents=True, exist_ok=True)
    scorer = load_model(model_dir)
    spec = dataset_spec(scorer.dataset)
    files = data_files(input_path, spec)
    chunks = plan_chunks(files, chunk_rows)
    done = _finished(output)
    stale = [c for c in chunks if c.id in done and (done[c.id]["file"], done[c.id]["start"], done[c.id]["stop"])
             != (c.file, c.start, c.stop)]
    if stale:
        raise CreditDataError(f"{output} holds chunks of another input or chunk size (e.g. {stale[0].id}); "
                              "use an empty output folder", field="output")
    todo = [c for c in chunks if c.id not in done][: max_chunks if max_chunks is not None else None]
    started = time.perf_counter()
    bar = tqdm(total=sum(c.stop - c.start for c in chunks), unit="rows", desc="scoring", disable=not progress,
               initial=sum(done[c.id]["read"] for c in chunks if c.id in done))
    if scheduler is None:
        wanted = {c.id for c in todo}
        for chunk_file in sorted({c.file_index for c in todo}):
            file_chunks = [c for c in chunks if c.file_index == chunk_file]
            for chunk, frame in zip(file_chunks, iter_rows(Path(file_chunks[0].file), spec, chunk_rows), strict=False):
                if chunk.id in wanted:
                    score_chunk(scorer, chunk, frame, output, reasons=reasons)
                    bar.update(chunk.stop - chunk.start)
    else:
        _run_dask(scheduler, scorer, todo, str(output), reasons, bar)
    bar.close()
    seconds = time.perf_counter() - started
    finished = _finished(output)
    totals = {k: sum(finished[c.id][k] for c in chunks if c.id in finished) for k in ("read", "scored", "quarantined")}
    summary = BatchSummary(**totals, chunks=len(chunks), chunks_scored_now=len(todo), seconds=seconds,
                           rows_per_s=sum(c.stop - c.start for c in todo) / max(seconds, 1e-9),
                           model_version=scorer.version_, scheduler=scheduler or "in-process")
    (output / "_SUMMARY.json").write_text(json.dumps({**asdict(summary), "reconciled": summary.reconciled,
                                                      "complete": len(finished) >= len(chunks)}, indent=1))
    return summary


def _run_dask(scheduler: str, scorer: CreditScorer, todo: list[ChunkSpec], output: str, reasons: str,
              bar: Any) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) \
        if scheduler == "local" else None
    client = Client(cluster if cluster is not None else scheduler)
    try:
        shared = client.scatter(scorer, broadcast=True)  # every worker holds the model once
        futures = [client.submit(_score_chunk_task, shared, chunk, output, reasons, key=f"score-{chunk.id}",
                                 pure=False) for chunk in todo]
        for future in as_completed(futures):
            counts = future.result()
            bar.update(counts["read"])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def read_scored(output: str | Path) -> pd.DataFrame:
    """All scored rows of a finished job, in chunk order."""
    parts = sorted((Path(output) / "scored").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()


def read_quarantine(output: str | Path) -> pd.DataFrame:
    parts = sorted((Path(output) / "quarantine").glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()
