"""The REST API over a live service (messages enter through the service's ingest path)."""

import json
import time

import pytest
from fastapi.testclient import TestClient

from tests.services import free_port
from twin.api.app import create_app
from twin.auth import TokenStore, create_token
from twin.service import TwinConfig, TwinService

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
    metrics = client.get("/metrics").text
    assert 'moeworks_twin_messages_total{outcome="ingested"} 20' in metrics
    assert "moeworks_twin_rows_refused_total 0" in metrics and "moeworks_twin_health_backlog " in metrics
    assert "<canvas" in client.get("/").text


def test_alarm_acknowledgement_without_auth_file_is_the_local_admin(service):
    client = TestClient(create_app(service))
    open_alarms = client.get("/api/alarms").json()
    # tool wear ends at 214 min (limit 200) and 214 min x 59 Nm passes the 11,000 minNm overstrain rule
    assert {a["kind"] for a in open_alarms} == {"limit_high", "failure_risk"}
    [wear] = [a for a in open_alarms if a["kind"] == "limit_high"]
    assert wear["metric"] == "tool_wear"
    # a name the client writes in is not an identity: it is ignored
    acked = client.post(f"/api/alarms/{wear['id']}/ack", json={"user": "ann"}).json()
    assert acked["state"] == "ACTIVE_ACK" and (acked["acked_by"], acked["acked_role"]) == ("local", "admin")
    assert client.post(f"/api/alarms/{wear['id']}/ack").status_code == 404
    history = client.get("/api/alarms", params={"state": "all"}).json()
    assert {a["id"]: a["acked_by"] for a in history}[wear["id"]] == "local"
    [order] = client.get("/api/work-orders").json()
    assert order["device"] == DEVICE and order["body"]["trigger"] == "failure_risk"
    assert client.get("/api/whoami").json() == {"name": "local", "role": "admin", "authenticated": False}


def test_roles_decide_who_reads_and_who_acknowledges_and_the_alarm_records_who(service, tmp_path):
    tokens = tmp_path / "tokens.json"
    viewer = create_token(tokens, role="viewer", name="vic")
    operator = create_token(tokens, role="operator", name="olga")
    client = TestClient(create_app(service, tokens=TokenStore.load(tokens)))
    bearer = {role: {"Authorization": f"Bearer {t}"} for role, t in (("viewer", viewer), ("operator", operator))}
    for path in ("/api/assets", "/api/alarms", f"/api/assets/{DEVICE}/history", "/api/stats", "/metrics",
                 "/api/events", "/api/dead-letters", "/api/plant"):
        refused = client.get(path)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", path
    assert client.get("/api/assets", headers={"Authorization": "Bearer mw_0123456789abcdef_" + "A" * 43}
                      ).status_code == 401, "a well-formed but unknown token"
    assert client.get("/api/assets", headers={"Authorization": viewer}).status_code == 401, "the scheme is required"
    assert "<canvas" in client.get("/").text, "the page holds no data: it is served, and asks for a token"
    assert client.get("/api/assets", headers=bearer["viewer"]).status_code == 200
    assert client.get("/api/whoami", headers=bearer["viewer"]).json() == {"name": "vic", "role": "viewer",
                                                                          "authenticated": True}
    [wear] = [a for a in client.get("/api/alarms", headers=bearer["viewer"]).json() if a["kind"] == "limit_high"]
    ack = f"/api/alarms/{wear['id']}/ack"
    assert client.post(ack).status_code == 401
    forbidden = client.post(ack, headers=bearer["viewer"])
    assert forbidden.status_code == 403 and "operator" in forbidden.json()["detail"]
    plan = {"torque_nm": 50, "runs": 100}
    assert client.post(f"/api/assets/{DEVICE}/simulate/mill", json=plan, headers=bearer["viewer"]).status_code == 403
    assert client.post(f"/api/assets/{DEVICE}/simulate/mill", json=plan, headers=bearer["operator"]).status_code == 200
    acked = client.post(ack, json={"user": "somebody else"}, headers=bearer["operator"])
    assert acked.status_code == 200
    assert (acked.json()["acked_by"], acked.json()["acked_role"], acked.json()["state"]) == ("olga", "operator",
                                                                                            "ACTIVE_ACK")
    history = client.get("/api/alarms", params={"state": "all"}, headers=bearer["viewer"]).json()
    stored = {a["id"]: (a["acked_by"], a["acked_role"]) for a in history}
    assert stored[wear["id"]] == ("olga", "operator"), "the store keeps who acknowledged, and as which role"
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_the_live_feed_needs_a_token_and_streams_snapshots_with_one(service, tmp_path):
    tokens = tmp_path / "tokens.json"
    viewer = create_token(tokens, role="viewer", name="wall screen")
    client = TestClient(create_app(service, tokens=TokenStore.load(tokens), stream_max_s=0.2))
    assert client.get("/api/events").status_code == 401
    with client.stream("GET", "/api/events", headers={"Authorization": f"Bearer {viewer}"}) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        frame = next(line for line in answer.iter_lines() if line.startswith("data: "))
    snapshot = json.loads(frame.removeprefix("data: "))
    assert {a["id"] for a in snapshot["assets"]} == {"engine-1", "engine-2", "mill-1", "mill-2"}
    assert {a["kind"] for a in snapshot["alarms"]} == {"limit_high", "failure_risk"}


