"""The adapter interface: every family builds itself in the `from_path` classmethod (load, quantize,
compile) and its `__init__` only stores the parts it is given, keyword-only; the options refuse
what no family can apply."""

import builtins
import inspect

import numpy as np
import pytest
import torch

from benchmarks.serving_models import SequenceAdapter
from deploy.serving.base import AdapterOptions, InputField
from deploy.serving.registry import REGISTRY


class Head(torch.nn.Module):
    """forward(numeric (batch, 2)) -> (logits (batch, 1), aux scalar), as the core models answer."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, numeric):
        return self.linear(numeric), numeric.new_zeros(())


def _families():
    return [*REGISTRY.families(), SequenceAdapter]


@pytest.mark.parametrize("family", _families(), ids=lambda f: f.family)
def test_each_family_builds_in_a_classmethod_and_takes_keyword_only_parts(family):
    assert isinstance(inspect.getattr_static(family, "from_path"), classmethod)
    assert isinstance(inspect.getattr_static(family, "recognise"), classmethod)
    parameters = list(inspect.signature(family.__init__).parameters.values())[1:]
    assert parameters and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters), parameters


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way a constructor could reach a file, a runtime or the thread settings fails the test."""
    def refuse(*_, **__):
        raise AssertionError("__init__ did work: it loaded, opened or configured something")

    for owner, name in [(torch, "load"), (torch, "set_num_threads"), (builtins, "open"), (np, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    import onnx
    import onnxruntime

    monkeypatch.setattr(onnx, "load", refuse)
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def test_init_stores_the_parts_it_is_given_and_does_nothing_else(nothing_loads):
    from deploy.serving.families.credit import CreditAdapter
    from deploy.serving.families.defects import DefectsAdapter
    from deploy.serving.families.onnx import OnnxAdapter
    from deploy.serving.families.rul import RULAdapter
    from deploy.serving.families.tabular import TorchAdapter

    options = AdapterOptions()
    field = InputField("numeric", np.dtype(np.float32), (2,))
    model, session, scorer, spec, inspector = Head(), object(), object(), object(), object()
    common = {"name": "m", "version": "v1", "runtime": "r", "options": options}
    built = [
        TorchAdapter(model=model, fields=[field], **common),
        SequenceAdapter(model=model, fields=[field], **common),
        OnnxAdapter(session=session, outputs=["logits"], fields=[field], **common),
        RULAdapter(run=np.asarray, normalizer=object(), fields=[field], columns=["a"], output="rul", **common),
        DefectsAdapter(inspector=inspector, **common),
        CreditAdapter(scorer=scorer, spec=spec, options=options),
    ]
    assert built[0].model is model and built[0].fields == [field] and built[0].options is options
    assert built[2].session is session and built[4].inspector is inspector
    assert built[5].scorer is scorer and built[5].spec is spec
    # the stored parts are the adapter: a tabular one predicts with the module it was given
    logits = built[0].predict({"numeric": np.ones((3, 2), np.float32)})["logits"]
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(torch.ones(3, 2))[0].numpy())


@pytest.mark.parametrize("options, message", [
    ({"quantize": "int4"}, "unknown scheme"),
    ({"threads": 0}, "threads=0"),
    ({"conf": 1.5}, "score threshold"),
    ({"calibration_rows": 0}, "calibration_rows=0"),
])
def test_options_refuse_what_no_family_can_apply(options, message):
    with pytest.raises(ValueError, match=message):
        AdapterOptions(**options)
