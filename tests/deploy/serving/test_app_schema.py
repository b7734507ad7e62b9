"""schemathesis over the server's own OpenAPI document (the loaded model's instance schema
included): generated valid and invalid requests to every route, and not one 500. (schemathesis'
`not_a_server_error` counts any 5xx; a 503 from admission control or a 504 is the server degrading
as designed, so the check here is the statuses each route may answer.)"""

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from deploy.serving.app import create_app
from deploy.serving.batcher import BatcherConfig
from deploy.serving.families.tabular import TorchAdapter


@pytest.fixture(scope="module")
def served_app(checkpoint):
    app = create_app(lambda: TorchAdapter.from_path(checkpoint),
                     batcher_config=BatcherConfig(max_wait_s=0.002, default_timeout_s=10.0))
    with TestClient(app):  # runs the lifespan: the model is loaded and the batcher runs while the cases do
        yield app


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_route_answers_500(served_app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", served_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/healthz", "/metrics", "/v1/model"}
    seen = []
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.path != "/v1/predict":
            continue  # routes without parameters or a body have nothing to make invalid
        @settings(max_examples=40 if operation.path == "/v1/predict" else 5, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            response = case.call()
            seen.append(response.status_code)
            allowed = (200, 413, 422, 503, 504) if case.path == "/v1/predict" else (200, 404, 405, 422)
            assert response.status_code in allowed, (case.path, case.body, response.text)

        call()
    assert 500 not in seen and (200 in seen if mode == GenerationMode.POSITIVE else 422 in seen)
