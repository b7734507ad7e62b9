"""Interoperability with Eclipse Tahu's JavaScript Sparkplug B codec (npm `sparkplug-payload`, run with
node): it decodes the NBIRTH, DBIRTH and DDATA our edge agent sends, and we decode what it encodes."""

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.npm import npm_install
from twin.sparkplug import protobuf as sparkplug
from twin.sparkplug.codec import with_seq
from twin.sparkplug.payload import REBIRTH, Metric, Payload

NOW = int(time.time() * 1000)


@pytest.fixture(scope="module")
def tahu_js(tmp_path_factory):
    return npm_install(tmp_path_factory.mktemp("tahu"), "sparkplug-payload@1")


def run_tahu(node_modules: Path, job: dict) -> dict:
    run = subprocess.run(["node", str(Path(__file__).with_name("sparkplug_tahu.js"))], input=json.dumps(job),
                         capture_output=True, text=True, timeout=60, env={"NODE_PATH": str(node_modules),
                                                                          "PATH": os.environ["PATH"]})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.mark.slow
def test_tahu_reads_our_births_and_data(tahu_js):
    aliases = sparkplug.assign_aliases("mill-1", ["torque", "tool_wear", "product_type", "machine_failure"])
    nbirth = Payload(NOW, 0, 3, [Metric("bdSeq", 3, "Int64"), Metric(REBIRTH, False, "Boolean"),
                                 Metric("spool_depth", 0, "Int64"), Metric("source", "simulated mill", "String")])
    dbirth = Payload(NOW, 1, None, [
        Metric("torque", None, "Double", "Nm"), Metric("tool_wear", None, "Double", "min"),
        Metric("product_type", None, "String"), Metric("machine_failure", None, "Boolean")], serial=273)
    # as the agent sends DDATA: encoded without a seq into its spool, the node's seq stamped as it leaves
    ddata = Payload(NOW + 5, None, None, [Metric("torque", 41.25), Metric("tool_wear", 108.0),
                                          Metric("product_type", "L"), Metric("machine_failure", False)], serial=273)
    ours = {"NBIRTH": sparkplug.encode(nbirth), "DBIRTH": sparkplug.encode(dbirth, aliases=aliases),
            "DDATA": with_seq(sparkplug.encode(ddata, aliases=aliases, names=False), 2)}
    got = run_tahu(tahu_js, {"decode": {k: base64.b64encode(v).decode() for k, v in ours.items()}})["decoded"]

    birth = got["NBIRTH"]
    assert (int(birth["timestamp"]), int(birth["seq"])) == (NOW, 0)
    assert [(m["name"], m["type"], m["value"] if not isinstance(m["value"], str) or m["type"] == "String"
             else int(m["value"])) for m in birth["metrics"]] == [
        ("bdSeq", "Int64", 3), (REBIRTH, "Boolean", False), ("spool_depth", "Int64", 0),
        ("source", "String", "simulated mill")]

    device = got["DBIRTH"]
    assert int(device["seq"]) == 1
    declared = {m["name"]: m for m in device["metrics"]}
    for name, alias in aliases.items():
        assert int(declared[name]["alias"]) == alias and declared[name]["value"] is None
    assert declared["torque"]["type"] == "Double" and declared["torque"]["properties"]["engUnit"]["value"] == "Nm"
    assert declared["machine_failure"]["type"] == "Boolean" and declared["product_type"]["type"] == "String"
    assert declared[sparkplug.SERIAL_METRIC]["type"] == "UInt64" and int(declared[sparkplug.SERIAL_METRIC]["value"]) \
        == 273 and "alias" not in declared[sparkplug.SERIAL_METRIC]

    data = got["DDATA"]
    assert (int(data["timestamp"]), int(data["seq"])) == (NOW + 5, 2)
    by_alias = {int(m["alias"]): m for m in data["metrics"] if "alias" in m}
    names = {alias: name for name, alias in aliases.items()}
    assert {names[a]: (m["value"], m["type"]) for a, m in by_alias.items()} == {
        "torque": (41.25, "Double"), "tool_wear": (108.0, "Double"), "product_type": ("L", "String"),
        "machine_failure": (False, "Boolean")}
    assert all("name" not in m for m in by_alias.values()), "data names metrics by alias alone"
    serial = [m for m in data["metrics"] if m.get("name") == sparkplug.SERIAL_METRIC]
    assert len(serial) == 1 and int(serial[0]["value"]) == 273


@pytest.mark.slow
def test_we_read_what_tahu_encodes(tahu_js):
    theirs = {
        "NBIRTH": {"timestamp": str(NOW), "seq": 0, "metrics": [
            {"name": "bdSeq", "type": "Int64", "value": "12"},
            {"name": REBIRTH, "type": "Boolean", "value": False}]},
        "DBIRTH": {"timestamp": str(NOW), "seq": 1, "metrics": [
            {"name": "torque", "alias": 1, "type": "Double", "value": 40.5,
             "properties": {"engUnit": {"type": "String", "value": "Nm"}}},
            {"name": "count", "alias": 2, "type": "Int64", "value": "-42"},
            {"name": "small", "alias": 3, "type": "Int16", "value": -7},
            {"name": "ratio", "alias": 4, "type": "Float", "value": 0.5},
            {"name": "label", "alias": 5, "type": "String", "value": "H"},
            {"name": "ok", "alias": 6, "type": "Boolean", "value": True},
            {"name": "spare", "alias": 7, "type": "Double", "value": None}]},
        "DDATA": {"timestamp": str(NOW + 1), "seq": 2, "metrics": [
            {"alias": 1, "type": "Double", "value": 41.5}, {"alias": 2, "type": "Int64", "value": "9007199254740993"}]},
        "NCMD": {"timestamp": str(NOW), "metrics": [{"name": REBIRTH, "type": "Boolean", "value": True}]},
    }
    encoded = run_tahu(tahu_js, {"encode": theirs})["encoded"]
    raw = {kind: base64.b64decode(b64) for kind, b64 in encoded.items()}

    birth = sparkplug.decode("NBIRTH", raw["NBIRTH"], now_ms=NOW)
    assert (birth.bd_seq, birth.seq, birth.timestamp) == (12, 0, NOW)
    device = sparkplug.decode("DBIRTH", raw["DBIRTH"], now_ms=NOW)
    assert [(m.name, m.alias, m.value, m.type, m.unit) for m in device.metrics] == [
        ("torque", 1, 40.5, "Double", "Nm"), ("count", 2, -42, "Int64", None), ("small", 3, -7, "Int64", None),
        ("ratio", 4, 0.5, "Float", None), ("label", 5, "H", "String", None), ("ok", 6, True, "Boolean", None),
        ("spare", 7, None, "Double", None)]
    data = sparkplug.decode("DDATA", raw["DDATA"], now_ms=NOW)
    assert data.seq == 2 and [(m.name, m.alias, m.value) for m in data.metrics] == [
        (None, 1, 41.5), (None, 2, 9007199254740993)]
    command = sparkplug.decode("NCMD", raw["NCMD"], now_ms=NOW)
    assert [(m.name, m.value) for m in command.metrics] == [(REBIRTH, True)]
