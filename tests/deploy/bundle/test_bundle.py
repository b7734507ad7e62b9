"""Partner bundles (deploy/bundle): one ONNX graph from raw fields to pd, points, decision and reasons.

Models are trained here on generated records in the Taiwan and GMSC formats (a few seconds), with
missing values and extremes injected into what is scored; the real-data parity runs in
benchmarks/bundles.py. Signing keys are made at test time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from core.bundle_signing import BundleIntegrityError
from core.config import MoEConfig
from core.trainer import TrainerConfig
from deploy.bundle.build import build_bundle, run_graph, verify_bundle
from deploy.bundle.credit_features import BundleError
from finance.data import TAIWAN_PAY, Records, dataset_spec
from finance.models.ensemble import EnsembleConfig
from finance.models.gbdt import LightGBMConfig
from finance.models.moe import MoEModelConfig
from finance.scorer import CreditScorer
from finance.sequence import SequenceTrainingConfig, SequenceTransformerConfig
from finance.sequence.credit_model import SequenceModelConfig

ROOT = Path(__file__).resolve().parents[3]
PARTNER = Path(__file__).resolve().parent  # bundle_partner.py and .js: a partner's own checks


def taiwan_records(n: int, seed: int) -> Records:
    """Taiwan-format records whose default risk rises with late payments and utilisation."""
    rng = np.random.default_rng(seed)
    limit = rng.choice([10_000, 50_000, 100_000, 200_000, 500_000], n).astype(float)
    status = rng.choice([-2, -1, 0, 0, 0, 1, 2, 3], (n, 6)).astype(float)
    bill = np.round(limit[:, None] * rng.uniform(-0.05, 1.1, (n, 6)))
    paid = np.round(np.clip(bill * rng.uniform(0, 1.2, (n, 6)), 0, None))
    frame = pd.DataFrame({"ID": np.arange(n), "LIMIT_BAL": limit, "SEX": rng.integers(1, 3, n).astype(float),
                          "EDUCATION": rng.integers(0, 7, n).astype(float),
                          "MARRIAGE": rng.integers(0, 4, n).astype(float), "AGE": rng.integers(21, 75, n).astype(float),
                          **{p: status[:, j] for j, p in enumerate(TAIWAN_PAY)},
                          **{f"BILL_AMT{i + 1}": bill[:, i] for i in range(6)},
                          **{f"PAY_AMT{i + 1}": paid[:, i] for i in range(6)}})
    logit = -1.6 + 0.7 * np.clip(status[:, 0], 0, None) + 0.3 * np.clip(status[:, 1:3], 0, None).sum(1) \
        + 0.8 * (bill[:, 0] / limit) - 0.5 * (paid[:, 0] > bill[:, 1])
    target = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return Records("taiwan", frame, target)


def gmsc_records(n: int, seed: int) -> Records:
    rng = np.random.default_rng(seed)
    late = rng.poisson(0.3, (n, 3)).astype(float)
    late[rng.random(n) < 0.01] = 98.0  # the dataset's special codes
    income = np.round(rng.lognormal(8.5, 0.6, n))
    income[rng.random(n) < 0.15] = np.nan
    frame = pd.DataFrame({"Id": np.arange(n), "RevolvingUtilizationOfUnsecuredLines": rng.beta(1, 2, n) * 1.3,
                          "age": rng.integers(21, 90, n).astype(float),
                          "NumberOfTime30-59DaysPastDueNotWorse": late[:, 0], "DebtRatio": rng.gamma(1, 0.4, n),
                          "MonthlyIncome": income, "NumberOfOpenCreditLinesAndLoans": rng.poisson(8, n).astype(float),
                          "NumberOfTimes90DaysLate": late[:, 2],
                          "NumberRealEstateLoansOrLines": rng.poisson(1, n) * 1.0,
                          "NumberOfTime60-89DaysPastDueNotWorse": late[:, 1],
                          "NumberOfDependents": np.where(rng.random(n) < 0.05, np.nan, rng.poisson(0.8, n) * 1.0)})
    logit = -2.5 + 0.6 * np.clip(late, 0, 5).sum(1) + 1.2 * frame["RevolvingUtilizationOfUnsecuredLines"].to_numpy()
    return Records("gmsc", frame, (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int))


def with_missing_and_extremes(records: Records, seed: int) -> pd.DataFrame:
    """Scoring records with ~5% of every field missing, plus rows of huge, zero and negative values."""
    rng = np.random.default_rng(seed)
    frame = records.frame.copy()
    fields = dataset_spec(records.dataset).field_names
    values = frame[fields].to_numpy(dtype=np.float64).copy()
    values[rng.random(values.shape) < 0.05] = np.nan
    values[:3] = [[1e12], [0.0], [-1e6]]
    frame[fields] = values
    return frame


_CONFIGS = {"lightgbm": LightGBMConfig(max_rounds=60, min_child_samples=20),
            "ensemble": EnsembleConfig(members=["lightgbm", "scorecard"], cross_fit=False),
            "moe": MoEModelConfig(max_epochs=2, hidden_size=32, intermediate_size=64),  # seconds, not minutes
            "sequence": SequenceModelConfig(
                model=SequenceTransformerConfig(num_layers=1, moe=MoEConfig(num_experts=4, top_k=2, hidden_size=16,
                                                                            intermediate_size=32)),
                training=SequenceTrainingConfig(trainer=TrainerConfig(max_epochs=2, progress=False,
                                                                      monitor="val_auc", mode="max")))}


def _sequence_ensemble(train: Records, valid: Records) -> CreditScorer:
    """`finance train --model sequence-ensemble` (LightGBM and the sequence Transformer blended), its
    members trained with the small test configs."""
    from finance.models.base import FitData, build_model
    from finance.sequence.credit_model import SequenceEnsembleModel

    pipeline = CreditScorer(dataset="taiwan", model_name="scorecard").fit(*train.xy, eval_set=[valid.xy]).pipeline_
    fit_train = FitData(pipeline.transform(train.frame), train.frame)
    fit_valid = FitData(pipeline.transform(valid.frame), valid.frame)
    members = [build_model(name, feature_names=pipeline.feature_names_, dataset="taiwan",
                           config=_CONFIGS.get(name)).fit(fit_train, train.target,
                                                          eval_set=[(fit_valid, valid.target)])
               for name in ("lightgbm", "sequence")]
    ensemble = SequenceEnsembleModel.from_fitted(members, fit_valid, valid.target,
                                                 feature_names=pipeline.feature_names_, dataset="taiwan")
    return CreditScorer(dataset="taiwan", model_name="sequence-ensemble").fit(*train.xy, eval_set=[valid.xy],
                                                                              fitted_model=ensemble)


def _default_ensemble(dataset: str, train: Records, valid: Records) -> CreditScorer:
    """`finance train --model ensemble` (LightGBM, MoE, scorecard blended), its members trained with the
    small test configs and blended by `EnsembleModel.from_fitted`, as the default ensemble blends them."""
    from finance.models.base import build_model
    from finance.models.ensemble import EnsembleModel

    pipeline = CreditScorer(dataset=dataset, model_name="scorecard").fit(*train.xy, eval_set=[valid.xy]).pipeline_
    X_train, X_valid = pipeline.transform(train.frame), pipeline.transform(valid.frame)
    members = [build_model(name, feature_names=pipeline.feature_names_, dataset=dataset,
                           config=_CONFIGS.get(name)).fit(X_train, train.target, eval_set=[(X_valid, valid.target)])
               for name in ("lightgbm", "moe", "scorecard")]
    ensemble = EnsembleModel.from_fitted(members, X_valid, valid.target, feature_names=pipeline.feature_names_,
                                         dataset=dataset)
    return CreditScorer(dataset=dataset, model_name="ensemble").fit(*train.xy, eval_set=[valid.xy],
                                                                    fitted_model=ensemble)


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """Saved models trained on generated records: {(dataset, model): folder}; ("gmsc", "moe-ensemble")
    is the default three-member ensemble, ("taiwan", "sequence-ensemble") LightGBM + the sequence model."""
    out = {}
    for dataset, make, models in (("taiwan", taiwan_records, ("scorecard", "lightgbm", "ensemble", "moe", "sequence",
                                                              "sequence-ensemble")),
                                  ("gmsc", gmsc_records, ("lightgbm", "moe-ensemble"))):
        train, valid = make(2500, 1), make(800, 2)
        for name in models:
            scorer = (_default_ensemble(dataset, train, valid) if name == "moe-ensemble" else
                      _sequence_ensemble(train, valid) if name == "sequence-ensemble" else
                      CreditScorer(dataset=dataset, model_name=name, model_config=_CONFIGS.get(name)).fit(
                          *train.xy, eval_set=[valid.xy]))
            out[(dataset, name)] = scorer.save(tmp_path_factory.mktemp(f"{dataset}-{name}"))
    return out


@pytest.fixture(scope="module")
def ai4i_model(tmp_path_factory):
    """An AI4I failure model on generated readings (one MoE epoch: enough for the graph's maths)."""
    from manufacturing.maintenance.ai4i import AI4IFailureModel, generate_ai4i

    return AI4IFailureModel(max_epochs=1, progress=False).fit(generate_ai4i(2000, seed=0)).save(
        tmp_path_factory.mktemp("ai4i"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two EC P-256 key pairs in PEM: (private, public) for the publisher and for someone else."""
    folder = tmp_path_factory.mktemp("keys")
    pairs = []
    for name in ("publisher", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        private, public = folder / f"{name}.pem", folder / f"{name}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        pairs.append((private, public))
    return pairs


@pytest.fixture(scope="module")
def signed_bundle(scorers, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed") / "bundle"
    build_bundle(scorers[("taiwan", "lightgbm")], out, sign_key=keys[0][0])
    return out


@pytest.mark.parametrize("key", [("taiwan", "scorecard"), ("taiwan", "lightgbm"), ("taiwan", "ensemble"),
                                 ("gmsc", "lightgbm"), ("taiwan", "moe"), ("gmsc", "moe-ensemble"),
                                 ("taiwan", "sequence"), ("taiwan", "sequence-ensemble")], ids="-".join)
def test_graph_from_raw_fields_reproduces_finance_score(scorers, tmp_path, key):
    from finance import load_model

    dataset, name = key
    records = (taiwan_records if dataset == "taiwan" else gmsc_records)(1500, 7)
    frame = with_missing_and_extremes(records, 3)
    out = build_bundle(scorers[key], tmp_path / "bundle")
    scorer = load_model(scorers[key])
    if "sequence" in name:  # moeworks refuses a missing or non-positive credit limit; the graph answers -1
        refused = ~(frame["LIMIT_BAL"] > 0)
        assert refused.sum() > 10
        got = run_graph(Path(out["bundle"]) / "model.onnx",
                        {f: frame.loc[refused, f].tolist() for f in dataset_spec(dataset).field_names})
        assert np.isnan(got["pd"]).all() and np.isnan(got["points"]).all()
        assert (got["decision"] == -1).all() and (got["reasons"] == -1).all()
        frame = frame[~refused].reset_index(drop=True)
    expected = scorer.score(frame)
    got = run_graph(Path(out["bundle"]) / "model.onnx",
                    {f: frame[f].tolist() for f in dataset_spec(dataset).field_names})
    network = "moe" in name or "sequence" in name  # float32 networks: PD within 1e-4 (issue 17), the rest 1e-6
    np.testing.assert_allclose(got["pd"][:, 0], expected["pd"], rtol=0, atol=1e-4 if network else 1e-6)
    card = json.loads((Path(out["bundle"]) / "card.json").read_text())
    assert card["runtime"]["tolerances"]["pd"] == (1e-4 if network else 1e-6)
    assert ("attributions" in card) == network
    np.testing.assert_allclose(got["points"][:, 0], expected["points"], rtol=0, atol=0.1 + 1e-9)
    assert ((got["decision"][:, 0] == 1) == (expected["decision"] == "decline")).all()
    names = np.array([*scorer.pipeline_.feature_names_, ""], dtype=object)
    codes = ["|".join(names[row[row >= 0]]) for row in got["reasons"]]
    assert codes == expected["reason_codes"].tolist()
    assert expected["reason_codes"].str.len().gt(0).mean() > 0.5  # the comparison covers real reasons


def test_ai4i_bundle_from_raw_readings_reproduces_the_lightgbm_backend(ai4i_model, tmp_path):
    from manufacturing.maintenance.ai4i import INPUTS, NUMERIC_INPUTS, OUTPUTS, AI4IFailureModel, generate_ai4i

    out = Path(build_bundle(ai4i_model, tmp_path / "b")["bundle"])
    rows = generate_ai4i(600, seed=3)[INPUTS]
    rows.loc[:2, "Tool wear [min]"] = [0.0, 1e6, -5.0]  # extremes are scored as moeworks scores them
    got = run_graph(out / "model.onnx", {"Type": rows["Type"].tolist(),
                                         **{n: rows[n].tolist() for n in NUMERIC_INPUTS}})
    expected = AI4IFailureModel.load(ai4i_model).predict_proba(rows, backend="lightgbm")
    for name in OUTPUTS:
        np.testing.assert_allclose(got[name][:, 0], expected[name], rtol=0, atol=1e-6)
    assert expected["failure"].max() > 0.5 > expected["failure"].min()  # both sides of an alert are covered
    card = json.loads((out / "card.json").read_text())
    assert [i["name"] for i in card["inputs"]] == INPUTS and [o["name"] for o in card["outputs"]] == OUTPUTS
    assert verify_bundle(out)["signature"] == "unsigned"


def test_ai4i_moe_bundle_reproduces_the_moe_backend(ai4i_model, tmp_path):
    from manufacturing.maintenance.ai4i import INPUTS, NUMERIC_INPUTS, OUTPUTS, AI4IFailureModel, generate_ai4i

    out = Path(build_bundle(ai4i_model, tmp_path / "b", backend="moe")["bundle"])
    rows = generate_ai4i(600, seed=4)[INPUTS]
    rows.loc[:2, "Torque [Nm]"] = [0.0, 1e6, -5.0]
    rows.loc[3, "Type"] = "X"  # an unknown type: embedding row 0, as moeworks codes it
    got = run_graph(out / "model.onnx", {"Type": rows["Type"].tolist(),
                                         **{n: rows[n].tolist() for n in NUMERIC_INPUTS}})
    model = AI4IFailureModel.load(ai4i_model)
    expected = model.predict_proba(rows.drop(index=3), backend="moe")
    for name in OUTPUTS:
        np.testing.assert_allclose(np.delete(got[name][:, 0], 3), expected[name], rtol=0, atol=1e-4)
        assert expected[name].std() > 1e-3  # the network's outputs vary with the readings: real values compared
    # the graph is not the LightGBM one: the backends disagree where the graph follows the network
    lightgbm = model.predict_proba(rows.drop(index=3), backend="lightgbm")["failure"]
    assert np.abs(np.delete(got["failure"][:, 0], 3) - lightgbm).max() > 1e-3
    card = json.loads((out / "card.json").read_text())
    assert card["model"]["family"] == "maintenance/ai4i-moe" and card["model"]["backend"] == "moe"
    assert card["runtime"]["tolerances"] == dict.fromkeys(OUTPUTS, 1e-4)
    assert verify_bundle(out)["test_vectors"] == len(json.loads((out / "test_vectors.json").read_text())["expected"]
                                                     ["failure"])


def test_a_backend_is_chosen_for_ai4i_models_only(ai4i_model, tmp_path):
    credit = tmp_path / "credit"
    credit.mkdir()
    (credit / "scorer.json").write_text("{}")  # refused before the model is read
    with pytest.raises(BundleError, match="AI4I failure models only"):
        build_bundle(credit, tmp_path / "a", backend="moe")
    with pytest.raises(BundleError, match="unknown AI4I backend 'tree'"):
        build_bundle(ai4i_model, tmp_path / "b", backend="tree")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_graph_inputs_are_the_raw_fields_and_the_card_describes_them(scorers, tmp_path):
    out = Path(build_bundle(scorers[("taiwan", "scorecard")], tmp_path / "b")["bundle"])
    proto = onnx.load(str(out / "model.onnx"))
    spec = dataset_spec("taiwan")
    assert [i.name for i in proto.graph.input] == spec.field_names
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE for i in proto.graph.input)
    assert [o.name for o in proto.graph.output] == ["pd", "points", "decision", "reasons"]
    card = json.loads((out / "card.json").read_text())
    assert json.loads({p.key: p.value for p in proto.metadata_props}["moeworks.card"]) == card
    assert [i["name"] for i in card["inputs"]] == spec.field_names
    protected = {i["name"]: i["protected_attribute"] for i in card["inputs"] if i["protected_attribute"]}
    assert protected == {"SEX": "sex", "AGE": "age", "MARRIAGE": "marital status"}
    assert {i["name"]: i["allowed_range"] for i in card["inputs"]}["PAY_0"] == {"min": -2, "max": 9,
                                                                              "whole_numbers": True}
    assert card["model"]["family"] == "credit/scorecard" and card["validation_metrics"]["auc"] > 0.6
    assert card["runtime"]["onnx_opsets"]["ai.onnx"] == 18 and card["runtime"]["min_onnxruntime"]
    assert len(card["training_data"]["fitted_state_sha256"]) == 64
    vectors = json.loads((out / "test_vectors.json").read_text())
    assert any(v is None for v in vectors["inputs"]["AGE"])  # missing values are among the vectors
    assert max(v for v in vectors["inputs"]["LIMIT_BAL"] if v is not None) >= 1e12  # and extremes
    reasons = np.array(vectors["expected"]["reasons"])
    assert (reasons >= 0).any() and (reasons == -1).any()
    assert all(card["reason_table"][j]["feature"] for j in reasons[reasons >= 0])


def test_signed_bundle_verifies_and_refuses_any_change(signed_bundle, keys, tmp_path):
    import shutil

    publisher, other = keys
    assert verify_bundle(signed_bundle, key=publisher[1])["signature"] == "verified"
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        verify_bundle(signed_bundle, key=other[1])
    private_pem = publisher[0].read_bytes()
    for file in signed_bundle.iterdir():  # the private key is never written into a bundle
        assert private_pem not in file.read_bytes() and b"PRIVATE KEY" not in file.read_bytes()

    def tampered(change) -> Path:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(signed_bundle, copy)
        change(copy)
        return copy

    def flip_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))

    changes = [lambda b: flip_byte(b / "model.onnx"), lambda b: flip_byte(b / "card.json"),
               lambda b: (b / "extra.txt").write_text("x"), lambda b: (b / ".gitignore").write_text("*"),
               lambda b: (b / "test_vectors.json").unlink()]
    for change in changes:
        copy = tampered(change)
        with pytest.raises(BundleIntegrityError):
            verify_bundle(copy, key=publisher[1])
    # without a key the manifest alone still catches a changed byte
    with pytest.raises(BundleIntegrityError, match="changed"):
        verify_bundle(tampered(lambda b: flip_byte(b / "model.onnx")))


def test_cli_build_verify_inspect_and_refusals(scorers, keys, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "deploy.cli", "bundle", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    out = tmp_path / "b"
    built = cli("build", "--model", str(scorers[("gmsc", "lightgbm")]), "--out", str(out), "--sign-key",
                str(keys[0][0]), "--json")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["signed"] is True
    verified = cli("verify", str(out), "--key", str(keys[0][1]), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["signature"] == "verified"
    wrong = cli("verify", str(out), "--key", str(keys[1][1]))
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: signature does not verify")
    inspected = json.loads(cli("inspect", str(out), "--json").stdout)
    assert inspected["card"]["protected_attributes"]["raw_fields"] == {"age": "age",
                                                                       "NumberOfDependents": "family status"}
    for args in (("build", "--model", str(tmp_path), "--out", str(tmp_path / "x")),  # not a model folder
                 ("build", "--model", str(scorers[("gmsc", "lightgbm")]), "--out", str(out)),  # not empty
                 ("build", "--model", str(scorers[("gmsc", "lightgbm")]), "--out", str(tmp_path / "y"),
                  "--sign-key", str(keys[0][1])),  # a public key is no signing key
                 ("verify", str(tmp_path / "nothing")), ("inspect", str(tmp_path))):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "y").exists()  # a failed signing leaves no half bundle
    packed = tmp_path / "b.tar.gz"
    assert cli("build", "--model", str(scorers[("gmsc", "lightgbm")]), "--out", str(packed), "--archive",
               "--sign-key", str(keys[0][0])).returncode == 0
    verified = cli("verify", str(packed), "--key", str(keys[0][1]), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["archive"] is True
    assert cli("verify", str(packed), "--key", str(keys[1][1])).returncode == 2
    refused = cli("build", "--model", str(tmp_path), "--out", str(tmp_path / "z"))  # e.g. a defects run folder
    assert "no model folder a bundle covers" in refused.stderr and "RUL lstm and moe" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_models_without_a_bundle_graph_are_refused_by_name(scorers, tmp_path):
    from finance import load_model

    scorer = load_model(scorers[("taiwan", "scorecard")])
    scorer.model_name = "future-family"  # a model family without a graph yet
    from deploy.bundle.credit_graph import credit_graph

    with pytest.raises(BundleError, match="future-family"):
        credit_graph(scorer)


def partner_bundles(signed_bundle: Path, scorers, ai4i_model: Path, rul_models: dict, tmp_path: Path) -> list[Path]:
    """The signed credit bundle and a new bundle of every other kind of model: what a partner must reproduce."""
    return [signed_bundle, Path(build_bundle(scorers[("taiwan", "scorecard")], tmp_path / "sc")["bundle"]),
            Path(build_bundle(scorers[("taiwan", "ensemble")], tmp_path / "ens")["bundle"]),
            Path(build_bundle(scorers[("taiwan", "moe")], tmp_path / "moe")["bundle"]),
            Path(build_bundle(scorers[("gmsc", "moe-ensemble")], tmp_path / "moe-ens")["bundle"]),
            Path(build_bundle(scorers[("taiwan", "sequence")], tmp_path / "seq")["bundle"]),
            Path(build_bundle(ai4i_model, tmp_path / "ai4i")["bundle"]),
            Path(build_bundle(ai4i_model, tmp_path / "ai4i-moe", backend="moe")["bundle"]),
            *(Path(build_bundle(folder, tmp_path / f"rul-{kind}")["bundle"]) for kind, folder in rul_models.items())]


@pytest.mark.slow
def test_partner_python_without_moeworks_reproduces_the_test_vectors(partner_python, scorers, signed_bundle,
                                                                     ai4i_model, rul_models, tmp_path):
    for module in ("finance", "torch", "pandas", "sklearn", "lightgbm"):  # the partner has none of ours
        probe = subprocess.run([str(partner_python), "-c", f"import {module}"], capture_output=True, cwd=tmp_path)
        assert probe.returncode != 0, module
    bundles = partner_bundles(signed_bundle, scorers, ai4i_model, rul_models, tmp_path)
    for bundle in bundles:
        run = subprocess.run([str(partner_python), str(PARTNER / "bundle_partner.py"), str(bundle)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)["problems"] == []
    broken = tmp_path / "broken"  # a partner check that cannot fail is no check
    import shutil

    shutil.copytree(signed_bundle, broken)
    vectors = json.loads((broken / "test_vectors.json").read_text())
    vectors["expected"]["pd"][0] += 1e-5
    (broken / "test_vectors.json").write_text(json.dumps(vectors))
    run = subprocess.run([str(partner_python), str(PARTNER / "bundle_partner.py"), str(broken)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "pd error" in run.stdout


@pytest.mark.slow
def test_partner_node_reproduces_the_test_vectors(partner_node, scorers, signed_bundle, ai4i_model, rul_models,
                                                 tmp_path):
    import os

    env = {**os.environ, "NODE_PATH": str(partner_node)}
    bundles = partner_bundles(signed_bundle, scorers, ai4i_model, rul_models, tmp_path)
    for bundle in bundles:
        run = subprocess.run(["node", str(PARTNER / "bundle_partner.js"), str(bundle)], capture_output=True,
                             text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stdout + run.stderr
        assert json.loads(run.stdout)["problems"] == []
    vectors = json.loads((signed_bundle / "test_vectors.json").read_text())
    vectors["expected"]["reasons"][0][0] += 1
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(signed_bundle, broken)
    (broken / "test_vectors.json").write_text(json.dumps(vectors))
    run = subprocess.run(["node", str(PARTNER / "bundle_partner.js"), str(broken)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 1 and "reasons" in run.stdout


@pytest.fixture(scope="module")
def rul_models(tiny_rul_estimator, tmp_path_factory):
    """Saved RUL models on generated engines: an LSTM (one regime) and a two-member MoE over six
    regimes with the history and running-mean features (the MoE recipe's shape)."""
    from manufacturing.maintenance.generator import generate_cmapss

    out = {}
    for kind, regimes in (("lstm", 1), ("moe-ensemble", 6)):
        estimator = tiny_rul_estimator(kind, num_regimes=regimes).fit(generate_cmapss(8, num_regimes=regimes, seed=1))
        out[kind] = estimator.save(tmp_path_factory.mktemp(f"rul-{kind}"))
    return out


def _engine_inputs(frame: pd.DataFrame, fields: list[str]) -> dict[str, np.ndarray]:
    """(engines, cycles) per field, shorter engines padded at the front with NaN (the card's layout)."""
    units = sorted(frame["unit"].unique())
    longest = int(frame.groupby("unit").size().max())
    out = {}
    for name in fields:
        array = np.full((len(units), longest), np.nan)
        for i, unit in enumerate(units):
            values = frame.loc[frame["unit"] == unit, name].to_numpy(np.float64)
            array[i, longest - len(values):] = values
        out[name] = array
    return out


@pytest.mark.parametrize("kind", ["lstm", "moe-ensemble"])
def test_rul_graph_from_raw_cycles_reproduces_predict(rul_models, tmp_path, kind):
    import onnxruntime as ort

    from deploy.bundle.rul_graph import rul_fields
    from manufacturing.maintenance.generator import generate_cmapss
    from manufacturing.maintenance.rul import RULEstimator

    estimator = RULEstimator.load(rul_models[kind])
    regimes = estimator.normalizer_.config.num_regimes
    engines = generate_cmapss(9, num_regimes=regimes, seed=5, min_life=60, max_life=90, first_unit=50)
    # engines cut at every length around the window (30), down to one cycle
    cut = [g.iloc[:n] for (_, g), n in zip(engines.groupby("unit"), (1, 2, 10, 29, 30, 31, 45, 60, 90), strict=True)]
    frame = pd.concat(cut, ignore_index=True)
    out = Path(build_bundle(rul_models[kind], tmp_path / "b")["bundle"])
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = _engine_inputs(frame, rul_fields(estimator))
    got = session.run(None, inputs)[0][:, 0]
    expected = estimator.predict(frame)["rul"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert np.ptp(expected) > 0.1  # engines of different age get different lives: the window is read
    card = json.loads((out / "card.json").read_text())
    assert [i["name"] for i in card["inputs"]] == rul_fields(estimator) == [i.name for i in session.get_inputs()]
    assert card["model"]["family"] == f"maintenance/rul-{estimator.net_.kind}"
    # an engine without rows, and a missing reading among an engine's rows, give NaN, not a number
    inputs["setting_1"][0, :] = np.nan
    inputs[rul_fields(estimator)[-1]][1, -1] = np.nan
    inputs[rul_fields(estimator)[-1]][8, 0] = np.nan  # long before the window: the whole engine is refused
    inputs["setting_1"][7, -40] = np.nan  # a gap in the middle of an engine's cycles
    got = session.run(None, inputs)[0][:, 0]
    assert np.isnan(got[[0, 1, 7, 8]]).all() and np.isfinite(got[2:7]).all()
    assert verify_bundle(out)["test_vectors"] == 7


def test_archive_verifies_like_the_folder_and_refuses_traversal_and_links(scorers, keys, tmp_path):
    import io
    import tarfile

    publisher, other = keys
    archive = tmp_path / "bundle.tar.gz"
    built = build_bundle(scorers[("taiwan", "scorecard")], archive, sign_key=publisher[0], archive=True)
    assert built["archive"] and archive.is_file() and not list(tmp_path.glob("moeworks-bundle-*"))
    assert verify_bundle(archive, key=publisher[1])["signature"] == "verified"
    with pytest.raises(BundleIntegrityError, match="does not verify"):
        verify_bundle(archive, key=other[1])
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}
    assert set(files) == {"model.onnx", "card.json", "test_vectors.json", "manifest.json", "model.sig"}

    def repack(name: str, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for info, data in members:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
        return path

    def plain(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        return tarfile.TarInfo(name), data

    def link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info, b""

    def folder(name: str) -> tuple[tarfile.TarInfo, bytes]:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        return info, b""

    card = bytearray(files["card.json"])
    card[10] ^= 1
    same = [plain(n, d) for n, d in files.items()]
    changed = [plain(n, bytes(card) if n == "card.json" else d) for n, d in files.items()]
    cases = {"changed.tar.gz": ("does not verify", changed),
             "traversal.tar.gz": ("plain file name", [*same, plain("../escaped.txt", b"x")]),
             "absolute.tar.gz": ("plain file name", [*same, plain(str(tmp_path / "absolute.txt"), b"x")]),
             "nested.tar.gz": ("plain file name", [*same, plain("sub/extra.txt", b"x")]),
             "symlink.tar.gz": ("link", [link("model.onnx", "/etc/passwd", tarfile.SYMTYPE)] + same[1:]),
             "hardlink.tar.gz": ("link", [*same, link("extra", "/etc/passwd", tarfile.LNKTYPE)]),
             "folder.tar.gz": ("folder", [folder("sub"), *same]),
             "twice.tar.gz": ("twice", [*same, same[0]])}
    for name, (reason, members) in cases.items():
        with pytest.raises(BundleIntegrityError, match=reason):
            verify_bundle(repack(name, members), key=publisher[1])
    assert not (tmp_path.parent / "escaped.txt").exists() and not (tmp_path / "absolute.txt").exists()
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[:len(archive.read_bytes()) // 2])
    with pytest.raises(BundleIntegrityError):
        verify_bundle(truncated)
    with pytest.raises(BundleError, match="exists"):  # never overwritten
        build_bundle(scorers[("taiwan", "scorecard")], archive, archive=True)
