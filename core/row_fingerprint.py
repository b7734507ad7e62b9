"""A compact record of which rows a model was trained and validated on, so that evaluation can say
what share of the rows it scores the model has already seen (credit models, the AI4I model).

Each row is reduced to a 64-bit hash of its raw input fields (ids and labels left out: a copy of
an applicant under a new id is still a row the model was fitted on). A split keeps at most
`MAX_HASHES` hashes (2 MiB): beyond that, only the hashes below a threshold are kept, a
consistent sample of the hash space, and the share is estimated on the scored rows whose hashes
fall below the same threshold (an unbiased estimate; exact when nothing was left out).

Saved as `row_fingerprint.npz` (plain uint64 arrays, loaded with allow_pickle=False).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MAX_HASHES = 262_144
FILE = "row_fingerprint.npz"
_ALL = np.uint64(np.iinfo(np.uint64).max)


def row_hashes(frame: pd.DataFrame, fields: list[tuple[str, bool]]) -> np.ndarray:
    """(n,) uint64 hashes of the rows' raw fields. fields: (name, is_category) pairs.

    Numbers are hashed as float64 and categories as text, so a CSV and a Parquet file of the same
    records (as the loaders type them) give the same hashes.
    """
    columns = {}
    for name, is_category in fields:
        if name not in frame:
            continue
        values = frame[name]
        if is_category:
            columns[name] = values.astype(object).where(values.notna(), "").astype(str).to_numpy(dtype=object)
        else:
            columns[name] = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.util.hash_pandas_object(pd.DataFrame(columns, copy=False), index=False).to_numpy(dtype=np.uint64)


@dataclass
class SplitFingerprint:
    rows: int  # rows in the split
    threshold: np.uint64  # hashes <= threshold are kept (all of them when rows <= MAX_HASHES)
    hashes: np.ndarray  # sorted unique uint64

    @classmethod
    def build(cls, hashes: np.ndarray, *, max_hashes: int = MAX_HASHES) -> SplitFingerprint:
        unique = np.unique(hashes)
        threshold = _ALL
        if len(unique) > max_hashes:
            threshold = unique[max_hashes - 1]  # the max_hashes smallest: a sample of the hash space
            unique = unique[:max_hashes]
        return cls(rows=len(hashes), threshold=np.uint64(threshold), hashes=unique)

    def union(self, other: SplitFingerprint, *, max_hashes: int = MAX_HASHES) -> SplitFingerprint:
        """The fingerprint of both splits' rows together (a model trained on one, then adapted on the
        other): each keeps the smallest hashes, so their union below the lower threshold is the
        smallest hashes of the union."""
        threshold = min(self.threshold, other.threshold)
        hashes = np.union1d(self.hashes[self.hashes <= threshold], other.hashes[other.hashes <= threshold])
        if len(hashes) > max_hashes:
            threshold, hashes = hashes[max_hashes - 1], hashes[:max_hashes]
        return SplitFingerprint(rows=self.rows + other.rows, threshold=np.uint64(threshold), hashes=hashes)

    def share(self, hashes: np.ndarray) -> tuple[float | None, bool]:
        """(share of `hashes` seen in this split, exact?); None when no scored row falls in the sample."""
        sampled = hashes[hashes <= self.threshold]
        if len(sampled) == 0:
            return None, False
        return float(np.isin(sampled, self.hashes).mean()), bool(self.threshold == _ALL)


@dataclass
class RowFingerprint:
    train: SplitFingerprint
    valid: SplitFingerprint

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE
        np.savez(path, train=self.train.hashes, valid=self.valid.hashes,
                 meta=np.array([self.train.rows, self.valid.rows, self.train.threshold, self.valid.threshold],
                               dtype=np.uint64))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> RowFingerprint | None:
        """The saved fingerprint, or None for a model saved without one."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as state:
            train_rows, valid_rows, train_threshold, valid_threshold = state["meta"].tolist()
            return cls(SplitFingerprint(int(train_rows), np.uint64(train_threshold), state["train"].astype(np.uint64)),
                       SplitFingerprint(int(valid_rows), np.uint64(valid_threshold), state["valid"].astype(np.uint64)))
