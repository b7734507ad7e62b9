"""The bundle's model card (card.json, and the same JSON in the ONNX metadata_props under `moeworks.card`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import numpy as np

from finance.data import dataset_spec

CARD_KEY = "moeworks.card"
# The oldest onnxruntime that reproduces the test vectors, measured with tests/deploy/bundle/bundle_partner.py on
# PyPI's wheels: graphs without trees run on 1.19.2 (the oldest tried); TreeEnsemble (ai.onnx.ml 5)
# is missing before 1.21 and gives wrong leaves in 1.21.1-1.23.2 (PD off by 0.32); 1.24.1 and later are right.
MIN_ONNXRUNTIME = {"TreeEnsemble": "1.24.1", "": "1.19.2"}


def min_onnxruntime(operators: set[str]) -> str:
    return MIN_ONNXRUNTIME["TreeEnsemble" if "TreeEnsemble" in operators else ""]

_UNITS = {
    "taiwan": {"LIMIT_BAL": ("NT$", "credit limit of the card"), "SEX": ("code", "1 male, 2 female"),
               "EDUCATION": ("code", "1 graduate school, 2 university, 3 high school, 0/4/5/6 other"),
               "MARRIAGE": ("code", "1 married, 2 single, 0/3 other"), "AGE": ("years", "age of the client"),
               **{p: ("months late (code)", f"repayment status {m}: -2 no use, -1 paid duly, 0 revolving, k = k "
                      "months late") for p, m in zip(("PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6"),
                                                      ("September", "August", "July", "June", "May", "April"),
                                                      strict=True)},
               **{f"BILL_AMT{i}": ("NT$", f"bill statement, month {i} back (1 = September)") for i in range(1, 7)},
               **{f"PAY_AMT{i}": ("NT$", f"amount paid, month {i} back (1 = September)") for i in range(1, 7)}},
    "gmsc": {"RevolvingUtilizationOfUnsecuredLines": ("ratio", "revolving balances over credit limits"),
             "age": ("years", "age of the borrower"),
             **{field: ("count", f"times {words} days past due in 2 years (96/98: special codes)")
                for field, words in (("NumberOfTime30-59DaysPastDueNotWorse", "30-59"),
                                     ("NumberOfTime60-89DaysPastDueNotWorse", "60-89"),
                                     ("NumberOfTimes90DaysLate", "90+"))},
             "DebtRatio": ("ratio", "monthly debt payments over monthly income (the amount when income is missing)"),
             "MonthlyIncome": ("currency per month", "monthly income"),
             "NumberOfOpenCreditLinesAndLoans": ("count", "open loans and lines of credit"),
             "NumberRealEstateLoansOrLines": ("count", "mortgage and real-estate loans"),
             "NumberOfDependents": ("count", "dependents in the family, excluding the borrower")},
}
# raw fields that are protected attributes (anti-discrimination rules for credit: ECOA / Reg. B, EU law)
_PROTECTED_FIELDS = {"taiwan": {"SEX": "sex", "AGE": "age", "MARRIAGE": "marital status"},
                     "gmsc": {"age": "age", "NumberOfDependents": "family status"}}


def training_fingerprint(scorer, data_sha256: str | None) -> dict[str, Any]:
    """What identifies the training data: the file's SHA-256 when the builder was given it; else a
    hash of what the model learned from the rows (pipeline medians and levels, PSI/CSI references)."""
    fitted = hashlib.sha256(json.dumps({
        "pipeline": scorer.pipeline_.to_dict(), "reference_edges": np.asarray(scorer.reference_edges_).tolist(),
        "reference_shares": np.asarray(scorer.reference_shares_).tolist()}, sort_keys=True, default=float).encode())
    out: dict[str, Any] = {"training_rows": int(scorer.training_rows_),
                           "fitted_state_sha256": fitted.hexdigest()}
    if data_sha256:
        out["training_file_sha256"] = data_sha256
    else:
        out["note"] = ("the model folder records no hash of its training rows; fitted_state_sha256 hashes what was "
                       "learned from them (feature medians, PSI reference). Pass --training-data to record the file's")
    return out


def credit_card(scorer, *, opsets: dict[str, int], operators: set[str], data_sha256: str | None,
                k: int) -> dict[str, Any]:
    spec = dataset_spec(scorer.dataset)
    units = _UNITS[scorer.dataset]
    protected_fields = _PROTECTED_FIELDS[scorer.dataset]
    inputs = []
    for f in spec.fields:
        unit, meaning = units.get(f.name, ("", ""))
        inputs.append({
            "name": f.name, "type": "tensor(double) [N, 1]", "unit": unit, "meaning": meaning,
            "allowed_range": {"min": f.min, "max": f.max, "whole_numbers": f.kind == "int"},
            "missing": ("NaN. Allowed in this field." if not f.required else
                        "NaN. moeworks' loaders refuse a missing value here; the graph scores it as missing "
                        "(the scorecard's missing bin, LightGBM's missing branch), as finance.load_model().score "
                        "does."),
            "protected_attribute": protected_fields.get(f.name, "")})
    catalogue = scorer.pipeline_.catalogue_
    reasons = [{"index": j, "feature": s.name, "definition": s.definition, "family": s.family,
                "protected_attribute": s.protected, "training_median": float(m)}
               for j, (s, m) in enumerate(zip(catalogue, scorer.pipeline_.medians_, strict=True))]
    scale = scorer.policy_.scale
    network = has_network(scorer.model_)
    sequence = has_network(scorer.model_, ("sequence",))
    return {
        "schema": "moeworks-bundle-card/1",
        "model": {"family": f"credit/{scorer.model_name}", "dataset": scorer.dataset, "version": scorer.version_,
                  "summary": scorer.model_.summary(), "features": len(scorer.pipeline_.feature_names_)},
        "inputs": inputs,
        "outputs": [
            {"name": "pd", "type": "tensor(double) [N, 1]", "meaning": "probability of default"},
            {"name": "points", "type": "tensor(double) [N, 1]",
             "meaning": f"score points, higher is safer: {scale.base_score:g} at {scale.base_odds:g}:1 good:bad "
                        f"odds, {scale.pdo:g} points double the odds; rounded to 0.1"},
            {"name": "decision", "type": "tensor(int64) [N, 1]", "labels": ["approve", "decline"],
             "meaning": f"0 approve (pd <= {scorer.cutoff_pd_!r}), 1 decline" + (
                 "; -1 not scored: LIMIT_BAL missing or <= 0 (moeworks refuses the record; pd and points are "
                 "NaN, reasons -1)" if sequence else ""),
             "cutoff_pd": float(scorer.cutoff_pd_)},
            {"name": "reasons", "type": f"tensor(int64) [N, {k}]",
             "meaning": "indices into reason_table of the factors that raised this applicant's risk most, "
                        "strongest first, at most one per family; -1: no further factor"}],
        "reason_table": reasons,
        "training_data": training_fingerprint(scorer, data_sha256),
        "validation_metrics": scorer.validation_metrics_,
        "protected_attributes": {
            "raw_fields": protected_fields,
            "features_used": sorted({s.name for s in catalogue if s.protected}),
            "excluded_from_training": bool(scorer.pipeline_.exclude_protected),
            "note": "features_used lists the model's inputs computed from protected attributes; the law of the "
                    "partner's market decides whether they may be used (moeworks can train without them)."},
        "intended_use": "Probability of default of consumer credit applicants of the same population and "
                        "record format as the training data, with reason codes for adverse-action notices; "
                        "a decision aid under the lender's credit policy and human review.",
        "limitations": [
            "Trained on one historical population; performance drifts as applicants and the economy change: "
            "monitor PSI/CSI and re-validate before relying on it for another market or period.",
            "Inputs outside allowed_range are scored, not refused: validate records before scoring.",
            "pd is calibrated on the training population's default rate.",
            "Reason codes rank the model's own attributions; they are not causal statements."],
        "runtime": {"onnx_opsets": opsets, "min_onnxruntime": min_onnxruntime(operators),
                    # 0: identical. Networks run in float32, where the order of a sum moves the last bits
                    "tolerances": {"pd": 1e-4 if network else 1e-6, "points": 0.1, "decision": 0, "reasons": 0}},
        **({"attributions": " ".join(text for kind, text in (("moe", MOE_ATTRIBUTIONS),
                                                               ("sequence", SEQUENCE_ATTRIBUTIONS))
                                     if has_network(scorer.model_, (kind,)))} if network else {}),
    }


# What a partner should know about the MoE's reason codes (measured: benchmarks/bundles.py, RESULTS.md)
MOE_ATTRIBUTIONS = (
    "The MoE network's reasons are integrated gradients (8 midpoint steps from the average applicant), computed "
    "inside the graph by the network's forward and backward pass in float32, as moeworks computes them. The "
    "order of float32 sums differs between runtimes, so where two families' pushes lie within about 1e-6 of "
    "each other (or a push lies at the 1e-6 threshold) the order can differ from moeworks'; likewise where two "
    "experts' router scores tie to float32 rounding the other expert can be chosen, and that row's PD moves by "
    "more than 1e-4 (1 of GMSC's 120,000 rows, by 4e-3, in benchmarks/bundles.py). The test vectors match.")
SEQUENCE_ATTRIBUTIONS = (
    "The sequence Transformer's reasons are occlusion pushes, as moeworks computes them: the network runs on "
    "the applicant and on one copy per raw field (each month's PAY_x, BILL_AMTx and PAY_AMTx, LIMIT_BAL, AGE, "
    "SEX, EDUCATION, MARRIAGE) with that field at the reference client's value (standardised 0, the commonest "
    "status or level); a push is the drop in float32 log-odds, placed on the pipeline feature that holds the "
    "field (EDUCATION 2 on education=2). Its MoE layers run every expert and weight the chosen two (the static "
    "path), so pushes within about 1e-6 of each other or of the 1e-6 threshold can rank differently from "
    "moeworks'. The test vectors match.")


def has_network(model, kinds: tuple[str, ...] = ("moe", "sequence")) -> bool:
    """Whether a credit model (or one of an ensemble's members) is one of the networks `kinds`."""
    return model.name in kinds or any(has_network(m, kinds) for m in getattr(model, "members_", []))


def ai4i_test_rows(training):
    """Test rows: up to 24 training rows (or generated ones), then extremes: every reading at 0, at
    1e6 and negative, and each machine type."""
    import pandas as pd

    from manufacturing.maintenance.ai4i import INPUTS, NUMERIC_INPUTS, generate_ai4i

    sample = (training if training is not None else generate_ai4i(24, seed=0))[INPUTS].iloc[:24]
    extremes = [{"Type": t, **dict.fromkeys(NUMERIC_INPUTS, v)} for t in ("L", "M", "H") for v in (0.0, 1e6, -50.0)]
    return pd.concat([sample, pd.DataFrame(extremes)], ignore_index=True)


def ai4i_card(model, *, opsets: dict[str, int], operators: set[str], data_sha256: str | None,
              backend: str = "lightgbm") -> dict[str, Any]:
    from manufacturing.maintenance.ai4i import NUMERIC_INPUTS, OUTPUTS

    units = {"Air temperature [K]": "K", "Process temperature [K]": "K", "Rotational speed [rpm]": "rpm",
             "Torque [Nm]": "Nm", "Tool wear [min]": "min"}
    meanings = {"failure": "any machine failure", "TWF": "tool wear failure", "HDF": "heat dissipation failure",
                "PWF": "power failure", "OSF": "overstrain failure", "RNF": "random failure"}
    training = {"fitted_state_sha256": hashlib.sha256(json.dumps(
        {"mean": np.asarray(model.mean_).tolist(), "std": np.asarray(model.std_).tolist()}).encode()).hexdigest()}
    if data_sha256:
        training["training_file_sha256"] = data_sha256
    return {
        "schema": "moeworks-bundle-card/1",
        "model": {"family": f"maintenance/ai4i-{backend}", "dataset": "ai4i2020",
                  "version": _ai4i_version(model, backend),
                  "backend": backend, "default_backend_of_model": model.default_backend_},
        "inputs": [{"name": "Type", "type": "tensor(string) [N, 1]", "unit": "",
                    "meaning": "product quality: L, M or H",
                    "allowed_range": {"levels": ["L", "M", "H"]},
                    "missing": "not allowed (moeworks refuses it); any other string is scored as an unknown type",
                    "protected_attribute": ""},
                   *({"name": n, "type": "tensor(double) [N, 1]", "unit": units[n], "meaning": n.split(" [")[0],
                      "allowed_range": {"finite": True},
                      "missing": "not allowed: moeworks refuses non-finite readings" + (
                          "; NaN follows LightGBM's missing branch" if backend == "lightgbm" else
                          "; NaN gives NaN probabilities"), "protected_attribute": ""} for n in NUMERIC_INPUTS)],
        "outputs": [{"name": o, "type": "tensor(double) [N, 1]", "meaning": f"probability of {meanings[o]}"}
                    for o in OUTPUTS],
        "training_data": training,
        "validation_metrics": getattr(model, "metrics_", {}),
        "protected_attributes": {"raw_fields": {}, "note": "machine readings only; no personal data"},
        "intended_use": "Early warning of milling-machine failures from one reading of the AI4I 2020 kind.",
        "limitations": ["AI4I 2020 is synthetic data of one machine type; re-validate on the plant's own "
                        "history before acting on alerts.", "Random failures (RNF) are not predictable."],
        "runtime": {"onnx_opsets": opsets, "min_onnxruntime": min_onnxruntime(operators),
                    # float32 network: 1e-4 as the credit networks (issue 17), the trees 1e-6
                    "tolerances": dict.fromkeys(OUTPUTS, 1e-4 if backend == "moe" else 1e-6)},
    }


def _ai4i_version(model, backend: str) -> str:
    """The first 16 hex digits of the SHA-256 of the backend's fitted state (boosters or network weights)."""
    from manufacturing.maintenance.ai4i import OUTPUTS

    digest = hashlib.sha256()
    if backend == "lightgbm":
        digest.update("".join(model.boosters_[o].model_to_string() for o in OUTPUTS).encode())
    else:
        for name, tensor in sorted(model.moe_.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def rul_test_engines(estimator, training):
    """Test engines in C-MAPSS columns: six engines of the training file (or generated ones) cut to
    1 cycle, a third of the window, one short of it, exactly it, a little more and their whole life,
    and a seventh whose last cycle reads 1e6 on every sensor (moeworks scores it; so must the graph)."""
    import pandas as pd

    from manufacturing.maintenance.generator import generate_cmapss

    window = estimator.net_.window
    frame = training if training is not None else generate_cmapss(
        7, num_regimes=estimator.normalizer_.config.num_regimes, seed=0, min_life=window + 20)
    units = list(dict.fromkeys(frame["unit"]))[:7]
    lengths = [1, max(1, window // 3), max(1, window - 1), window, window + 7, None, None]
    parts = []
    for unit, length in zip(units, lengths, strict=False):
        rows = frame[frame["unit"] == unit]
        parts.append(rows if length is None else rows.iloc[:length])
    engines = pd.concat(parts, ignore_index=True)
    last = engines.index[engines["unit"] == units[-1]][-1]
    engines.loc[last, list(estimator.normalizer_.sensors_)] = 1e6
    return engines


# what the C-MAPSS readme says of its columns (it gives no units)
_CMAPSS_MEANINGS = {"setting_1": "operational setting 1 (altitude, thousands of feet, in C-MAPSS)",
                    "setting_2": "operational setting 2 (Mach number)",
                    "setting_3": "operational setting 3 (throttle resolver angle)"}


def rul_card(estimator, *, opsets: dict[str, int], operators: set[str], data_sha256: str | None) -> dict[str, Any]:
    from deploy.bundle.rul_graph import rul_fields

    norm, net = estimator.normalizer_, estimator.net_
    training = {"fingerprint": estimator.metadata_.get("data_fingerprint"),
                "train_units": estimator.metadata_.get("train_units")}
    if data_sha256:
        training["training_file_sha256"] = data_sha256
    return {
        "schema": "moeworks-bundle-card/1",
        "model": {"family": f"maintenance/rul-{net.kind}", "dataset": "C-MAPSS format",
                  "version": hashlib.sha256(json.dumps({"net": net.to_dict(), "normalizer": norm.state(),
                                                        "fingerprint": training["fingerprint"]},
                                                       sort_keys=True, default=str).encode()).hexdigest()[:16],
                  "net": net.to_dict(), "window": net.window, "rul_cap": net.rul_cap,
                  "regimes": norm.config.num_regimes, "features": asdict(norm.config)},
        "inputs": [{"name": name, "type": "tensor(double) [N, T]", "unit": "as in the C-MAPSS file",
                    "meaning": _CMAPSS_MEANINGS.get(name, f"sensor measurement {name[2:]}"),
                    "layout": "N engines x T cycles, oldest first; an engine with fewer than T cycles is padded "
                              "at the front with NaN (a row whose setting_1 is NaN is padding). Any T >= 1: the "
                              f"graph repeats an engine's first cycle in front when it has fewer than {net.window}.",
                    "allowed_range": {"finite": True, "max_abs": float(np.finfo(np.float32).max)},
                    "missing": "NaN in setting_1 marks a padding row (only before an engine's first cycle); a NaN "
                               "anywhere else among an engine's rows, or padding after its first cycle, gives NaN "
                               "RUL (moeworks refuses such a file)",
                    "protected_attribute": ""} for name in rul_fields(estimator)],
        "outputs": [{"name": "rul", "type": "tensor(float) [N, 1]",
                     "meaning": "remaining useful life in cycles after each engine's last row (capped at "
                                f"{net.rul_cap:g} in training); NaN for an engine without rows"}],
        "normalisation": "inside the graph: the regime of each cycle (nearest of the k-means centres of the "
                         "settings over their training standard deviations), each sensor standardised within its "
                         "regime, then " + ", ".join(
                             p for p, on in (("the regime one-hot", norm.config.num_regimes > 1),
                                             ("cycles run in each regime / 100", norm.config.history),
                                             ("running means of the normalised sensors", norm.config.running_mean))
                             if on) + f"; the last {net.window} cycles go to the network",
        "training_data": training,
        "validation_metrics": estimator.metadata_.get("metrics", {}),
        "protected_attributes": {"raw_fields": {}, "note": "engine readings only; no personal data"},
        "intended_use": "Remaining useful life of turbofan engines recorded in the C-MAPSS format and "
                        "operating like the training fleet, to plan maintenance.",
        "limitations": ["C-MAPSS is simulated data; re-validate on the fleet's own run-to-failure history.",
                        f"Trained on RUL capped at {net.rul_cap:g}: long remaining lives read as about the cap.",
                        "Sensors and settings are not range-checked in the graph: validate readings first."],
        "runtime": {"onnx_opsets": opsets, "min_onnxruntime": min_onnxruntime(operators),
                    "tolerances": {"rul": 1e-3}},  # cycles: float32 networks, sums in another order
    }