def test_a_database_from_before_roles_gains_the_acked_role_column(tmp_path):
    import sqlite3

    from twin.domain.alarms import Alarm
    from twin.store.history import HistoryStore

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute("CREATE TABLE alarms (id TEXT PRIMARY KEY, device TEXT NOT NULL, kind TEXT NOT NULL, "
                    "metric TEXT NOT NULL, severity TEXT NOT NULL, message TEXT NOT NULL, value DOUBLE PRECISION, "
                    "raised_ms BIGINT NOT NULL, cleared_ms BIGINT, acked_ms BIGINT, acked_by TEXT)")
        old.execute("INSERT INTO alarms VALUES ('a0','mill-1','stale','','medium','old',NULL,5,NULL,7,'ann')")
    store = HistoryStore(path).start()
    try:
        store.put_alarm(Alarm("a1", "mill-1", "limit_high", "torque", "medium", "m", 1.0, 9, acked_ms=10,
                              acked_by="olga", acked_role="operator"))
        store.flush()
        assert {a.id: (a.acked_by, a.acked_role) for a in store.alarms()} == {"a0": ("ann", None),
                                                                              "a1": ("olga", "operator")}
    finally:
        store.close()


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


@pytest.mark.parametrize("path, params", [
    (f"/api/assets/{DEVICE}/history", {"start_ms": "99999999999999999999"}),
    (f"/api/assets/{DEVICE}/history", {"end_ms": -1}),
    (f"/api/assets/{DEVICE}/history", {"limit": 10**9}),
    ("/api/alarms", {"since_ms": 2**70}),
    ("/api/alarms", {"device": "d" * 1000}),
    ("/api/dead-letters", {"limit": 0}),
    ("/api/assets/" + "x" * 1000, {}),
])
def test_out_of_range_query_parameters_are_422_not_500(service, path, params):
    answer = TestClient(create_app(service)).get(path, params=params)
    assert answer.status_code == 422, answer.text


@pytest.mark.parametrize("kind, device, plan, reason", [
    ("mill", DEVICE, {"processes_per_hour": 1e308}, "less than or equal to 60"),
    ("mill", DEVICE, {"processes_per_hour": 7e-170}, "greater than or equal to 0.01"),
    ("mill", DEVICE, {"speed_rpm": 1e308}, "less than or equal"),
    ("mill", DEVICE, {"seed": -1}, "greater than or equal to 0"),
    ("mill", DEVICE, {"seed": 2**70}, "less than or equal"),
    ("mill", DEVICE, {"typo": 1}, "Extra inputs"),
    # each bound alone is fine, together they are more than one what-if may compute (twin.domain.whatif.MAX_MILL_WORK)
    ("mill", DEVICE, {"processes_per_hour": 60, "horizon_hours": 8760, "shifts_per_day": 3, "runs": 20000},
     "process steps"),
    ("engine", "engine-1", {"severity": 1e-300}, "greater than or equal to 0.01"),
    ("engine", "engine-1", {"cycles_per_day": 1e308}, "less than or equal"),
])
def test_what_if_plans_are_bounded(service, kind, device, plan, reason):
    answer = TestClient(create_app(service)).post(f"/api/assets/{device}/simulate/{kind}", json=plan)
    assert answer.status_code == 422 and reason in answer.text, answer.text


