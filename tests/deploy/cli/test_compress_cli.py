"""`moeworks compress distill|prune|hash` end to end on generated C-MAPSS files: each result is a
sealed RUL model folder that evaluate and export take; folders it cannot compress are refused."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from core.model_files import verify_manifest
from deploy.cli import app
from manufacturing.maintenance.rul import RULEstimator

pytestmark = pytest.mark.slow  # five trainings and three ONNX exports: about a minute

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(map(str, args)))


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Generated data and a one-epoch LSTM and single-net MoE RUL model trained on it."""
    root = tmp_path_factory.mktemp("compress")
    result = invoke("maintenance", "generate", "--out", root / "data", "--train-units", 16, "--test-units", 6)
    assert result.exit_code == 0, result.output
    for kind in ("lstm", "moe"):
        result = invoke("maintenance", "train", "--data", root / "data", "--kind", kind, "--members", 1,
                        "--epochs", 1, "--windows-per-epoch", 256, "--cuts", 1, "--out", root / kind, "--json")
        assert result.exit_code == 0, result.output
    return root


def evaluate_and_export(root, folder, kind):
    verify_manifest(folder)
    result = invoke("maintenance", "evaluate", "--model", folder, "--data", root / "data" / "test_FD001.txt",
                    "--rul", root / "data" / "RUL_FD001.txt", "--json")
    assert result.exit_code == 0, result.output
    assert last_json(result.output)["engines"] == 6
    result = invoke("maintenance", "export", "--model", folder, "--out", folder.parent / f"{folder.name}_onnx",
                    "--data", root / "data" / "test_FD001.txt")
    assert result.exit_code == 0, result.output
    assert float(result.output.strip().split("= ")[-1]) < 1e-3
    assert (folder.parent / f"{folder.name}_onnx" / f"rul_{kind}.onnx").is_file()


def compress(root, method, source, *options):
    out = root / f"{source}_{method}"
    result = invoke("compress", method, "--model", root / source, "--out", out, "--data", root / "data",
                    "--epochs", 1, *options, "--json")
    assert result.exit_code == 0, result.output
    return out, last_json(result.output)


def test_distill_the_moe_into_a_small_lstm(trained):
    out, metrics = compress(trained, "distill", "moe", "--hidden", 8)
    assert metrics["method"] == "distill" and metrics["kind"] == "lstm" and metrics["val_rmse"] > 0
    assert metrics["parameters"] < 0.05 * metrics["source_parameters"]
    student = RULEstimator.load(out)
    assert student.net_.hidden_size == 8 and student.metadata_["compression"]["teacher_kind"] == "moe"
    evaluate_and_export(trained, out, "lstm")


def test_prune_lstm_channels(trained):
    out, metrics = compress(trained, "prune", "lstm", "--ratio", 0.5, "--l1-epochs", 1, "--steps", 2)
    pruned = RULEstimator.load(out)
    assert pruned.net_.hidden_size == 32 and pruned.net_.head_hidden == 16  # two steps, the one-step widths
    assert pruned.metadata_["compression"]["steps"] == 2
    assert len(pruned.metadata_["epochs_run"]) == 3  # L1 training, fine-tuning after step 1, after step 2
    assert metrics["parameters"] < 0.5 * metrics["source_parameters"]
    assert (out / "model.pt").stat().st_size < 0.5 * (trained / "lstm" / "model.pt").stat().st_size
    evaluate_and_export(trained, out, "lstm")


def test_prune_experts_and_hash_experts(trained):
    out, metrics = compress(trained, "prune", "moe", "--keep-experts", 4)
    pruned = RULEstimator.load(out)
    assert pruned.net_.moe.num_experts == 4
    assert pruned.model_.blocks[0].moe.router.gate.weight.shape[0] == 4
    assert len(pruned.metadata_["compression"]["routing"]["0"]["blocks.0.moe"]["kept"]) == 4
    evaluate_and_export(trained, out, "moe")
    out, metrics = compress(trained, "hash", "moe", "--compression", 8)
    hashed = RULEstimator.load(out)
    details = hashed.metadata_["compression"]
    assert details["virtual_weights"] == 2 * 8 * 64 * 128
    assert details["hashed_values"] == details["virtual_weights"] // 8
    assert metrics["parameters"] == metrics["source_parameters"] - details["virtual_weights"] + details["hashed_values"]
    evaluate_and_export(trained, out, "moe")
    result = invoke("compress", "hash", "--model", out, "--out", trained / "twice", "--data", trained / "data")
    assert result.exit_code == 2 and "already hashed" in result.output


