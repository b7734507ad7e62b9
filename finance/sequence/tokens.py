"""Monthly behaviour histories -> one token per month, oldest first, with padding masks.

A client's row holds, for each of the last months, a repayment status, a bill and a payment
(Taiwan: PAY_x, BILL_AMTx, PAY_AMTx, six months). Each month becomes a token of numeric features
plus the status as a categorical code; static fields (credit limit, age, sex, ...) are kept apart
for the model to fuse. A month whose status, bill and payment are all missing is padding: shorter
histories (new accounts, other products) keep the calendar position of the months they do have, so
the position still means "months before scoring".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

STATUS_MIN, STATUS_MAX = -2, 9  # Taiwan codes: -2 no use, -1 paid duly, 0 revolving, 1..9 months late
STATUS_PAD = 0  # code 0 is reserved for padding and unknown statuses
NUM_STATUS_LEVELS = STATUS_MAX - STATUS_MIN + 2  # 12 statuses + the padding code
TOKEN_FEATURES = ("log_bill", "log_payment", "utilisation", "payment_ratio", "bill_change", "ratio_known")


@dataclass(frozen=True)
class MonthlyLayout:
    """Which columns hold each month's fields (oldest month first) and the static fields."""

    status: tuple[str, ...]
    bill: tuple[str, ...]
    payment: tuple[str, ...]
    limit: str  # credit line, the denominator of utilisation
    static_numeric: tuple[str, ...] = ()
    static_categorical: tuple[str, ...] = ()
    # Further monthly amounts or counts (one tuple of columns per field, oldest first), signed-log scaled.
    channels: tuple[tuple[str, ...], ...] = ()
    status_in_days: bool = False  # status given as days past due: becomes months late (ceil(days / 30))
    static_log: tuple[str, ...] = ()  # skewed static amounts (income, debt) read on a log scale, like the limit

    def __post_init__(self) -> None:
        assert len(self.status) == len(self.bill) == len(self.payment) >= 1, \
            "status, bill and payment need one column per month, the same months"
        assert all(len(c) == len(self.status) for c in self.channels), "each channel needs one column per month"

    @property
    def months(self) -> int:
        return len(self.status)

    @property
    def num_token_features(self) -> int:
        return len(TOKEN_FEATURES) + len(self.channels)

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys([*self.status, *self.bill, *self.payment, *(c for ch in self.channels for c in ch),
                                   self.limit, *self.static_numeric, *self.static_categorical]))


# Taiwan: index 1 (PAY_0, BILL_AMT1, PAY_AMT1) is September, the newest; index 6 April, the oldest.
TAIWAN_LAYOUT = MonthlyLayout(
    status=("PAY_6", "PAY_5", "PAY_4", "PAY_3", "PAY_2", "PAY_0"),
    bill=tuple(f"BILL_AMT{i}" for i in range(6, 0, -1)),
    payment=tuple(f"PAY_AMT{i}" for i in range(6, 0, -1)),
    limit="LIMIT_BAL",
    static_numeric=("LIMIT_BAL", "AGE"),
    static_categorical=("SEX", "EDUCATION", "MARRIAGE"),
)


class SequenceBatch(NamedTuple):
    tokens: np.ndarray  # (batch, months, len(TOKEN_FEATURES)) float32, standardised, zero at padding
    status: np.ndarray  # (batch, months) int64 in [0, NUM_STATUS_LEVELS), STATUS_PAD at padding
    padding: np.ndarray  # (batch, months) bool, True where a month is missing
    static_numeric: np.ndarray  # (batch, n_static_numeric) float32, standardised
    static_categorical: np.ndarray  # (batch, n_static_categorical) int64, 0 = unseen level

    def __len__(self) -> int:
        return len(self.status)

    def take(self, index: np.ndarray) -> SequenceBatch:
        return SequenceBatch(*(a[index] for a in self))


class SequenceDataError(ValueError):
    """Input that cannot be tokenised; the message names the column and the row."""


