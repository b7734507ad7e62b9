"""Serving a `finance train` folder (scorecard, LightGBM, MoE, ensemble, sequence): raw applications in.

A request carries applications as the dataset's own columns, by name, as in its CSV (JSON numbers
for numeric fields, strings for categories, null or an absent key = missing), and optionally the
dataset's id column. The server checks them with the same field rules as `finance score`
(finance.schema.check_records: required fields, ranges, whole numbers, category levels) and answers
what `finance score` writes per applicant: `pd`, `points`, `decision` and the reason codes, from
the same `CreditScorer.score` (loaded with `finance.load_model`). The scorecard, LightGBM and the
features are computed row by row, so their answers are bit for bit those of the batch job whatever
rows share a batch; the MoE and sequence networks are batched, equal to float rounding.

Previously only MoE folders were served, at the level of the 214 engineered features; that request
(`{"features": [...]}`) is replaced by the raw fields.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from deploy.serving.base import AdapterOptions, InputField, InvalidRequest, ModelAdapter, ModelPath, request_instances
from deploy.serving.limits import FLOAT32_MAX

if TYPE_CHECKING:
    from finance.data import DatasetSpec
    from finance.scorer import CreditScorer

MAX_TEXT = 256  # characters of a category value or an id: longer is not a code, it is a payload
_NUMBER = (int, float)


class CreditAdapter(ModelAdapter):
    """Raw application fields -> pd, points, decision, reason_1..k, reason_codes (and the id sent)."""

    family = "credit"
    describes = "a `finance train` folder, with scorer.json"

    def __init__(self, *, scorer: CreditScorer, spec: DatasetSpec, options: AdapterOptions) -> None:
        self.scorer, self.spec, self.options = scorer, spec, options

    @classmethod
    def recognise(cls, candidate: ModelPath) -> bool:
        return (candidate.path / "scorer.json").is_file()

    @classmethod
    def check_options(cls, path: Path, options: AdapterOptions) -> None:
        if options.quantize != "none" or options.fuse:
            raise ValueError(f"{path}: a credit folder is served as `finance score` runs it (FP32, no fusion); "
                             "leave out --quantize and --fuse")

    @classmethod
    def from_path(cls, path: str | Path, options: AdapterOptions | None = None) -> CreditAdapter:
        from finance import load_model
        from finance.data import dataset_spec

        path, options = cls.start_loading(path, options)
        scorer = load_model(path)
        return cls(scorer=scorer, spec=dataset_spec(scorer.dataset), options=options)

    # What follows from the scorer and its dataset's fields (cheap; computed once, on first use).
    @cached_property
    def name(self) -> str:
        return f"credit-{self.scorer.dataset}-{self.scorer.model_name}"

    @cached_property
    def version(self) -> str:
        return self.scorer.version_

    @cached_property
    def runtime(self) -> str:
        return f"finance+{self.scorer.model_name}"

    @cached_property
    def numeric(self) -> list:
        return [f for f in self.spec.fields if f.kind != "category"]

    @cached_property
    def categories(self) -> list:
        return [f for f in self.spec.fields if f.kind == "category"]

    @cached_property
    def fields(self) -> list[InputField]:
        return [InputField(f.name, np.dtype(np.float64 if f.kind != "category" else object), ())
                for f in self.spec.fields]

    @cached_property
    def outputs(self) -> list[str]:
        return ["pd", "points", "decision", *(f"reason_{j + 1}" for j in range(self.scorer.policy_.reason_count)),
                "reason_codes"]

    def describe(self) -> dict[str, Any]:
        inputs = {self.spec.id_column: {"type": "string or integer", "required": False}}
        for f in self.spec.fields:
            rule: dict[str, Any] = {"type": "string" if f.kind == "category" else "number", "required": f.required}
            if f.kind == "int":
                rule["whole_number"] = True
            rule.update({k: v for k, v in (("min", f.min), ("max", f.max)) if v is not None})
            if f.levels is not None:
                rule["levels"] = list(f.levels)
            inputs[f.name] = rule
        return {"name": self.name, "model_version": self.version, "runtime": self.runtime,
                "dataset": self.scorer.dataset, "model": self.scorer.model_name, "inputs": inputs,
                "outputs": ["id", *self.outputs], "cutoff_pd": self.scorer.cutoff_pd_}

    def instance_schema(self) -> dict[str, Any]:
        properties: dict[str, Any] = {self.spec.id_column: {"anyOf": [
            {"type": "string", "maxLength": MAX_TEXT}, {"type": "integer"}]}}
        for f in self.spec.fields:
            if f.kind == "category":
                value: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
                                         "pattern": r"\S"}  # blank is missing
                if f.levels is not None:
                    value["enum"] = list(f.levels)
            else:
                value = {"type": "integer" if f.kind == "int" else "number",
                         "minimum": f.min if f.min is not None else -FLOAT32_MAX,
                         "maximum": f.max if f.max is not None else FLOAT32_MAX}
            properties[f.name] = value if f.required else {"anyOf": [value, {"type": "null"}]}
        return {"type": "object", "properties": properties, "additionalProperties": False,
                "required": [f.name for f in self.spec.fields if f.required]}

    def parse(self, payload: Any, *, max_rows: int = 256) -> tuple[dict[str, np.ndarray], int]:
        from finance.schema import check_records

        instances = request_instances(payload, max_rows=max_rows)
        n = len(instances)
        known = {self.spec.id_column, *(f.name for f in self.spec.fields)}
        columns: dict[str, np.ndarray] = {self.spec.id_column: np.full(n, None, dtype=object)}
        columns.update((f.name, np.full(n, np.nan)) for f in self.numeric)
        columns.update((f.name, np.full(n, None, dtype=object)) for f in self.categories)
        for row, instance in enumerate(instances):
            if type(instance) is not dict:
                raise InvalidRequest(["body", "instances", row], "expected an object of application fields")
            for name, value in instance.items():
                if name not in known:
                    raise InvalidRequest(["body", "instances", row, name],
                                         f"unknown field; a {self.spec.name} application has the dataset's columns "
                                         "(GET /v1/model lists them)")
                if value is None:
                    continue  # null = missing, as an empty CSV cell
                loc: list[str | int] = ["body", "instances", row, name]
                column = columns[name]
                if column.dtype == object:  # a category or the id
                    is_id = name == self.spec.id_column
                    ok = type(value) is str or (is_id and type(value) is int)
                    if not ok:
                        raise InvalidRequest(loc, "expected a string or an integer" if is_id else
                                             f"expected a string (a category), got {_what(value)}")
                    if type(value) is str and len(value) > MAX_TEXT:
                        raise InvalidRequest(loc, f"longer than {MAX_TEXT} characters")
                    if type(value) is int and not -(2 ** 63) <= value < 2 ** 63:
                        raise InvalidRequest(loc, "an integer id must fit in 64 bits")
                    column[row] = value
                    continue
                if type(value) not in _NUMBER:
                    raise InvalidRequest(loc, f"expected a number or null, got {_what(value)}")
                number = float(value)
                if not abs(number) <= FLOAT32_MAX:  # also NaN (never from JSON, but from a caller)
                    raise InvalidRequest(loc, f"{value:g} is outside the float32 range (+-{FLOAT32_MAX:.4g})")
                column[row] = number
        fields = list(self.spec.fields)
        reasons = check_records(pd.DataFrame({f.name: columns[f.name] for f in fields}, copy=False), fields)
        bad = np.flatnonzero(reasons.to_numpy() != "")
        if bad.size:
            first = str(reasons.iloc[bad[0]]).split("; ")[0]
            field, _, message = first.partition(": ")
            raise InvalidRequest(["body", "instances", int(bad[0]), field], message)
        return columns, n

    def example(self, rows: int, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Generated applications within the field rules (warm-up): numbers in range, known levels."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {self.spec.id_column: np.arange(rows).astype(object)}
        for f in self.numeric:
            low = f.min if f.min is not None else 0.0
            high = f.max if f.max is not None else low + 1000.0
            value = rng.uniform(low, high, rows)
            out[f.name] = np.floor(value) if f.kind == "int" else value
        for f in self.categories:
            levels = f.levels or tuple(self.scorer.pipeline_.to_dict().get("levels", {}).get(f.name, ())) or ("",)
            out[f.name] = np.asarray(levels, dtype=object)[rng.integers(0, len(levels), rows)]
        return out

    def warm_up_sizes(self, max_rows: int) -> list[int]:
        return sorted({1, 2, 16, max_rows})  # nothing compiled: the allocator, the caches, the service time

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from finance.schema import coerce

        records = coerce(pd.DataFrame(inputs, copy=False), list(self.spec.fields))  # as the batch job types them
        scored = self.scorer.score(records, reasons="all")
        out = {"id": inputs[self.spec.id_column]}
        out.update((name, scored[name].to_numpy()) for name in self.outputs)
        return out


def _what(value: Any) -> str:
    return ("a boolean" if isinstance(value, bool) else "a string" if isinstance(value, str)
            else "a list" if isinstance(value, list) else "an object" if isinstance(value, dict)
            else type(value).__name__)
