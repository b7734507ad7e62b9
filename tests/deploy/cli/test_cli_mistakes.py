"""Every command, given the usual mistakes (a missing path, an empty or header-only file, another
dataset's file, a folder where a file belongs, an unreadable file, the wrong kind of model folder),
exits with code 2 and one line naming the problem, never a traceback.

Each invocation runs in-process (typer's CliRunner), so the sweep costs seconds, not a process
start per case. Commands that would start a server or a long job are only given mistakes that
must stop them before they start.
"""

import gzip
import os
import stat

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from deploy.cli import app

AI4I_HEADER = ("UDI,Product ID,Type,Air temperature [K],Process temperature [K],Rotational speed [rpm],Torque [Nm],"
               "Tool wear [min],Machine failure,TWF,HDF,PWF,OSF,RNF")
TAIWAN_HEADER = ("ID,LIMIT_BAL,SEX,EDUCATION,MARRIAGE,AGE,PAY_0,PAY_2,PAY_3,PAY_4,PAY_5,PAY_6,"
                 + ",".join(f"BILL_AMT{i}" for i in range(1, 7)) + "," + ",".join(f"PAY_AMT{i}" for i in range(1, 7))
                 + ",default.payment.next.month")
GMSC_HEADER = (",SeriousDlqin2yrs,RevolvingUtilizationOfUnsecuredLines,age,NumberOfTime30-59DaysPastDueNotWorse,"
               "DebtRatio,MonthlyIncome,NumberOfOpenCreditLinesAndLoans,NumberOfTimes90DaysLate,"
               "NumberRealEstateLoansOrLines,NumberOfTime60-89DaysPastDueNotWorse,NumberOfDependents")


def _ai4i_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    failure = (rng.random(n) < 0.2).astype(int)
    modes = {m: failure * (rng.random(n) < 0.5) for m in ("TWF", "HDF", "PWF", "OSF", "RNF")}
    return pd.DataFrame({"UDI": np.arange(1, n + 1), "Product ID": [f"M{i}" for i in range(n)],
                         "Type": rng.choice(["L", "M", "H"], n), "Air temperature [K]": 298 + rng.normal(0, 2, n),
                         "Process temperature [K]": 308 + rng.normal(0, 1, n),
                         "Rotational speed [rpm]": 1500 + rng.normal(0, 100, n).round(),
                         "Torque [Nm]": 40 + rng.normal(0, 10, n), "Tool wear [min]": rng.integers(0, 250, n),
                         "Machine failure": failure, **modes})


@pytest.fixture(scope="module")
def place(tmp_path_factory, tiny_rul_estimator):
    """Paths for every mistake, and one real model folder of each kind."""
    import torch

    from finance.data import load_generated
    from finance.generate import GeneratorConfig, generate
    from finance.scorer import train_scorer
    from manufacturing.maintenance.ai4i import AI4IFailureModel, LightGBMParams, split_rows
    from manufacturing.maintenance.generator import generate_cmapss

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mistakes")
    p = {"root": root, "missing": root / "no_such_file.csv", "empty": root / "empty.csv",
         "folder": root / "a_folder", "corrupt": root / "corrupt.csv.gz", "taiwan_header": root / "taiwan_header.csv",
         "gmsc_header": root / "gmsc_header.csv", "ai4i_header": root / "ai4i_header.csv",
         "ai4i_file": root / "ai4i_rows.csv", "taiwan_file": root / "taiwan_rows.csv",
         "empty_folder": root / "empty_folder", "out": root / "out"}
    p["empty"].write_bytes(b"")
    p["folder"].mkdir()
    (p["folder"] / "notes.txt").write_text("not data")
    p["empty_folder"].mkdir()
    p["corrupt"].write_bytes(gzip.compress(b"a,b\n1,2\n" * 1000)[:60] + b"\x00garbage")
    p["taiwan_header"].write_text(TAIWAN_HEADER + "\n")
    p["gmsc_header"].write_text(GMSC_HEADER + "\n")
    p["ai4i_header"].write_text(AI4I_HEADER + "\n")
    _ai4i_rows(40).to_csv(p["ai4i_file"], index=False)
    p["taiwan_file"].write_text(TAIWAN_HEADER + "\n" + "1," + ",".join(["1"] * 23) + ",0\n")
    records = load_generated(generate(root / "gen", GeneratorConfig(n_applicants=1_500, seed=1)))
    p["credit_model"] = train_scorer(records, "scorecard").save(root / "credit_model")
    frame = _ai4i_rows(600, seed=1)
    frame.to_csv(root / "ai4i_train.csv", index=False)
    from manufacturing.maintenance.ai4i import read_ai4i

    rows = read_ai4i(root / "ai4i_train.csv")
    train_rows, val_rows = split_rows(rows, seed=0)
    p["ai4i_model"] = root / "ai4i_model"
    AI4IFailureModel(seed=0, progress=False, max_epochs=1, lightgbm=LightGBMParams(n_estimators=5)).fit(
        train_rows, val_frame=val_rows).save(p["ai4i_model"])
    p["rul_model"] = root / "rul_model"
    tiny_rul_estimator("lstm").fit(generate_cmapss(6, seed=0)).save(p["rul_model"])
    p["cmapss_test"] = root / "test_FD001.txt"
    generate_cmapss(3, seed=2).to_csv(p["cmapss_test"], sep=" ", header=False, index=False)
    p["rul_file"] = root / "RUL_FD001.txt"
    p["rul_file"].write_text("10\n20\n30\n")
    return p