def _signed_log(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def _level_keys(values: pd.Series) -> np.ndarray:
    """Categorical values as strings; numbers in one spelling (2, 2.0 and "2" are the same level)."""
    if pd.api.types.is_numeric_dtype(values):  # the common case, without the per-value text pass
        return values.to_numpy("float64").astype(str)
    number = pd.to_numeric(values, errors="coerce")
    return np.where(number.notna(), number.astype("float64").astype(str), values.astype(str))


def numeric_block(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """frame[columns] as float64 (n, len(columns)); a value that is not a number raises, naming it.

    Numeric columns are read as they are (the common case, and a single applicant's latency);
    only text columns go through pd.to_numeric.
    """
    sub = frame[columns]
    if all(pd.api.types.is_numeric_dtype(t) and not pd.api.types.is_bool_dtype(t) for t in sub.dtypes):
        return sub.to_numpy("float64")
    block = sub.apply(pd.to_numeric, errors="coerce").to_numpy("float64")
    bad = np.isnan(block) & sub.notna().to_numpy()
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise SequenceDataError(f"column {columns[col]!r}, row {row}: {sub.iloc[row, col]!r} is not a number")
    return block


def raw_month_features(frame: pd.DataFrame, layout: MonthlyLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unscaled token features (n, months, F), status codes (n, months), padding (n, months). Vectorised."""
    missing = [c for c in layout.columns if c not in frame.columns]
    if missing:
        raise SequenceDataError(f"missing column(s) {missing}")
    groups = {"status": layout.status, "bill": layout.bill, "payment": layout.payment,
              **{f"channel{i}": c for i, c in enumerate(layout.channels)}}
    monthly = [c for columns in groups.values() for c in columns]
    block = numeric_block(frame, monthly)  # (n, all monthly columns): one selection, not one per group
    values, start = {}, 0
    for name, columns in groups.items():
        values[name] = block[:, start:start + len(columns)]
        start += len(columns)
    status, bill, payment = values["status"], values["bill"], values["payment"]
    if layout.status_in_days:
        status = np.ceil(status / 30.0)
    padding = np.isnan(status) & np.isnan(bill) & np.isnan(payment)  # (n, months)
    limit = pd.to_numeric(frame[layout.limit], errors="coerce").to_numpy("float64")
    if (np.isnan(limit) | (limit <= 0)).any():
        row = int(np.flatnonzero(np.isnan(limit) | (limit <= 0))[0])
        raise SequenceDataError(f"column {layout.limit!r}, row {row}: credit limit must be a positive number, "
                                f"got {frame[layout.limit].iloc[row]!r}")
    bill0, pay0 = np.nan_to_num(bill), np.nan_to_num(payment)
    previous_bill = np.concatenate([np.full((len(bill), 1), np.nan), bill[:, :-1]], axis=1)
    ratio_known = ~np.isnan(previous_bill) & ~padding
    # A month's payment settles the previous month's statement (Taiwan's PAY_AMTx pays BILL_AMT(x+1)).
    ratio = np.where(ratio_known, pay0 / np.maximum(np.nan_to_num(previous_bill), 1.0), 0.0)
    change = np.where(ratio_known, (bill0 - np.nan_to_num(previous_bill)) / limit[:, None], 0.0)
    features = np.stack([
        _signed_log(bill0),
        np.log1p(np.maximum(pay0, 0.0)),
        np.clip(bill0 / limit[:, None], -1.0, 3.0),  # a few bills run far over the limit: clip the tail
        np.clip(ratio, 0.0, 2.0),  # paying more than twice the bill carries no extra information
        np.clip(change, -2.0, 2.0),
        ratio_known.astype("float64"),
        *(_signed_log(np.nan_to_num(values[f"channel{i}"])) for i in range(len(layout.channels))),
    ], axis=-1)
    features[padding] = 0.0
    codes = np.clip(np.nan_to_num(status, nan=STATUS_MIN), STATUS_MIN, STATUS_MAX) - STATUS_MIN + 1
    codes = np.where(np.isnan(status) | padding, STATUS_PAD, codes).astype("int64")
    return features, codes, padding


@dataclass
class SequenceTokenizer:
    """Fitted standardisation of token and static features, and categorical level maps.

    fit(frame) learns `token_mean_` / `token_std_` over real (non-padding) months, the static
    numeric mean/std, and each static categorical's levels; transform(frame) -> SequenceBatch.
    """

    layout: MonthlyLayout = TAIWAN_LAYOUT
    token_mean_: list[float] = field(default_factory=list)
    token_std_: list[float] = field(default_factory=list)
    static_mean_: list[float] = field(default_factory=list)
    static_std_: list[float] = field(default_factory=list)
    levels_: list[list[str]] = field(default_factory=list)
    status_mode_: int = STATUS_PAD  # the commonest status code: the reference month for attributions
    static_mode_: list[int] = field(default_factory=list)  # the commonest code of each static categorical

    def fit(self, frame: pd.DataFrame) -> SequenceTokenizer:
        features, codes, padding = raw_month_features(frame, self.layout)
        real = features[~padding]  # (real months, F)
        self.token_mean_ = real.mean(axis=0).tolist()
        self.token_std_ = np.maximum(real.std(axis=0), 1e-6).tolist()
        static = self._static_numeric_raw(frame)
        self.static_mean_ = np.nanmean(static, axis=0).tolist() if static.size else []
        self.static_std_ = np.maximum(np.nanstd(static, axis=0), 1e-6).tolist() if static.size else []
        self.levels_ = [sorted(set(_level_keys(frame[c]).tolist()) - {"nan"}) for c in self.layout.static_categorical]
        self.status_mode_ = int(np.bincount(codes[~padding]).argmax()) if (~padding).any() else STATUS_PAD
        categorical = self._categorical_codes(frame)
        self.static_mode_ = [int(np.bincount(c).argmax()) for c in categorical.T]
        return self

    def _static_numeric_raw(self, frame: pd.DataFrame) -> np.ndarray:
        columns = list(self.layout.static_numeric)
        sub = frame[columns]
        if all(pd.api.types.is_numeric_dtype(t) for t in sub.dtypes):
            raw = sub.to_numpy("float64", copy=True)
        else:  # text that is not a number becomes missing (imputed as the mean), as the pipeline does
            raw = sub.apply(pd.to_numeric, errors="coerce").to_numpy("float64", copy=True)
        # Money amounts are log-scaled: limits span three orders of magnitude.
        money = [i for i, c in enumerate(columns) if c == self.layout.limit or c in self.layout.static_log]
        raw[:, money] = np.log1p(np.maximum(raw[:, money], 0.0))
        return raw

    @property
    def cardinalities(self) -> list[int]:
        return [len(levels) + 1 for levels in self.levels_]  # + code 0 for unseen levels

    def transform(self, frame: pd.DataFrame) -> SequenceBatch:
        assert self.token_mean_, "SequenceTokenizer is not fitted: call fit first"
        features, codes, padding = raw_month_features(frame, self.layout)
        tokens = (features - np.array(self.token_mean_)) / np.array(self.token_std_)
        tokens[padding] = 0.0
        static = self._static_numeric_raw(frame)
        static = np.nan_to_num((static - np.array(self.static_mean_)) / np.array(self.static_std_))
        categorical = self._categorical_codes(frame)
        return SequenceBatch(tokens.astype("float32"), codes, padding, static.astype("float32"), categorical)

    def _categorical_codes(self, frame: pd.DataFrame) -> np.ndarray:
        """(n, n_static_categorical) codes: 1 + the level's rank among the fitted levels, 0 if unseen."""
        categorical = np.zeros((len(frame), len(self.levels_)), dtype="int64")
        for i, (column, levels) in enumerate(zip(self.layout.static_categorical, self.levels_, strict=True)):
            categorical[:, i] = pd.Index(levels).get_indexer(_level_keys(frame[column])) + 1  # unseen: -1 -> 0
        return categorical

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SequenceTokenizer:
        values = dict(values)
        layout = values.pop("layout")
        layout["channels"] = tuple(tuple(c) for c in layout.get("channels", ()))
        return cls(layout=MonthlyLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in layout.items()}),
                   **values)
