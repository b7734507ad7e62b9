"""Sparkplug payloads, JSON against protobuf, side by side: bytes on the wire, edge encode and twin decode.

Two DDATA messages as the edge agent builds them: the AI4I mill's 6 metrics (what benchmarks/twin.py
publishes) and a C-MAPSS engine's 24 (its largest real message); protobuf sends aliases alone, the
twin names them from the birth's map. "decode" is as the twin's state calls it (protobuf DDATA with
`as_values`: name -> value, no Metric per value; the JSON decoder has no such form). "twin apply" is
TwinState.apply of a stream of such messages for one device (decode, seq and duplicate checks,
values, health rules): the per-message work of the twin's MQTT thread before the history writer.
CPU time of this process, median of `--repeats`.

    python -m benchmarks.sparkplug_codec --json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common

MILL = ("air_temperature", "process_temperature", "rotational_speed", "torque", "tool_wear")
ENGINE = tuple(f"setting_{i}" for i in range(1, 4)) + tuple(f"s{i}" for i in range(1, 22))


def _cpu_us(fn, items) -> float:
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items) * 1e6


def measure(names: tuple[str, ...], with_type: bool, messages: int, repeats: int) -> dict:
    from twin.domain.health import default_health_models
    from twin.domain.plant import Plant
    from twin.domain.state import TwinState
    from twin.sparkplug import payload as json_codec
    from twin.sparkplug import protobuf as sparkplug
    from twin.sparkplug.payload import Metric, Payload

    now = int(time.time() * 1000)
    sensors = [{"name": n} for n in names] + ([{"name": "product_type", "type": "String"}] if with_type else [])
    plant = Plant.from_dict({"site": "bench", "group": "g", "lines": [{"id": "l", "machines": [
        {"id": "m1", "kind": "mill" if with_type else "engine", "node": "n1", "sensors": sensors}]}]})
    all_names = [s["name"] for s in sensors]
    aliases = sparkplug.assign_aliases("m1", all_names)

    def payload(k: int) -> Payload:
        metrics = [Metric(n, 300.0 + (k * 7 + i) % 97 / 10, "Double") for i, n in enumerate(names)]
        if with_type:
            metrics.append(Metric("product_type", "L", "String"))
        return Payload(now, k % 256, None, metrics, serial=k)

    payloads = [payload(k) for k in range(messages)]
    encoders = {"json": lambda p: p.to_json(), "protobuf": lambda p: sparkplug.encode(p, aliases=aliases, names=False)}
    birth = Payload(now, 0, None, [Metric(n, None, "String" if n == "product_type" else "Double") for n in all_names],
                    serial=0)
    out = {"metrics": len(all_names)}
    runs: dict[str, dict[str, list[float]]] = {c: {"encode": [], "decode": [], "apply": []} for c in encoders}
    wire = {c: [encoders[c](p) for p in payloads] for c in encoders}
    inverse = {alias: name for name, alias in aliases.items()}
    decoders = {"json": lambda raw: json_codec.decode("DDATA", raw, now_ms=now),
                "protobuf": lambda raw: sparkplug.decode("DDATA", raw, now_ms=now, aliases=inverse, as_values=True)}
    topic = "spBv1.0/g/DDATA/n1/m1"
    for _ in range(repeats):
        for codec in encoders:  # alternating, so both see the same load on a shared machine
            runs[codec]["encode"].append(_cpu_us(encoders[codec], payloads))
            runs[codec]["decode"].append(_cpu_us(decoders[codec], wire[codec]))
            state = TwinState(plant=plant, health_models=default_health_models())
            state.apply("spBv1.0/g/NBIRTH/n1", sparkplug.encode(Payload(now, 0, 0)), now)
            state.apply("spBv1.0/g/DBIRTH/n1/m1", sparkplug.encode(birth, aliases=aliases) if codec == "protobuf"
                        else birth.to_json(), now)
            runs[codec]["apply"].append(_cpu_us(lambda raw, s=state: s.apply(topic, raw, now), wire[codec]))
            if state.counters["ingested"] != messages or state.counters["dead_letter"]:
                raise RuntimeError(f"{codec}: {dict(state.counters)}")  # a figure for work not done is no figure
    for codec in encoders:
        out[codec] = {"bytes": statistics.median(len(r) for r in wire[codec]),
                      **{f"{k}_us": statistics.median(v) for k, v in runs[codec].items()}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    common.add_output_arguments(parser, Path("runs/bench/sparkplug_codec.json"))
    args = parser.parse_args()
    if args.messages < 1 or args.repeats < 1:
        parser.error("--messages and --repeats must be positive")
    measured_on = common.machine()
    cases = {"AI4I mill DDATA": measure(MILL, True, args.messages, args.repeats),
             "C-MAPSS engine DDATA": measure(ENGINE, False, args.messages, args.repeats)}
    print(f"{'message':22} {'metrics':>7} {'codec':>9} {'bytes':>6} {'encode us':>10} {'decode us':>10} "
          f"{'twin apply us':>14}", file=sys.stderr)
    for label, case in cases.items():
        for codec in ("json", "protobuf"):
            r = case[codec]
            print(f"{label:22} {case['metrics']:7d} {codec:>9} {r['bytes']:6.0f} {r['encode_us']:10.1f} "
                  f"{r['decode_us']:10.1f} {r['apply_us']:14.1f}", file=sys.stderr)
    common.write_results({"benchmark": "sparkplug_codec", "machine": measured_on, "args": vars(args) | {
        "out": str(args.out)}, "cases": cases}, args.out, as_json=args.json)


if __name__ == "__main__":
    main()