def test_unsupported_folders_and_bad_options_are_one_line_exit_2(trained, tmp_path):
    (tmp_path / "credit").mkdir()
    (tmp_path / "credit" / "model.json").write_text(json.dumps({"kind": "credit"}))
    data = trained / "data"
    cases = [
        ("distill", "--model", tmp_path / "credit", "--out", tmp_path / "o1", "--data", trained / "data"),
        ("distill", "--model", tmp_path / "none", "--out", tmp_path / "o2", "--data", trained / "data"),
        ("prune", "--model", trained / "lstm", "--out", trained / "lstm", "--data", trained / "data"),
        ("prune", "--model", trained / "lstm", "--out", tmp_path / "o3", "--data", data, "--ratio", 1.5),
        ("hash", "--model", trained / "lstm", "--out", tmp_path / "o4", "--data", data, "--compression", 0.5),
        ("distill", "--model", trained / "lstm", "--out", tmp_path / "o5", "--data", trained / "data", "--alpha", 2),
    ]
    for case in cases:
        result = invoke("compress", *case)
        assert result.exit_code == 2, (case, result.output)
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    result = invoke("compress", "distill", "--model", trained / "lstm", "--out", tmp_path / "full", "--data", data)
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_a_hashed_lstm_folder_is_served_like_any_rul_folder(trained):
    """`serve` takes the compressed folder as it is: the hashed weights run in the server's model."""
    from fastapi.testclient import TestClient

    from deploy.serving.app import create_app
    from deploy.serving.batcher import BatcherConfig
    from deploy.serving.registry import REGISTRY
    from manufacturing.maintenance.cmapss import read_cmapss

    out, _ = compress(trained, "hash", "lstm", "--compression", 4)
    estimator = RULEstimator.load(out)
    assert estimator.net_.hashed_compression == 4
    test = read_cmapss(trained / "data" / "test_FD001.txt")
    expected = estimator.predict(test)["rul"].to_numpy()
    columns = ["setting_1", "setting_2", "setting_3", *estimator.normalizer_.sensors_]
    instances = [{"cycles": group[columns].to_numpy()[-estimator.net_.window:].tolist()}
                 for _, group in test.groupby("unit", sort=True)]
    adapter = REGISTRY.from_path(out)
    with TestClient(create_app(lambda: adapter, batcher_config=BatcherConfig(max_wait_s=0.005))) as client:
        answers = [client.post("/v1/predict", json={"instances": [i]}) for i in instances]
    got = [a.json()["predictions"][0]["rul"] for a in answers]
    assert got == pytest.approx(expected.tolist(), abs=1e-3)


def test_a_folder_whose_compression_fields_were_rewritten_is_refused(trained, tmp_path):
    """Someone re-seals a folder with an impossible hashing factor: the loader says so in one line."""
    import shutil

    import torch

    from core.model_files import write_manifest
    from core.trainer import read_checkpoint

    folder = tmp_path / "tampered"
    shutil.copytree(trained / "lstm", folder)
    payload = read_checkpoint(folder / "model.pt")
    payload["metadata"]["config"]["hashed_compression"] = 0.25
    torch.save(payload, folder / "model.pt")
    write_manifest(folder)
    result = invoke("maintenance", "evaluate", "--model", folder, "--data", trained / "data" / "test_FD001.txt",
                    "--rul", trained / "data" / "RUL_FD001.txt")
    assert result.exit_code == 2 and "hashed_compression must be in [1, 1024]" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tabular(tmp_path_factory):
    """A generated credit MoE and a generated AI4I model (LightGBM + MoE), each trained briefly."""
    from manufacturing.maintenance.ai4i import generate_ai4i

    root = tmp_path_factory.mktemp("tabular")
    result = invoke("finance", "train", "--dataset", "generated", "--kind", "moe", "--rows", 3000, "--out",
                    root / "credit", "--json")
    assert result.exit_code == 0, result.output
    generate_ai4i(1500, seed=2).to_csv(root / "ai4i.csv", index=False)
    result = invoke("maintenance", "ai4i-train", "--data", root / "ai4i.csv", "--out", root / "ai4i", "--epochs", 3,
                    "--trees", 50, "--json")
    assert result.exit_code == 0, result.output
    return root


def test_credit_folders_distill_prune_and_hash_into_normal_credit_folders(tabular, tmp_path):
    from finance.scorer import load_model

    data = tabular / "credit" / "generated-data"
    source = load_model(tabular / "credit")
    source_net = sum(p.numel() for p in source.model_.module_.net.parameters())
    cases = {"distill": ("--experts", 2, "--hidden", 16), "prune": ("--keep-experts", 4),
             "hash": ("--compression", 8)}
    for method, options in cases.items():
        out = tmp_path / method
        result = invoke("compress", method, "--model", tabular / "credit", "--data", data, "--out", out,
                        "--epochs", 2, *options, "--json")
        assert result.exit_code == 0, result.output
        metrics = last_json(result.output)
        assert metrics["kind"] == "credit" and metrics["valid_rows"] == 600 and 0.5 < metrics["auc"] <= 1
        verify_manifest(out)
        scorer = load_model(out)  # the usual loader
        assert scorer.model_name == "moe" and json.loads((out / "compression.json").read_text())["method"] == method
        net = scorer.model_.module_.net
        if method == "distill":
            assert (net.config.moe.num_experts, net.config.moe.hidden_size) == (2, 16)
        elif method == "prune":
            assert net.config.moe.num_experts == 4 and net.layers[0].router.gate.weight.shape[0] == 4
        else:
            assert scorer.model_.config_.hashed_compression == 8
            assert metrics["hashed_values"] * 8 == metrics["virtual_weights"]
            result = invoke("finance", "adapt", "--model", out, "--data", data, "--out", tmp_path / "adapted")
            assert result.exit_code == 2 and "hashed" in result.output  # LoRA needs the dense network
            assert len(result.output.strip().splitlines()) == 1
        assert metrics["parameters"] == sum(p.numel() for p in net.parameters()) < source_net
        from deploy.serving.registry import REGISTRY

        adapter = REGISTRY.from_path(out)  # what `serve --model` loads
        assert type(adapter).__name__ == type(REGISTRY.from_path(tabular / "credit")).__name__
        result = invoke("finance", "evaluate", "--model", out, "--data", data, "--no-speed", "--json")
        assert result.exit_code == 0, result.output
        assert last_json(result.output)["auc"] > 0.5
        result = invoke("finance", "export", "--model", out, "--out", tmp_path / f"{method}.onnx")
        assert result.exit_code == 0, result.output
        import onnxruntime

        rows = scorer.features(scorer_rows(data)).X[:64]
        onnx = onnxruntime.InferenceSession(str(tmp_path / f"{method}.onnx")).run(None, {"features": rows})[0][:, 0]
        np.testing.assert_allclose(onnx, scorer.model_.predict_proba(rows)[:, 1], atol=1e-5)


