"""Run the three levels on a CheckedTable and collect one finding per (row, problem)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.data_quality.domains import DomainConfig, SegmentModel
from core.data_quality.images import near_any, nearest_earlier
from core.data_quality.labels import LabelConfig, TooFewLabels, label_issues
from core.data_quality.rules import RuleConfig, exact_duplicates, leakage, near_duplicates, out_of_range
from core.data_quality.table import CheckedTable
from core.row_fingerprint import RowFingerprint, row_hashes

# What `--fix` removes. Near duplicates, unseen domains and out-of-range values are reported, not
# removed: they may be real (new clients, a new operating regime) and are for a person to judge.
REMOVED_CHECKS = ("schema", "duplicate", "contradiction", "leakage", "label_issue")


@dataclass(frozen=True)
class CheckConfig:
    rules: RuleConfig = field(default_factory=RuleConfig)
    domains: DomainConfig = field(default_factory=DomainConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    near_image_bits: int = 4  # images whose 64-bit pHashes differ in at most this many bits are near copies
    min_label_rows: int = 50  # fewer labelled rows: level 3 is skipped (5-fold models of nothing)

    def __post_init__(self) -> None:
        if not 0 <= self.near_image_bits <= 32:
            raise ValueError(f"near_image_bits must be in 0..32, got {self.near_image_bits}")


@dataclass
class CheckResult:
    summary: dict  # the JSON summary
    findings: pd.DataFrame  # row (1-based data row), name, level, check, detail
    remove: np.ndarray  # (rows,) bool: what --fix leaves out
    coverage: pd.DataFrame  # segment, train_share, data_share, unseen
    label_scores: np.ndarray | None  # (rows,) out-of-fold probability of the given label (NaN: not scored)


class _Findings:
    def __init__(self, table: CheckedTable) -> None:
        self.table, self.parts = table, []

    def add(self, mask: np.ndarray, level: int, check: str, detail) -> int:
        rows = np.flatnonzero(mask)
        if len(rows):
            detail = np.asarray(detail, dtype=object)[rows] if np.ndim(detail) else np.full(len(rows), detail, object)
            self.parts.append(pd.DataFrame({"row": rows + 1, "level": level, "check": check, "detail": detail}))
        return int(len(rows))

    def frame(self) -> pd.DataFrame:
        if not self.parts:
            frame = pd.DataFrame({"row": pd.Series(dtype=np.int64), "level": pd.Series(dtype=np.int64),
                                  "check": pd.Series(dtype=object), "detail": pd.Series(dtype=object)})
        else:
            frame = pd.concat(self.parts, ignore_index=True).sort_values(["row", "level"], kind="stable")
        names = self.table.row_names
        frame.insert(1, "name", names[frame["row"].to_numpy() - 1] if names is not None else frame["row"].astype(str))
        return frame.reset_index(drop=True)


def run_check(table: CheckedTable, *, reference: CheckedTable | None = None, fingerprint: RowFingerprint | None = None,
              config: CheckConfig | None = None, progress=None) -> CheckResult:
    """All three levels. reference: the training data `table` is compared with (leakage, ranges,
    domain coverage); fingerprint: a model folder's record of its training rows (leakage)."""
    config = config or CheckConfig()
    say = progress or (lambda text: None)
    started = time.perf_counter()
    findings, good, n = _Findings(table), table.good, len(table)
    notes = list(table.notes)
    remove = ~good

    say("level 1: rules")
    level_seconds = {}
    rules: dict = {"schema": findings.add(~good, 1, "schema", table.rule_reasons)}
    labels = table.labels
    hashes, duplicate, contradiction = exact_duplicates(table.typed, table.fields, good, labels)
    rules["duplicate"] = findings.add(duplicate, 1, "duplicate", "same inputs and label as an earlier row")
    rules["contradiction"] = findings.add(contradiction, 1, "contradiction",
                                          "the same inputs occur with another label")
    if table.perceptual is not None:
        rows = np.flatnonzero(good)
        match, bits = nearest_earlier(table.perceptual[rows], max_distance=config.near_image_bits)
        near = np.zeros(n, dtype=bool)
        near[rows] = match >= 0
        near &= ~duplicate & ~contradiction
        detail = np.full(n, "", dtype=object)
        detail[rows[match >= 0]] = [f"pHash within {b} bits of {_name(table, rows[m])}"
                                    for m, b in zip(match[match >= 0], bits[match >= 0], strict=True)]
        rules["near_duplicate"] = findings.add(near, 1, "near_duplicate", detail)
    else:
        near = near_duplicates(table.typed, table.fields, good, duplicate | contradiction, config.rules)
        rules["near_duplicate"] = findings.add(
            near, 1, "near_duplicate",
            f"equal to an earlier row within {config.rules.near_tolerance:g} standard deviations per field")
        notes.append(f"near duplicates: every number binned to {config.rules.near_tolerance:g} x its field's robust "
                     "standard deviation; two values either side of a bin edge are not matched")
    reference_hashes = None
    if reference is not None:
        reference_hashes = row_hashes(reference.typed, reference.fields)[reference.good]
    leaks = leakage(hashes, good, reference_hashes=reference_hashes, fingerprint=fingerprint)
    if reference is not None and table.perceptual is not None and reference.perceptual is not None:
        rows = np.flatnonzero(good)
        leaks["reference"][rows] |= near_any(table.perceptual[rows], reference.perceptual[reference.good],
                                             max_distance=config.near_image_bits)
    rules["leakage"] = {}
    where = {"reference": "also in the training data given with --reference",
             "model_train": "the model was trained on this row", "model_valid": "the model was validated on this row"}
    leaked = np.zeros(n, dtype=bool)
    for split, mask in leaks.items():
        rules["leakage"][split] = findings.add(mask & ~leaked, 1, "leakage", where[split])
        leaked |= mask
    if fingerprint is not None and fingerprint.train.threshold != np.iinfo(np.uint64).max:
        notes.append("the model's fingerprint keeps a sample of its training rows' hashes: leakage is found only "
                     "among the rows whose hash falls in that sample")
    ranges = np.full(n, "", dtype=object)
    if reference is not None:
        ranges = out_of_range(table.typed, reference.typed[reference.good], table.numeric_fields, good, config.rules)
    rules["out_of_range"] = findings.add(ranges != "", 1, "out_of_range", ranges)
    remove = remove | duplicate | contradiction | leaked

    level_seconds["rules"] = round(time.perf_counter() - started, 2)
    say("level 2: domains")
    domains, coverage = _domains(table, reference, findings, good, config, notes)

    level_seconds["domains"] = round(time.perf_counter() - started - sum(level_seconds.values()), 2)
    say("level 3: labels")
    label_result, scores, issues = _labels(table, good & ~duplicate & ~contradiction, findings, config)
    remove = remove | issues
    level_seconds["labels"] = round(time.perf_counter() - started - sum(level_seconds.values()), 2)

    summary = {"dataset": table.dataset, "source": table.source, "rows": n, "rows_passing_rules": int(good.sum()),
               "rules": rules, "domains": domains, "labels": label_result,
               "rows_to_remove": int(remove.sum()), "removed_checks": list(REMOVED_CHECKS),
               "reference": None if reference is None else reference.source,
               "model_fingerprint": fingerprint is not None, "notes": notes,
               "seconds": round(time.perf_counter() - started, 2), "seconds_by_level": level_seconds}
    return CheckResult(summary, findings.frame(), remove, coverage, scores)


