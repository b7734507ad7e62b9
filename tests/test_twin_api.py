"""The REST API over a live service (messages enter through the service's ingest path)."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from twin.api import create_app
from twin.service import TwinConfig, TwinService
from twin.services import free_port

NODE, DEVICE = "edge-mill-1", "mill-1"
T0 = (int(time.time()) - 3600) * 1000  # edge timestamps: inside the twin's window (an hour ago)


def send(service, kind, payload, device=DEVICE):
    topic = f"spBv1.0/plant1/{kind}/{NODE}" + (f"/{device}" if kind[0] == "D" else "")
    service.ingest(topic, json.dumps(payload).encode())


@pytest.fixture
def service(tmp_path):
    # no broker listens on this port: the API must work from state and history alone
    s = TwinService(config=TwinConfig(broker_port=free_port(), db=str(tmp_path / "twin.db"))).start()
    send(s, "NBIRTH", {"timestamp": T0, "seq": 0, "bdSeq": 0})
    send(s, "DBIRTH", {"timestamp": T0, "seq": 0})
    for seq in range(20):
        send(s, "DDATA", {"timestamp": T0 + seq * 1000, "seq": seq, "metrics": [
            {"name": "product_type", "value": "L"}, {"name": "air_temperature", "value": 300.0},
            {"name": "process_temperature", "value": 310.0}, {"name": "rotational_speed", "value": 1500.0},
            {"name": "torque", "value": 40.0 + seq}, {"name": "tool_wear", "value": 100.0 + 6 * seq}]})
    yield s
    s.stop()


def test_assets_state_history_and_openapi(service):
    client = TestClient(create_app(service))
    assets = {a["id"]: a for a in client.get("/api/assets").json()}
    assert set(assets) == {"engine-1", "engine-2", "mill-1", "mill-2"}
    mill = client.get(f"/api/assets/{DEVICE}").json()
    assert mill["online"] and mill["values"]["torque"] == 59.0 and mill["health"]["source"] == "ai4i-rules"
    assert {s["name"]: s["unit"] for s in mill["sensors"]}["torque"] == "Nm"
    rows = client.get(f"/api/assets/{DEVICE}/history",
                      params={"start_ms": T0 + 5_000, "end_ms": T0 + 10_000}).json()
    assert [r["seq"] for r in rows] == [5, 6, 7, 8, 9] and rows[0]["failure_prob"] is not None
    assert client.get("/api/assets/nope").status_code == 404
    spec = client.get("/openapi.json").json()
    for path in ("/api/assets", "/api/assets/{device_id}/history", "/api/alarms", "/api/alarms/{alarm_id}/ack",
                 "/api/assets/{device_id}/simulate/mill", "/api/assets/{device_id}/simulate/engine"):
        assert path in spec["paths"], path
    assert client.get("/api/schema").json()["properties"]["seq"]["minimum"] == 0
    assert 'moeworks_twin_messages_total{outcome="ingested"} 20' in client.get("/metrics").text
    assert "<canvas" in client.get("/").text


def test_alarm_acknowledgement_and_history(service):
    client = TestClient(create_app(service))
    open_alarms = client.get("/api/alarms").json()
    # tool wear ends at 214 min (limit 200) and 214 min x 59 Nm passes the 11,000 minNm overstrain rule
    assert {a["kind"] for a in open_alarms} == {"limit_high", "failure_risk"}
    [wear] = [a for a in open_alarms if a["kind"] == "limit_high"]
    assert wear["metric"] == "tool_wear"
    acked = client.post(f"/api/alarms/{wear['id']}/ack", json={"user": "ann"}).json()
    assert acked["state"] == "ACTIVE_ACK" and acked["acked_by"] == "ann"
    assert client.post(f"/api/alarms/{wear['id']}/ack", json={"user": "ann"}).status_code == 404
    history = client.get("/api/alarms", params={"state": "all"}).json()
    assert {a["id"]: a["acked_by"] for a in history}[wear["id"]] == "ann"
    [order] = client.get("/api/work-orders").json()
    assert order["device"] == DEVICE and order["body"]["trigger"] == "failure_risk"


def test_what_if_endpoints(service):
    client = TestClient(create_app(service))
    result = client.post(f"/api/assets/{DEVICE}/simulate/mill", json={"torque_nm": 50, "runs": 100}).json()
    assert result["start"]["torque_nm"] == 50 and 0 <= result["failure_probability"] <= 1
    assert result["time_to_failure_hours"]["p10"] <= result["time_to_failure_hours"]["p90"]
    bad = client.post(f"/api/assets/{DEVICE}/simulate/mill", json={"shifts_per_day": 5})
    assert bad.status_code == 422
    no_rul = client.post("/api/assets/engine-1/simulate/engine", json={})
    assert no_rul.status_code == 422 and "no RUL estimate" in no_rul.json()["detail"]
    wrong = client.post(f"/api/assets/{DEVICE}/simulate/engine", json={})
    assert wrong.status_code == 422


def test_dead_letters_endpoint(service):
    service.ingest(f"spBv1.0/plant1/DDATA/{NODE}/{DEVICE}", b"\x00garbage")
    client = TestClient(create_app(service))
    [dead] = client.get("/api/dead-letters").json()
    assert dead["reason"].startswith("malformed JSON") and client.get("/api/stats").json()["counters"]["malformed"] == 1


def test_a_burst_with_a_failing_health_model_dead_letters_that_message_only(tmp_path):
    class Broken:
        inline = True  # run on the ingestion path (learned models run on the twin's health thread)

        def update(self, machine, values):
            if values.get("torque", 0) > 50:
                raise ZeroDivisionError("model bug")
            return None

    s = TwinService(config=TwinConfig(broker_port=free_port(), db=str(tmp_path / "twin.db")),
                    health_models={"mill": Broken()}).start()
    try:
        send(s, "NBIRTH", {"timestamp": T0, "seq": 0, "bdSeq": 0})
        send(s, "DBIRTH", {"timestamp": T0, "seq": 0})
        topic = f"spBv1.0/plant1/DDATA/{NODE}/{DEVICE}"
        s.ingest_many([(topic, json.dumps({"timestamp": T0 + seq, "seq": seq, "metrics": [
            {"name": "torque", "value": torque}]}).encode()) for seq, torque in enumerate([40.0, 60.0, 45.0])])
        s.store.flush()
        assert s.store.seqs(DEVICE) == [0, 2]
        [dead] = s.store.dead_letters()
        assert dead["reason"] == "internal error: ZeroDivisionError: model bug"
        assert s.stats()["counters"]["internal_error"] == 1
    finally:
        s.stop()
