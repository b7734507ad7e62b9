"""The registry: each family recognises its own models and nothing else's, the fallback (any other
.onnx) is asked last, a path no family knows is refused in one line naming the families, and the
serving modules import one another without a cycle."""

import ast
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from deploy.serving.base import ModelPath
from deploy.serving.registry import FAMILIES, REGISTRY, Registry

SERVING = Path(__file__).resolve().parents[3] / "deploy" / "serving"


def _onnx_file(path: Path, metadata: dict[str, str]) -> Path:
    """A one-node ONNX graph (Identity over a (batch, 3) float input) carrying `metadata`."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, checkpoint, tiny_rul_estimator):
    """{family: [paths it must recognise]}: real credit, RUL and tabular models; the detector's files
    carry the markers `defects train` / `defects export` write (training YOLO here would take minutes)."""
    from core.trainer import save_checkpoint
    from finance.data import load_generated
    from finance.generate import GeneratorConfig, generate
    from finance.scorer import CreditScorer, split_records
    from manufacturing.defects.detector import DETECTOR_KIND
    from manufacturing.maintenance.export import export_model_folder
    from manufacturing.maintenance.generator import generate_cmapss

    root = tmp_path_factory.mktemp("registry")
    records = load_generated(generate(root / "credit_data", GeneratorConfig(n_applicants=1500, seed=1)))
    train, valid = split_records(records, valid_share=0.3, seed=0)
    credit = CreditScorer(dataset="generated", model_name="scorecard").fit(*train.xy, eval_set=[valid.xy]).save(
        root / "credit")

    estimator = tiny_rul_estimator("lstm")
    estimator.fit(generate_cmapss(6, num_regimes=1, seed=2))
    rul = estimator.save(root / "rul")
    export_model_folder(rul, root / "rul_export")
    (rul_onnx,) = (root / "rul_export").glob("*.onnx")

    detector = save_checkpoint(root / "defects_run" / "detector.pt", torch.nn.Linear(2, 2), config={},
                               extra={"kind": DETECTOR_KIND, "names": ["crack"], "imgsz": 64})
    detector_onnx = _onnx_file(root / "defects_export" / "detector.onnx", {"names": '["crack"]', "imgsz": "64"})

    from core.onnx_export import export_onnx
    from deploy.serving.families.tabular import TorchAdapter

    tabular = TorchAdapter.from_path(checkpoint)
    example = tabular.example(4)
    tabular_onnx = export_onnx(tabular.model, tuple(torch.from_numpy(example[f.name]) for f in tabular.fields),
                               root / "tiny.onnx", input_names=["numeric", "categorical"],
                               output_names=["logits", "aux"])
    return {"credit": [credit], "rul": [rul, rul / "model.pt", rul_onnx],
            "defects": [detector.parent, detector, detector_onnx.parent, detector_onnx],
            "tabular": [checkpoint], "onnx": [tabular_onnx]}


def test_each_family_recognises_its_own_models_and_nothing_elses(models):
    families = REGISTRY.families()
    assert [f.family for f in families] == ["credit", "rul", "defects", "tabular", "onnx"]
    for owner, paths in models.items():
        for path in paths:
            assert REGISTRY.recognise(path).family == owner, path
            claims = {f.family for f in families if f.recognise(ModelPath(path))}
            # The fallback claims every readable .onnx; the registry asks it after the specific ones.
            expected = {owner, "onnx"} if path.suffix == ".onnx" else {owner}
            assert claims == expected, (path, claims)


def test_a_path_no_family_knows_is_refused_in_one_line_naming_the_families(models, tmp_path):
    from deploy.cli import app

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError) as refused:
        REGISTRY.recognise(tmp_path / "folder")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'folder'}: not a model any serving family")
    for name in ("credit", "rul", "defects", "tabular", "onnx"):
        assert f"{name} (" in message
    with pytest.raises(FileNotFoundError, match="no such model file or folder"):
        REGISTRY.recognise(tmp_path / "missing")

    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "folder"), "--port", "0"])
    assert result.exit_code == 2, result.output
    (line,) = [x for x in result.stderr.splitlines() if x.strip()]
    assert line.startswith("error: model: ") and "known families: credit (" in line


def test_a_checkpoint_of_an_unregistered_kind_is_refused_until_its_family_is_registered(tmp_path):
    from benchmarks.serving_models import MODEL_KIND, SequenceAdapter, SequenceMoEClassifier, SequenceMoEConfig
    from core import MoEConfig
    from core.trainer import save_checkpoint

    config = SequenceMoEConfig(num_features=3, num_tokens=4, num_layers=1,
                               moe=MoEConfig(num_experts=2, top_k=1, hidden_size=8, intermediate_size=16))
    path = save_checkpoint(tmp_path / "seq.pt", SequenceMoEClassifier(config), config=config,
                           extra={"model_kind": MODEL_KIND})
    with pytest.raises(ValueError, match="not a model any serving family recognises"):
        REGISTRY.recognise(path)
    registry = Registry(FAMILIES)
    registry.register(SequenceAdapter)
    registry.register(SequenceAdapter)  # twice: still one entry
    assert [f.family for f in registry.families()].count("sequence") == 1
    adapter = registry.from_path(path)
    assert isinstance(adapter, SequenceAdapter) and adapter.runtime == "torch+fp32"
    assert adapter.predict(adapter.example(3))["logits"].shape == (3, 1)
    assert "sequence" not in [f.family for f in REGISTRY.families()]  # the default registry is untouched


def test_the_registry_checks_a_models_files_and_options_before_loading(models, tmp_path):
    import shutil

    from deploy.serving.base import AdapterOptions

    (credit,) = models["credit"]
    with pytest.raises(ValueError, match="FP32, no fusion"):
        REGISTRY.check(credit, AdapterOptions(quantize="int8_dynamic"))
    with pytest.raises(ValueError, match="not a PyTorch scheme"):
        REGISTRY.check(models["tabular"][0], AdapterOptions(quantize="int8_static"))
    with pytest.raises(ValueError, match="not an ONNX scheme"):
        REGISTRY.check(models["onnx"][0], AdapterOptions(quantize="int8_weight_only"))
    with pytest.raises(ValueError, match="through its ONNX export"):
        REGISTRY.check(models["rul"][0], AdapterOptions(fuse=True))
    copy = tmp_path / "rul"
    shutil.copytree(models["rul"][0], copy)
    (copy / "extra.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="extra.pt: not in MANIFEST.json"):
        REGISTRY.check(copy, AdapterOptions())
    assert REGISTRY.check(models["rul"][2], AdapterOptions(quantize="int8_dynamic")).family == "rul"


def _serving_imports(path: Path) -> set[str]:
    """The deploy.serving modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deploy.serving"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("deploy.serving"))
    return found


def test_serving_modules_import_one_another_without_a_cycle():
    graph = {}
    for path in SERVING.rglob("*.py"):
        module = ".".join(path.relative_to(SERVING.parents[1]).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = _serving_imports(path) - {module}
    assert "deploy.serving.registry" not in set().union(*(graph[m] for m in graph if ".families." in m))

    def visit(module, trail):
        assert module not in trail, " -> ".join([*trail, module])
        for imported in graph.get(module, ()):
            visit(imported, [*trail, module])

    for module in graph:
        visit(module, [])