def scorer_rows(data):
    from finance.data import load_records

    return load_records("generated", data).frame


def test_ai4i_folders_compress_their_moe_backend_into_normal_ai4i_folders(tabular, tmp_path):
    from manufacturing.maintenance.ai4i import AI4IFailureModel

    source = AI4IFailureModel.load(tabular / "ai4i")
    for method, options in {"distill": ("--experts", 2, "--hidden", 8), "prune": ("--keep-experts", 8),
                            "hash": ("--compression", 8)}.items():
        out = tmp_path / method
        result = invoke("compress", method, "--model", tabular / "ai4i", "--data", tabular / "ai4i.csv", "--out", out,
                        "--epochs", 2, *options, "--json")
        assert result.exit_code == 0, result.output
        metrics = last_json(result.output)
        assert metrics["kind"] == "ai4i" and metrics["rows"] == 300 and metrics["parameters"] < metrics[
            "source_parameters"]
        model = AI4IFailureModel.load(out)  # the usual loader
        assert model.metrics_["compression"]["method"] == method
        assert (out / "row_fingerprint.json").is_file() or not (tabular / "ai4i" / "row_fingerprint.json").is_file()
        for name in source.boosters_:  # the LightGBM backend is carried over unchanged
            assert (out / f"lightgbm_{name}.txt").read_text() == (tabular / "ai4i" / f"lightgbm_{name}.txt").read_text()
        if method == "hash":
            assert model.moe_config_.hashed_compression == 8
            result = invoke("bundle", "build", "--model", out, "--out", tmp_path / "bundle", "--backend", "moe",
                            "--training-data", tabular / "ai4i.csv")
            assert result.exit_code == 0, result.output  # the graph reproduced the hashed model's outputs
        result = invoke("maintenance", "ai4i-evaluate", "--model", out, "--data", tabular / "ai4i.csv", "--json")
        assert result.exit_code == 0, result.output
        result = invoke("maintenance", "export", "--model", out, "--out", tmp_path / f"{method}_onnx")
        assert result.exit_code == 0, result.output
        assert float(result.output.split("ai4i_moe.onnx: max |framework - onnxruntime| = ")[1].split()[0]) < 1e-4


def test_tabular_refusals_are_one_line_exit_2(tabular, tmp_path):
    (tmp_path / "detector").mkdir()
    (tmp_path / "detector" / "detector.pt").write_bytes(b"not a model")
    data = tabular / "credit" / "generated-data"
    cases = [
        # a detector folder is pruned (tests/deploy/cli/test_compress_detector_cli.py), never distilled
        (("distill", "--model", tmp_path / "detector", "--out", tmp_path / "o1"), "takes `compress prune`"),
        (("prune", "--model", tabular / "credit", "--out", tmp_path / "o2", "--data", data, "--subset", "FD001"),
         "--subset"),
        (("prune", "--model", tabular / "credit", "--out", tmp_path / "o3", "--data", data, "--keep-experts", 16),
         "keep-experts"),
        (("hash", "--model", tabular / "credit", "--out", tmp_path / "o4", "--data", data, "--teacher",
          tabular / "ai4i"), "give a credit model folder"),
        (("hash", "--model", tabular / "ai4i", "--out", tmp_path / "o5", "--data", tabular / "ai4i.csv",
          "--compression", 0.5), "compression"),
        (("distill", "--model", tabular / "ai4i", "--out", tmp_path / "o6", "--data", tabular / "ai4i.csv",
          "--experts", 0), "--experts"),
        (("prune", "--model", tabular / "credit", "--out", tmp_path / "o7"), "--data"),
    ]
    for args, says in cases:
        result = invoke("compress", *args)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and says in result.output, result.output
        assert not (tmp_path / args[4].name).exists() or not any((tmp_path / args[4].name).iterdir())
