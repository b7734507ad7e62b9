"""Partner bundles against moeworks' own scoring of the same model, in the same run.

For each (dataset, model): train the model on the full real data (or load `--models-dir/<dataset>-<model>`
when there), build its bundle, then on every row of the dataset's file measure
- parity: max |PD bundle - PD `finance.load_model(dir).score`|, decisions and reason codes that differ
  (in order, and as sets);
- bundle size (model.onnx and the whole folder), graph nodes, session load time;
- throughput in rows/s at batch 1 (the first `--single-rows` rows one by one) and batch 4,096, for
  onnxruntime (1 intra-op thread, as LightGBM's own config) and for `score(frame, reasons="all")`,
  interleaved, median of `--repeats`.

With `--baseline-moe REV`, each credit case with the MoE network is measured twice in the same run:
first with the MoE graph of git revision REV (`deploy/bundle/moe_graph.py` read with `git show`,
its `moe_head` swapped in), then with the working tree's: before/after ratios from one process.

    nice python -m benchmarks.bundles --data ../shared/data --models-dir /tmp/bundles --json
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.common import add_output_arguments, describe, machine, time_calls, write_results
from benchmarks.fixtures import CREDIT_FOLDERS, add_data_argument


def _configs() -> dict:
    import dataclasses

    from finance.models.ensemble import EnsembleConfig
    from finance.models.gbdt import LightGBMConfig
    from finance.models.moe import MoEModelConfig
    from finance.sequence import SequenceTrainingConfig
    from finance.sequence.credit_model import SequenceModelConfig

    training = SequenceTrainingConfig()
    return {"lightgbm": LightGBMConfig(max_rounds=400),  # bounded training time
            "moe": MoEModelConfig(max_epochs=6),  # the default network, fewer epochs: bounded training time
            "ensemble": EnsembleConfig(members=["lightgbm", "scorecard"], cross_fit=False),
            # the default Transformer, fewer epochs: bounded training time
            "sequence": SequenceModelConfig(training=dataclasses.replace(
                training, trainer=dataclasses.replace(training.trainer, max_epochs=4)))}


def _moe_ensemble(records, models_dir: Path):
    """The default ensemble (LightGBM, MoE, scorecard) blended by `EnsembleModel.from_fitted` on the
    validation split (no cross-fitting), its LightGBM and MoE the ones benchmarked alone (the same
    split and features: `train_scorer`'s seeded split)."""
    from finance import load_model
    from finance.models.base import build_model
    from finance.models.ensemble import EnsembleModel
    from finance.scorer import CreditScorer, split_records

    train, valid = split_records(records)
    loaded = [load_model(_model(records.dataset, n, records, models_dir)) for n in ("lightgbm", "moe")]
    pipeline = loaded[0].pipeline_
    assert loaded[1].pipeline_.feature_names_ == pipeline.feature_names_, "the members' features differ"
    X_train, X_valid = pipeline.transform(train.frame), pipeline.transform(valid.frame)
    scorecard = build_model("scorecard", feature_names=pipeline.feature_names_, dataset=records.dataset)
    members = [s.model_ for s in loaded] + [scorecard.fit(X_train, train.target)]
    model = EnsembleModel.from_fitted(members, X_valid, valid.target, feature_names=pipeline.feature_names_,
                                      dataset=records.dataset)
    return CreditScorer(dataset=records.dataset, model_name="ensemble").fit(*train.xy, eval_set=[valid.xy],
                                                                            fitted_model=model)


def _model(dataset: str, name: str, records, models_dir: Path) -> Path:
    from finance.scorer import train_scorer

    folder = models_dir / f"{dataset}-{name}"
    if not (folder / "scorer.json").is_file():
        scorer = (_moe_ensemble(records, models_dir) if name == "moe-ensemble" else
                  train_scorer(records, name, model_config=_configs().get(name)))
        scorer.save(folder)
    return folder


class _EarlierNames:
    """A fitted credit model as revisions before the estimator API (c1ad257) read it: their `moe_head`
    reads `model.config`, now `config_`; every other attribute is the model's own."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, "config_" if name == "config" else name)


@contextlib.contextmanager
def _moe_graph_of(revision: str | None):
    """Inside: credit bundles get the MoE graph (`moe_head`) of git revision `revision` (None: this tree's)."""
    import deploy.bundle.credit_graph as credit_graph

    if revision is None:
        yield
        return
    source = subprocess.run(["git", "show", f"{revision}:deploy/bundle/moe_graph.py"], capture_output=True,
                            text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    module = types.ModuleType(f"moe_graph_{revision}")
    exec(compile(source, f"{revision}:deploy/bundle/moe_graph.py", "exec"), module.__dict__)  # our own history
    current = credit_graph.moe_head
    credit_graph.moe_head = lambda g, x, model: module.moe_head(g, x, _EarlierNames(model))
    try:
        yield
    finally:
        credit_graph.moe_head = current


def _onnx_against_moeworks(*, onnx_batch, moeworks_batch, onnx_single, moeworks_single, batch_rows: int,
                           single_rows: int, repeats: int) -> dict:
    """Rows/s of the bundle in onnxruntime and of moeworks' own scoring, on one batch of `batch_rows`
    and on `single_rows` rows one by one (each call's median over `repeats`, interleaved in this order),
    and the ratios onnx / moeworks."""
    calls = {"onnx_batch": onnx_batch, "moeworks_batch": moeworks_batch, "onnx_single": onnx_single,
             "moeworks_single": moeworks_single}
    seconds = {name: time_calls(lambda _, call=call: call(), repeats=repeats).median_s for name, call in calls.items()}
    throughput = {"onnx_rows_s_4096": batch_rows / seconds["onnx_batch"],
                  "moeworks_rows_s_4096": batch_rows / seconds["moeworks_batch"],
                  "onnx_rows_s_1": single_rows / seconds["onnx_single"],
                  "moeworks_rows_s_1": single_rows / seconds["moeworks_single"]}
    throughput["ratio_4096"] = throughput["onnx_rows_s_4096"] / throughput["moeworks_rows_s_4096"]
    throughput["ratio_1"] = throughput["onnx_rows_s_1"] / throughput["moeworks_rows_s_1"]
    return throughput


def _build_and_open(folder: Path, out: Path, **options):
    """(bundle folder, onnxruntime session on 1 thread, build seconds, load seconds) of one model folder."""
    import onnxruntime as ort

    from deploy.bundle.build import build_bundle

    started = time.perf_counter()
    bundle = Path(build_bundle(folder, out, **options)["bundle"])
    build_seconds = time.perf_counter() - started
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = 1
    started = time.perf_counter()
    session = ort.InferenceSession(str(bundle / "model.onnx"), session_options, providers=["CPUExecutionProvider"])
    return bundle, session, build_seconds, time.perf_counter() - started


def measure(dataset: str, name: str, data_root: Path, models_dir: Path, work: Path, *, single_rows: int,
            repeats: int, parity_rows: int | None = None, batch_rows: int = 4096) -> dict:
    import pandas
    import torch

    from finance import load_model
    from finance.data import dataset_spec, load_records

    records = load_records(dataset, data_root / CREDIT_FOLDERS[dataset])
    folder = _model(dataset, name, records, models_dir)
    threads = torch.get_num_threads()
    scorer = load_model(folder)
    bundle, session, build_seconds, load_seconds = _build_and_open(folder, work / f"{dataset}-{name}")
    fields = dataset_spec(dataset).field_names
    frame = records.frame
    columns = {f: frame[f].to_numpy(np.float64, na_value=np.nan).reshape(-1, 1) for f in fields}

    def feeds(start: int, stop: int) -> dict:
        return {f: v[start:stop] for f, v in columns.items()}

    # parity on every row (or the first `parity_rows`), in blocks of `batch_rows` (what a partner's batch
    # job would send; moeworks scores the same blocks: the sequence model's occlusion reasons stack each
    # block 1 + fields times, and 4,096 rows of it outgrew this machine's 24 GiB)
    checked = frame.iloc[:parity_rows]
    pd_parts, decision_parts, reason_parts, expected_parts = [], [], [], []
    for start in range(0, len(checked), batch_rows):
        pd_, _, decision, reasons = session.run(None, feeds(start, min(start + batch_rows, len(checked))))
        pd_parts.append(pd_[:, 0]), decision_parts.append(decision[:, 0]), reason_parts.append(reasons)
        expected_parts.append(scorer.score(checked.iloc[start:start + batch_rows], reasons="all"))
    expected = pandas.concat(expected_parts)
    names = np.array([*scorer.pipeline_.feature_names_, ""], dtype=object)
    reasons = np.concatenate(reason_parts)
    codes = np.array(["|".join(names[r[r >= 0]]) for r in reasons], dtype=object)
    got_pd = np.concatenate(pd_parts)
    parity = {"rows": len(checked), "pd_max_abs_error": float(np.max(np.abs(got_pd - expected["pd"].to_numpy()))),
              "decisions_differing": int(((np.concatenate(decision_parts) == 1)
                                          != (expected["decision"] == "decline").to_numpy()).sum()),
              "reason_codes_differing": int((codes != expected["reason_codes"].to_numpy()).sum()),
              # the same k reasons, maybe in another order
              "reason_sets_differing": int(sum(set(a.split("|")) != set(b.split("|"))
                                               for a, b in zip(codes, expected["reason_codes"], strict=True)))}

    block = frame.iloc[:batch_rows]
    single = [frame.iloc[i:i + 1] for i in range(single_rows)]
    torch.set_num_threads(1)  # moeworks' MoE network on one thread, as onnxruntime and LightGBM here
    throughput = _onnx_against_moeworks(
        onnx_batch=lambda: session.run(None, feeds(0, batch_rows)),
        moeworks_batch=lambda: scorer.score(block, reasons="all"),
        onnx_single=lambda: [session.run(None, feeds(i, i + 1)) for i in range(single_rows)],
        moeworks_single=lambda: [scorer.score(r, reasons="all") for r in single],
        batch_rows=batch_rows, single_rows=single_rows, repeats=repeats)
    torch.set_num_threads(threads)
    card_ops = sorted({n.op_type for n in __import__("onnx").load(str(bundle / "model.onnx")).graph.node})
    return {"dataset": dataset, "model": name, "parity": parity, "throughput": throughput, "batch_rows": batch_rows,
            "model_onnx_bytes": (bundle / "model.onnx").stat().st_size,
            "bundle_bytes": sum(p.stat().st_size for p in bundle.iterdir()),
            "graph_nodes": len(__import__("onnx").load(str(bundle / "model.onnx")).graph.node),
            "graph_operators": card_ops, "build_seconds": build_seconds, "load_seconds": load_seconds}


def _rul_model(kind: str, subset: str, frame, models_dir: Path) -> Path:
    from manufacturing.maintenance.cmapss import SUBSET_REGIMES
    from manufacturing.maintenance.models import default_net_config
    from manufacturing.maintenance.rul import RULEstimator, default_feature_config, default_train_config

    folder = models_dir / f"rul-{kind}-{subset}"
    if not (folder / "model.pt").is_file():
        RULEstimator(net=default_net_config(kind), features=default_feature_config(kind, SUBSET_REGIMES[subset]),
                     train=default_train_config(kind, max_epochs=3, progress=False)).fit(frame).save(folder)
    return folder


def _engine_feeds(frame, fields: list[str]) -> dict:
    """(engines, cycles) per field, shorter engines padded at the front with NaN (the card's layout)."""
    units, index = np.unique(frame["unit"].to_numpy(), return_inverse=True)
    sizes = np.bincount(index)
    position = np.concatenate([np.arange(n) + sizes.max() - n for n in sizes])  # rows sorted by unit, cycle
    out = {}
    for name in fields:
        array = np.full((len(units), sizes.max()), np.nan)
        array[index, position] = frame[name].to_numpy(np.float64)
        out[name] = array
    return out


def measure_rul(kind: str, subset: str, data_root: Path, models_dir: Path, work: Path, *, repeats: int) -> dict:
    """A RUL model's bundle against `RULEstimator.predict` on every engine of a C-MAPSS file: at its
    last cycle, and cut at a seeded random cycle as test files cut them."""
    import onnx
    import pandas as pd
    import torch

    from deploy.bundle.rul_graph import rul_fields
    from manufacturing.maintenance.cmapss import read_cmapss
    from manufacturing.maintenance.rul import RULEstimator

    frame = read_cmapss(data_root / "cmapss" / f"train_{subset}.txt.gz")
    folder = _rul_model(kind, subset, frame, models_dir)
    estimator = RULEstimator.load(folder)
    bundle, session, build_seconds, load_seconds = _build_and_open(folder, work / f"rul-{kind}-{subset}")
    rng = np.random.default_rng(0)
    position = frame.groupby("unit").cumcount().to_numpy()  # rows sorted by unit, then cycle
    sizes = frame.groupby("unit").size()
    keep = pd.Series(rng.integers(1, sizes.to_numpy() + 1), index=sizes.index)  # cycles kept per engine
    cut = frame[position < frame["unit"].map(keep).to_numpy()]
    fields = rul_fields(estimator)
    errors = []
    for rows in (frame, cut):
        got = session.run(None, _engine_feeds(rows, fields))[0][:, 0]
        errors.append(float(np.max(np.abs(got - estimator.predict(rows)["rul"].to_numpy()))))
    feeds = _engine_feeds(frame, fields)
    engines = len(feeds[fields[0]])
    units = list(dict.fromkeys(frame["unit"]))[:20]
    singles = [frame[frame["unit"] == u] for u in units]
    single_feeds = [_engine_feeds(r, fields) for r in singles]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    throughput = _onnx_against_moeworks(
        onnx_batch=lambda: session.run(None, feeds), moeworks_batch=lambda: estimator.predict(frame),
        onnx_single=lambda: [session.run(None, f) for f in single_feeds],
        moeworks_single=lambda: [estimator.predict(r) for r in singles],
        batch_rows=engines, single_rows=len(units), repeats=repeats)
    torch.set_num_threads(threads)
    proto = onnx.load(str(bundle / "model.onnx"))
    return {"dataset": f"cmapss {subset}", "model": f"rul-{kind}",
            "parity": {"rows": f"{engines} engines whole + cut", "pd_max_abs_error": max(errors),
                       "rul_max_abs_error_whole": errors[0], "rul_max_abs_error_cut": errors[1],
                       "decisions_differing": None, "reason_codes_differing": None},
            "throughput": throughput, "throughput_unit": "engines/s (batch: every engine of the file at once)",
            "model_onnx_bytes": (bundle / "model.onnx").stat().st_size,
            "bundle_bytes": sum(p.stat().st_size for p in bundle.iterdir()), "graph_nodes": len(proto.graph.node),
            "graph_operators": sorted({n.op_type for n in proto.graph.node}), "build_seconds": build_seconds,
            "load_seconds": load_seconds}


def measure_ai4i(data_root: Path, models_dir: Path, work: Path, *, single_rows: int, repeats: int,
                 backend: str = "lightgbm") -> dict:
    """The AI4I failure model's bundle of one backend against that backend (`predict_proba`)."""
    import onnx
    import torch

    from manufacturing.maintenance.ai4i import NUMERIC_INPUTS, OUTPUTS, AI4IFailureModel, read_ai4i

    frame = read_ai4i(data_root / "ai4i2020")
    folder = models_dir / "ai4i"
    if not (folder / "ai4i.json").is_file():
        AI4IFailureModel(progress=False, max_epochs=5).fit(frame).save(folder)
    model = AI4IFailureModel.load(folder)
    bundle, session, build_seconds, load_seconds = _build_and_open(folder, work / f"ai4i-{backend}", backend=backend)
    columns = {"Type": frame["Type"].astype(str).to_numpy(object).reshape(-1, 1),
               **{n: frame[n].to_numpy(np.float64).reshape(-1, 1) for n in NUMERIC_INPUTS}}

    def feeds(start: int, stop: int) -> dict:
        return {f: v[start:stop] for f, v in columns.items()}

    got = np.column_stack([o[:, 0] for o in session.run(None, feeds(0, len(frame)))])
    expected = model.predict_proba(frame, backend=backend)[OUTPUTS].to_numpy()
    block = frame.iloc[:4096]
    single = [frame.iloc[i:i + 1] for i in range(single_rows)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the MoE backend's torch on one thread, as onnxruntime and LightGBM here
    throughput = _onnx_against_moeworks(
        onnx_batch=lambda: session.run(None, feeds(0, 4096)),
        moeworks_batch=lambda: model.predict_proba(block, backend=backend),
        onnx_single=lambda: [session.run(None, feeds(i, i + 1)) for i in range(single_rows)],
        moeworks_single=lambda: [model.predict_proba(r, backend=backend) for r in single],
        batch_rows=4096, single_rows=single_rows, repeats=repeats)
    torch.set_num_threads(threads)
    proto = onnx.load(str(bundle / "model.onnx"))
    return {"dataset": "ai4i2020", "model": f"ai4i-{backend}",
            "parity": {"rows": len(frame), "pd_max_abs_error": float(np.max(np.abs(got - expected))),
                       "decisions_differing": None, "reason_codes_differing": None},
            "throughput": throughput, "model_onnx_bytes": (bundle / "model.onnx").stat().st_size,
            "bundle_bytes": sum(p.stat().st_size for p in bundle.iterdir()), "graph_nodes": len(proto.graph.node),
            "graph_operators": sorted({n.op_type for n in proto.graph.node}), "build_seconds": build_seconds,
            "load_seconds": load_seconds}


def measure_defects(run_dir: Path, data_root: Path, work: Path, *, repeats: int, stage: bool = False) -> dict:
    """The defect detector's bundle (a `defects train` folder) against `DefectInspector` on NEU-DET frames
    (every 25th image, 200 px; no tiling below 2x the input size): per frame the same number of detections,
    then the largest box and score differences; throughput in frames/s (batch 16 and 1). With `stage`, the
    bundle carries the run's MoE second stage (`bundle build --moe-stage RUN/moe_stage.pt`) and the
    inspector runs the same stage (as `defects predict --moe-stage`)."""
    import onnx
    import torch

    from deploy.bundle.build import DetectorOptions
    from deploy.bundle.defects_card import inspector_outputs
    from manufacturing.defects.dataset import load_image
    from manufacturing.defects.detector import YoloDetector
    from manufacturing.defects.moe_stage import CropMoEClassifier
    from manufacturing.defects.pipeline import DefectInspector
    from manufacturing.defects.workflow import MOE_FILE

    stage_file = run_dir / MOE_FILE if stage else None
    if stage_file is not None and not stage_file.is_file():
        raise ValueError(f"{run_dir} has no {MOE_FILE}: train the run with --train-moe (the default)")
    bundle, session, build_seconds, load_seconds = _build_and_open(
        run_dir, work / ("defects-stage" if stage else "defects"), detector=DetectorOptions(moe_stage=stage_file))
    paths = sorted((data_root / "neu_det" / "IMAGES").glob("*.jpg"))[::25]
    frames = np.stack([load_image(p)[:, :, ::-1] for p in paths])  # RGB, as the bundle takes them
    torch.set_num_threads(1)  # moeworks' YOLO and MoE stage on one thread, as onnxruntime here
    inspector = DefectInspector(detector=YoloDetector.load(run_dir / "detector.pt"),
                                second_stage=CropMoEClassifier.load(stage_file)[0] if stage else None)
    want = inspector_outputs(inspector, frames)
    names = [o.name for o in session.get_outputs()]
    parts = [dict(zip(names, session.run(None, {"image": frames[i:i + 16]}), strict=True))
             for i in range(0, len(frames), 16)]
    got = {n: np.concatenate([p[n] + (i * 16 if n == "image_index" else 0) for i, p in enumerate(parts)])
           for n in names}
    counts_want = np.bincount(want["image_index"], minlength=len(frames))
    same = counts_want == np.bincount(got["image_index"], minlength=len(frames))
    matched_w = np.isin(want["image_index"], np.flatnonzero(same))
    matched_g = np.isin(got["image_index"], np.flatnonzero(same))
    box = np.abs(want["boxes"][matched_w] - got["boxes"][matched_g])
    score = np.abs(want["scores"][matched_w] - got["scores"][matched_g])
    bgr = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames]
    throughput = _onnx_against_moeworks(
        onnx_batch=lambda: session.run(None, {"image": frames[:16]}), moeworks_batch=lambda: inspector.detect(bgr[:16]),
        onnx_single=lambda: [session.run(None, {"image": frames[i:i + 1]}) for i in range(16)],
        moeworks_single=lambda: [inspector.detect([b]) for b in bgr[:16]], batch_rows=16, single_rows=16,
        repeats=repeats)
    proto = onnx.load(str(bundle / "model.onnx"))
    return {"dataset": "neu_det", "model": "defects-detector" + ("+moe-stage" if stage else ""),
            "parity": {"frames": len(frames), "detections": int(len(want["scores"])),
                       "frames_with_other_counts": int((~same).sum()),
                       "classes_differing": int((want["classes"][matched_w] != got["classes"][matched_g]).sum()),
                       "box_max_abs_error_px": float(box.max()) if box.size else 0.0,
                       "score_max_abs_error": float(score.max()) if score.size else 0.0},
            "throughput": throughput, "throughput_unit": "frames/s (batch: 16 frames)",
            "model_onnx_bytes": (bundle / "model.onnx").stat().st_size,
            "bundle_bytes": sum(p.stat().st_size for p in bundle.iterdir()), "graph_nodes": len(proto.graph.node),
            "graph_operators": sorted({n.op_type for n in proto.graph.node}), "build_seconds": build_seconds,
            "load_seconds": load_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_argument(parser)
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "moeworks-bundle-models")
    parser.add_argument("--cases", default="taiwan:scorecard,taiwan:lightgbm,taiwan:ensemble,gmsc:scorecard,"
                                           "gmsc:lightgbm,taiwan:moe,gmsc:moe,taiwan:moe-ensemble,"
                                           "gmsc:moe-ensemble,ai4i:lightgbm,ai4i:moe,cmapss-FD001:lstm,"
                                           "cmapss-FD004:moe")
    parser.add_argument("--detector-run", type=Path, default=None,
                        help="a `defects train` folder, for the cases neu_det:detector and neu_det:detector-stage "
                             "(its moe_stage.pt in the bundle and the inspector; neither case is among the defaults)")
    parser.add_argument("--single-rows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parity-rows", type=int, default=None,
                        help="credit cases: check parity on the first N rows of the file only (default: every row)")
    parser.add_argument("--batch-rows", type=int, default=4096,
                        help="credit cases: rows per batch call and per parity block (the throughput keys keep "
                             "the name _4096; the sequence model needs fewer on 24 GiB)")
    parser.add_argument("--baseline-moe", metavar="REV", default=None,
                        help="also measure the credit MoE cases with git revision REV's MoE graph, first, in this run")
    add_output_arguments(parser, None)
    args = parser.parse_args()
    results = {"machine": {**machine(), "onnxruntime_threads": 1, "lightgbm_threads": 1, "torch_threads": 1},
               "cases": []}
    for case in args.cases.split(","):  # refused before any case runs: the others take minutes
        dataset, name = case.split(":")
        if dataset == "neu_det" and name not in ("detector", "detector-stage"):
            parser.error(f"unknown case {case}: neu_det has detector and detector-stage")
        if dataset == "neu_det" and args.detector_run is None:
            parser.error(f"the case {case} needs --detector-run")
        if name == "detector-stage" and not (args.detector_run / "moe_stage.pt").is_file():
            parser.error(f"{case}: {args.detector_run} has no moe_stage.pt (a `defects train` run with "
                         f"--train-moe, the default, writes it)")
    print(describe(results["machine"]), file=sys.stderr)
    with tempfile.TemporaryDirectory() as work:
        for case in args.cases.split(","):
            dataset, name = case.split(":")
            if dataset == "neu_det":
                row = measure_defects(args.detector_run, args.data, Path(work), repeats=args.repeats,
                                      stage=name == "detector-stage")
                results["cases"].append(row)
                p, t = row["parity"], row["throughput"]
                print(f"neu_det {name} nodes {row['graph_nodes']} | {p['frames']} frames, {p['detections']} "
                      f"detections, frames with other counts {p['frames_with_other_counts']}, box err "
                      f"{p['box_max_abs_error_px']:.3g} px, score err {p['score_max_abs_error']:.2e} | batch 16: "
                      f"{t['ratio_4096']:.2f}x, batch 1: {t['ratio_1']:.2f}x of moeworks", file=sys.stderr)
                continue
            if dataset.startswith("cmapss"):  # cmapss-FD001:lstm
                row = measure_rul(name, dataset.split("-")[1], args.data, args.models_dir, Path(work),
                                  repeats=args.repeats)
            elif dataset == "ai4i":
                row = measure_ai4i(args.data, args.models_dir, Path(work), single_rows=args.single_rows,
                                   repeats=args.repeats, backend=name)
            else:
                graphs = [args.baseline_moe, None] if args.baseline_moe and "moe" in name else [None]
                for graph in graphs[:-1]:  # the baseline first, then this tree's graph
                    with _moe_graph_of(graph):
                        row = measure(dataset, name, args.data, args.models_dir, Path(work) / graph,
                                      single_rows=args.single_rows, repeats=args.repeats,
                                      parity_rows=args.parity_rows, batch_rows=args.batch_rows)
                    results["cases"].append({**row, "moe_graph": graph})
                    _print_row(dataset, f"{name}@{graph}", row)
                row = measure(dataset, name, args.data, args.models_dir, Path(work), single_rows=args.single_rows,
                              repeats=args.repeats, parity_rows=args.parity_rows, batch_rows=args.batch_rows)
            results["cases"].append(row)
            _print_row(dataset, name, row)
    write_results(results, args.out, as_json=args.json)


def _print_row(dataset: str, name: str, row: dict) -> None:
    p, t = row["parity"], row["throughput"]
    print(f"{dataset:7s} {name:10s} nodes {row['graph_nodes']:4d} "
          f"onnx {row['model_onnx_bytes'] / 1024:7.0f} KiB "
          f"load {row['load_seconds'] * 1000:6.0f} ms | rows {p['rows']} pd err {p['pd_max_abs_error']:.1e} "
          f"decisions diff {p['decisions_differing']} reasons diff {p['reason_codes_differing']} "
          f"(sets {p.get('reason_sets_differing')}) | "
          f"batch 4096: onnx {t['onnx_rows_s_4096']:,.0f} vs {t['moeworks_rows_s_4096']:,.0f} rows/s "
          f"({t['ratio_4096']:.2f}x) | batch 1: {t['onnx_rows_s_1']:,.0f} vs {t['moeworks_rows_s_1']:,.0f} "
          f"({t['ratio_1']:.2f}x)", file=sys.stderr)


if __name__ == "__main__":
    main()
