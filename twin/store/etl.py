"""ETL: the twin's history -> daily Parquet aggregates, one file per UTC day.

Each row of `daily/<YYYY-MM-DD>.parquet` is one (device, metric) of that day: count, mean, min,
max, std, first and last value, plus the day's minimum RUL and maximum failure probability as
metrics `rul` and `failure_prob`. Re-running a day overwrites its file, so the job is idempotent.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from twin.store.history import HistoryStore

DAY_MS = 86_400_000


def day_bounds(day: str) -> tuple[int, int]:
    try:
        start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    except ValueError:
        raise ValueError(f"day must be YYYY-MM-DD, got {day!r}") from None
    return int(start.timestamp() * 1000), int((start + timedelta(days=1)).timestamp() * 1000)


def days_in_history(store: HistoryStore) -> list[str]:
    lo, hi = store.query("SELECT MIN(ts_ms), MAX(ts_ms) FROM history")[0]
    if lo is None:
        return []
    first = datetime.fromtimestamp(lo / 1000, UTC).date()
    last = datetime.fromtimestamp(hi / 1000, UTC).date()
    return [str(first + timedelta(days=i)) for i in range((last - first).days + 1)]


def aggregate_day(store: HistoryStore, day: str) -> pd.DataFrame:
    """Long-format aggregates of one UTC day (empty frame when the day has no history)."""
    start, end = day_bounds(day)
    records = []
    for chunk in store.history_rows(start, end):
        for device, _seq, ts_ms, rul, failure_prob, vals in chunk:
            for name, value in json.loads(vals).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    records.append((device, name, ts_ms, float(value)))
            if rul is not None:
                records.append((device, "rul", ts_ms, float(rul)))
            if failure_prob is not None:
                records.append((device, "failure_prob", ts_ms, float(failure_prob)))
    columns = ["device", "metric", "count", "mean", "min", "max", "std", "first", "last"]
    if not records:
        return pd.DataFrame(columns=["day"] + columns)
    frame = pd.DataFrame.from_records(records, columns=["device", "metric", "ts_ms", "value"])
    frame = frame.sort_values(["device", "metric", "ts_ms"])
    out = frame.groupby(["device", "metric"])["value"].agg(["count", "mean", "min", "max", "std", "first", "last"])
    out = out.reset_index()
    out.insert(0, "day", day)
    return out


def run_etl(store: HistoryStore, out_dir: str | Path, *, days: list[str] | None = None) -> list[Path]:
    """Write one Parquet file per day (all days in the history when `days` is None); returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for day in days if days is not None else days_in_history(store):
        frame = aggregate_day(store, day)
        if frame.empty:
            continue
        path = out_dir / f"{day}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        frame.to_parquet(tmp, index=False)
        tmp.replace(path)  # readers never see half a file
        written.append(path)
    return written