def test_the_largest_allowed_what_ifs_stay_finite(service):
    """At the bounds' corners the simulations return finite numbers (a NaN would serialise as null)."""
    client = TestClient(create_app(service))
    mill = client.post(f"/api/assets/{DEVICE}/simulate/mill", json={
        "speed_rpm": 100_000, "torque_nm": 10_000, "processes_per_hour": 60, "horizon_hours": 24, "runs": 10,
        "tool_change_min": 10_000, "seed": 2**53 - 1})
    assert mill.status_code == 200 and mill.json()["failure_probability"] == 1.0  # a 10 MW spindle overstrains
    engine_state = service.state.devices["engine-1"]
    from twin.domain.health import Health

    engine_state.health = Health(rul=150.0, rul_sd=20.0, source="test")
    for plan in ({"severity": 0.01, "cycles_per_day": 0.001, "rul_sd": 100_000, "runs": 200_000},
                 {"severity": 100, "cycles_per_day": 1000, "horizon_days": 3650}):
        result = client.post("/api/assets/engine-1/simulate/engine", json=plan).json()
        assert all(isinstance(result["days_to_failure"][q], float) for q in ("p10", "p50", "p90", "mean")), result


def test_non_finite_values_from_a_feed_never_make_the_api_fail(service):
    # Python's JSON reader accepts NaN and Infinity: whatever the ingest accepts, the API answers 200 or 422
    topic = f"spBv1.0/plant1/DDATA/{NODE}/{DEVICE}"
    service.ingest(topic, b'{"timestamp": 1700000100000, "seq": 20, "metrics": [{"name": "torque", "value": NaN},'
                          b' {"name": "air_temperature", "value": Infinity}]}')
    client = TestClient(create_app(service))
    for path in ("/api/assets", f"/api/assets/{DEVICE}", f"/api/assets/{DEVICE}/history", "/api/alarms",
                 "/api/dead-letters", "/api/stats"):
        assert client.get(path).status_code == 200, path
    answer = client.post(f"/api/assets/{DEVICE}/simulate/mill", json={"runs": 10})
    assert answer.status_code in (200, 422), answer.text


def test_dead_letters_endpoint(service):
    service.ingest(f"spBv1.0/plant1/DDATA/{NODE}/{DEVICE}", b"\x00garbage")  # not JSON: read as Sparkplug protobuf
    service.ingest(f"spBv1.0/plant1/DDATA/{NODE}/{DEVICE}", b'{"timestamp": ')
    client = TestClient(create_app(service))
    dead = client.get("/api/dead-letters").json()
    assert [d["reason"].split(":")[0] for d in dead] == ["malformed JSON", "malformed protobuf"]
    assert client.get("/api/stats").json()["counters"]["malformed"] == 2


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


def test_live_streams_are_capped_and_a_closed_one_frees_its_place(service):
    # over a real socket, as a browser holds its stream
    import httpx

    from deploy.twin_demo import HttpServer

    server = HttpServer(create_app(service, stream_max_s=30, max_streams=1)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            with client.stream("GET", "/api/events") as first:
                lines = first.iter_lines()  # held: a line iterator dropped half-way closes its stream
                next(line for line in lines if line.startswith("data: "))
                refused = client.get("/api/events")
                assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the server notices the disconnect at its next half-second step
                with client.stream("GET", "/api/events") as again:
                    if again.status_code == 200:
                        break
                time.sleep(0.2)
            assert again.status_code == 200
    finally:
        server.stop()