def _name(table: CheckedTable, row: int) -> str:
    return str(table.row_names[row]) if table.row_names is not None else f"row {row + 1}"


def _domains(table: CheckedTable, reference: CheckedTable | None, findings: _Findings, good: np.ndarray,
             config: CheckConfig, notes: list[str]) -> tuple[dict, pd.DataFrame]:
    fields = table.segment_fields
    basis = reference if reference is not None else table
    train = basis.typed.loc[basis.good, fields].to_numpy(dtype=np.float64, na_value=np.nan)
    if len(train) < 2 or not good.any():
        notes.append("domains: too few rows passing the rules to find segments")
        return {"segments": 0, "fields": fields, "unseen": 0}, pd.DataFrame()
    model = SegmentModel(config.domains).fit(train, table.segments)
    segment, distance = model.assign(table.typed.loc[good, fields].to_numpy(dtype=np.float64, na_value=np.nan))
    unseen_rows = np.zeros(len(table), dtype=bool)
    if reference is not None:
        unseen_rows[np.flatnonzero(good)] = model.unseen(segment, distance)
    else:
        notes.append("domains: no --reference, so segments are those of the data itself and no row is "
                     "flagged as unseen")
    segments = len(model.centers_)
    data_share = np.bincount(segment, minlength=segments) / max(len(segment), 1)
    unseen_per = np.bincount(segment[unseen_rows[good]], minlength=segments)
    # each segment described by its training rows' medians, so that a person can name it
    basis_segment, _ = model.assign(train)
    profile = [", ".join(f"{name} {np.nanmedian(train[basis_segment == s, i]):.4g}" for i, name in enumerate(fields))
               if (basis_segment == s).any() and len(fields) <= 8 else "" for s in range(segments)]
    coverage = pd.DataFrame({"segment": np.arange(segments), "train_share": model.train_share_,
                             "data_share": data_share, "unseen": unseen_per, "median_profile": profile})
    where = np.full(len(table), "", dtype=object)
    where[unseen_rows] = "farther from every training segment than the segments reach (nearest: segment " + \
        pd.Series(segment[unseen_rows[good]]).astype(str).to_numpy(dtype=object) + ")"
    unseen = findings.add(unseen_rows, 2, "unseen_domain", where)
    return {"segments": segments, "fields": fields, "chosen_from_data": table.segments is None,
            "basis": "reference" if reference is not None else "data", "unseen": unseen,
            "coverage": coverage.round(4).to_dict(orient="records")}, coverage