# (case id, argv with {placeholders} from `place`, the path (placeholder) the error line must name)
CASES = [
    # finance
    ("finance-train-missing", "finance train --dataset gmsc --data {missing} --out {out}/t1", "{missing}"),
    ("finance-train-empty", "finance train --dataset gmsc --data {empty} --out {out}/t2", "{empty}"),
    ("finance-train-header-only", "finance train --dataset gmsc --data {gmsc_header} --out {out}/t3", "{gmsc_header}"),
    ("finance-train-other-dataset", "finance train --dataset taiwan --data {ai4i_file} --out {out}/t4", "{ai4i_file}"),
    ("finance-train-folder", "finance train --dataset taiwan --data {folder} --out {out}/t5", "{folder}"),
    ("finance-train-corrupt", "finance train --dataset taiwan --data {corrupt} --out {out}/t6", "{corrupt}"),
    ("finance-train-out-is-file", "finance train --dataset generated --rows 500 --out {empty}", "{empty}"),
    ("finance-evaluate-missing", "finance evaluate --model {credit_model} --data {missing}", "{missing}"),
    ("finance-evaluate-empty", "finance evaluate --model {credit_model} --data {empty}", "{empty}"),
    ("finance-evaluate-header-only", "finance evaluate --model {credit_model} --data {taiwan_header}",
     "{taiwan_header}"),
    ("finance-evaluate-other-dataset", "finance evaluate --model {credit_model} --data {taiwan_file}",
     "{taiwan_file}"),
    ("finance-evaluate-corrupt", "finance evaluate --model {credit_model} --data {corrupt}", "{corrupt}"),
    ("finance-evaluate-wrong-model", "finance evaluate --model {ai4i_model} --data {taiwan_file}", "{ai4i_model}"),
    ("finance-evaluate-model-missing", "finance evaluate --model {missing} --data {taiwan_file}", "{missing}"),
    ("finance-score-missing", "finance score --model {credit_model} --input {missing} --output {out}/s1",
     "{missing}"),
    ("finance-score-empty", "finance score --model {credit_model} --input {empty} --output {out}/s2", "{empty}"),
    ("finance-score-header-only", "finance score --model {credit_model} --input {taiwan_header} --output {out}/s3",
     "{taiwan_header}"),
    ("finance-score-corrupt", "finance score --model {credit_model} --input {corrupt} --output {out}/s4",
     "{corrupt}"),
    ("finance-score-wrong-model", "finance score --model {rul_model} --input {taiwan_file} --output {out}/s5",
     "{rul_model}"),
    ("finance-score-output-is-file", "finance score --model {credit_model} --input {taiwan_file} --output {empty}",
     "{empty}"),
    ("finance-export-wrong-model", "finance export --model {folder} --out {out}/m.onnx", "{folder}"),
    ("finance-export-missing", "finance export --model {missing} --out {out}/m.onnx", "{missing}"),
    ("finance-generate-out-is-file", "finance generate --out {empty} --rows 100", "{empty}"),
    ("finance-reject-inference-missing", "finance reject-inference --data {missing}", "{missing}"),
    ("finance-reject-inference-empty-folder", "finance reject-inference --data {empty_folder}", "{empty_folder}"),
    # maintenance
    ("maintenance-train-missing", "maintenance train --data {missing} --out {out}/r1", "{missing}"),
    ("maintenance-train-empty", "maintenance train --data {empty} --out {out}/r2", "{empty}"),
    ("maintenance-train-other-dataset", "maintenance train --data {ai4i_file} --out {out}/r3", "{ai4i_file}"),
    ("maintenance-train-folder", "maintenance train --data {empty_folder} --out {out}/r4", "{empty_folder}"),
    ("maintenance-train-corrupt", "maintenance train --data {corrupt} --out {out}/r5", "{corrupt}"),
    ("maintenance-evaluate-wrong-model",
     "maintenance evaluate --model {credit_model} --test {cmapss_test} --rul {rul_file}", "{credit_model}"),
    ("maintenance-evaluate-empty", "maintenance evaluate --model {rul_model} --test {empty} --rul {rul_file}",
     "{empty}"),
    ("maintenance-evaluate-other-dataset",
     "maintenance evaluate --model {rul_model} --test {ai4i_file} --rul {rul_file}", "{ai4i_file}"),
    ("maintenance-evaluate-rul-missing",
     "maintenance evaluate --model {rul_model} --test {cmapss_test} --rul {missing}", "{missing}"),
    ("maintenance-evaluate-rul-folder",
     "maintenance evaluate --model {rul_model} --test {cmapss_test} --rul {folder}", "{folder}"),
    ("maintenance-ai4i-train-missing", "maintenance ai4i-train --data {missing} --out {out}/a1", "{missing}"),
    ("maintenance-ai4i-train-empty", "maintenance ai4i-train --data {empty} --out {out}/a2", "{empty}"),
    ("maintenance-ai4i-train-header-only", "maintenance ai4i-train --data {ai4i_header} --out {out}/a3",
     "{ai4i_header}"),
    ("maintenance-ai4i-train-other-dataset", "maintenance ai4i-train --data {taiwan_file} --out {out}/a4",
     "{taiwan_file}"),
    ("maintenance-ai4i-train-folder", "maintenance ai4i-train --data {folder} --out {out}/a5", "{folder}"),
    ("maintenance-ai4i-train-corrupt", "maintenance ai4i-train --data {corrupt} --out {out}/a6", "{corrupt}"),
    ("maintenance-ai4i-evaluate-wrong-model", "maintenance ai4i-evaluate --model {rul_model} --data {ai4i_file}",
     "{rul_model}"),
    ("maintenance-ai4i-evaluate-header-only",
     "maintenance ai4i-evaluate --model {ai4i_model} --data {ai4i_header}", "{ai4i_header}"),
    ("maintenance-ai4i-evaluate-empty", "maintenance ai4i-evaluate --model {ai4i_model} --data {empty}", "{empty}"),
    ("maintenance-ai4i-evaluate-other-dataset",
     "maintenance ai4i-evaluate --model {ai4i_model} --data {taiwan_file}", "{taiwan_file}"),
    ("maintenance-export-wrong-model", "maintenance export --model {credit_model} --out {out}/x", "{credit_model}"),
    ("maintenance-export-missing", "maintenance export --model {missing} --out {out}/x", "{missing}"),
    # defects
    ("defects-train-missing", "defects train --data {missing} --out {out}/d1", "{missing}"),
    ("defects-train-empty-folder", "defects train --data {empty_folder} --out {out}/d2", "{empty_folder}"),
    ("defects-train-file", "defects train --data {empty} --out {out}/d3", "{empty}"),
    ("defects-evaluate-empty-folder", "defects evaluate --data {empty_folder} --model {missing}", "{empty_folder}"),
    ("defects-predict-model-empty", "defects predict --source {empty_folder} --model {empty}", "{empty}"),
    ("defects-predict-model-folder", "defects predict --source {empty_folder} --model {credit_model}",
     "{credit_model}"),
    ("defects-export-model-missing", "defects export --model {missing} --data {empty_folder} --out {out}/d4",
     "{missing}"),
    # twin
    ("twin-serve-plant-missing", "twin serve --plant {missing}", "{missing}"),
    ("twin-serve-plant-empty", "twin serve --plant {empty}", "{empty}"),
    ("twin-serve-plant-folder", "twin serve --plant {folder}", "{folder}"),
    ("twin-etl-db-folder", "twin etl --db {folder} --out {out}/e1", "{folder}"),
    ("twin-etl-db-empty-text", "twin etl --db {ai4i_file} --out {out}/e2", "{ai4i_file}"),
    # edge
    ("edge-run-data-missing", "edge run --source ai4i --data {missing} --max-messages 1", "{missing}"),
    ("edge-run-onnx-empty", "edge run --onnx {empty} --max-messages 1", "{empty}"),
    ("edge-quantize-missing", "edge quantize --model {missing} --out {out}/q.onnx", "{missing}"),
    ("edge-quantize-empty", "edge quantize --model {empty} --out {out}/q.onnx", "{empty}"),
    ("edge-quantize-folder", "edge quantize --model {folder} --out {out}/q.onnx", "{folder}"),
    # serve
    ("serve-missing", "serve {missing}", "{missing}"),
    ("serve-folder", "serve {folder}", "{folder}"),
    # auth
    ("auth-token-file-is-folder", "auth token --role viewer --file {folder}", "{folder}"),
    ("auth-revoke-missing-file", "auth revoke 0123456789abcdef --file {missing}", "{missing}"),
    ("auth-revoke-corrupt-file", "auth revoke 0123456789abcdef --file {ai4i_file}", "{ai4i_file}"),
    # data check
    ("data-check-missing", "data check --dataset taiwan --data {missing} --out {out}/q1", "{missing}"),
    ("data-check-empty", "data check --dataset gmsc --data {empty} --out {out}/q2", "{empty}"),
    ("data-check-header-only", "data check --dataset gmsc --data {gmsc_header} --out {out}/q3", "{gmsc_header}"),
    ("data-check-other-dataset", "data check --dataset taiwan --data {ai4i_file} --out {out}/q4", "{ai4i_file}"),
    ("data-check-ai4i-other-dataset", "data check --dataset ai4i --data {taiwan_file} --out {out}/q5",
     "{taiwan_file}"),
    ("data-check-corrupt", "data check --dataset taiwan --data {corrupt} --out {out}/q6", "{corrupt}"),
    ("data-check-cmapss-other-dataset", "data check --dataset cmapss --data {ai4i_file} --out {out}/q7",
     "{ai4i_file}"),
    ("data-check-images-file", "data check --dataset neu_det --data {empty} --out {out}/q8", "{empty}"),
    ("data-check-out-is-file", "data check --dataset taiwan --data {taiwan_file} --out {empty}", "{empty}"),
    ("data-check-wrong-model", "data check --dataset neu_det --data {empty_folder} --model {credit_model} "
     "--out {out}/q9", "{credit_model}"),
    # demo
    ("demo-out-is-file", "demo --quick --out {empty}", "{empty}"),
    # the current grammar (the cases above keep the previous release's names, which still work)
    ("grammar-finance-score-data-missing", "finance score --model {credit_model} --data {missing} --out {out}/s6 "
     "--json", "{missing}"),
    ("grammar-finance-export-json", "finance export --model {folder} --out {out}/m2.onnx --json", "{folder}"),
    ("grammar-maintenance-train-unknown-kind", "maintenance train --generated --kind gru --out {out}/r6", "gru"),
    ("grammar-maintenance-evaluate-data-empty",
     "maintenance evaluate --model {rul_model} --data {empty} --rul {rul_file} --json", "{empty}"),
    ("grammar-defects-predict-data", "defects predict --data {empty_folder} --model {empty} --json", "{empty}"),
    ("grammar-serve-model-missing", "serve --model {missing}", "{missing}"),
    ("grammar-serve-without-model", "serve", "--model"),
    ("grammar-not-a-number", "finance score --model {credit_model} --data {taiwan_file} --out {out}/s7 "
     "--chunk-rows many", "--chunk-rows"),
    ("grammar-unknown-command", "finance scroe --model {credit_model}", "scroe"),
    ("grammar-edge-run-unknown-kind", "edge run --kind lathe --max-messages 1 --json", "lathe"),
    ("grammar-edge-quantize-json", "edge quantize --model {folder} --out {out}/q2.onnx --json", "{folder}"),
    ("grammar-auth-token-json", "auth token --role viewer --file {folder} --json", "{folder}"),
    ("grammar-quiet-keeps-the-error", "--quiet finance evaluate --model {credit_model} --data {empty}", "{empty}"),
]


@pytest.mark.parametrize(("argv", "named"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_users_mistake_is_one_line_and_exit_code_2(place, argv, named):
    args = [part.format(**place) for part in argv.split()]
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    shown = f"{args}\nexit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), shown
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output, shown
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors and errors[-1].startswith("error: "), shown
    assert sum(line.startswith("error:") for line in errors) == 1, shown
    assert os.path.basename(named.format(**place)) in errors[-1], shown


def test_an_unreadable_file_is_one_line_when_not_root(place, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads a file whatever its mode (the corrupt-gzip and folder cases cover unreadable input)")
    locked = tmp_path / "locked.csv"
    locked.write_text(TAIWAN_HEADER + "\n")
    locked.chmod(0)
    try:
        result = CliRunner().invoke(app, ["finance", "evaluate", "--model", str(place["credit_model"]), "--data",
                                          str(locked)])
    finally:
        locked.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "permission denied" in result.stderr.lower()