def _labels(table: CheckedTable, usable: np.ndarray, findings: _Findings,
            config: CheckConfig) -> tuple[dict, np.ndarray | None, np.ndarray]:
    issues = np.zeros(len(table), dtype=bool)
    if table.given_label_issues is not None:
        given, quality, method = table.given_label_issues
        issues = given & usable
        count = findings.add(issues, 3, "label_issue", np.array([f"label quality {q:.3f}" for q in quality], object))
        return {"checked": int(np.isfinite(quality).sum()), "issues": count, "method": method}, quality, issues
    if table.labels is None or not table.label_check:
        reason = "no labels" if table.labels is None else "labels not checkable by a tabular model of these fields"
        return {"checked": 0, "issues": 0, "skipped": reason}, None, issues
    rows = np.flatnonzero(usable & (table.labels >= 0))
    if len(rows) < config.min_label_rows:
        return {"checked": 0, "issues": 0, "skipped": f"fewer than {config.min_label_rows} usable labelled rows"}, \
            None, issues
    if table.label_inputs is not None:
        x = table.label_inputs.iloc[rows].reset_index(drop=True)
    else:
        x = table.typed.iloc[rows][[name for name, _ in table.fields]].reset_index(drop=True)
        x = x.assign(**{name: x[name].astype("category") for name, is_category in table.fields if is_category})
    try:
        flagged, given = label_issues(x, table.labels[rows], config.labels)
    except TooFewLabels as error:
        return {"checked": 0, "issues": 0, "skipped": str(error)}, None, issues
    issues[rows[flagged]] = True
    scores = np.full(len(table), np.nan)
    scores[rows] = given
    detail = np.full(len(table), "", dtype=object)
    detail[rows] = [f"{table.label_name} = {label}: out-of-fold probability {p:.3f}"
                    for label, p in zip(table.labels[rows], given, strict=True)]
    count = findings.add(issues, 3, "label_issue", detail)
    return {"checked": int(len(rows)), "issues": count, "method": "cleanlab.filter.find_label_issues "
            f"({config.labels.filter_by}) on {config.labels.folds}-fold LightGBM probabilities"}, scores, issues
