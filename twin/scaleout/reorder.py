"""Per-device order of messages that reached the twin through different workers.

With a shared subscription the broker deals one device's messages round-robin to the workers, so
the order in which they reach the node's owner (through twin_inbox) is not the order the edge sent
them: a worker that was busy for 20 ms delivers serial 7 after another delivered serial 8. Sparkplug's
0-255 `seq` cannot be used to sort across such a window, but our `serial` (twin/SCHEMA.md: +1 per data
message of a device, never wraps) can. Within one batch of a node's messages:

- NBIRTH first (a session's birth precedes all its messages; a birth whose bdSeq already died is
  refused by the state rules whatever the order), deaths (NDEATH, DDEATH) last;
- each device's DBIRTH and DDATA take the positions its messages had, sorted by serial (a DBIRTH
  carries the serial of the data after it, and goes before that data);
- everything else keeps its position (receipt order).

Messages whose serial cannot be read keep their position; the state rules then count what is out of
order (`out_of_order`) as they do for a single twin.
"""

from __future__ import annotations

from collections import defaultdict

from twin.sparkplug.codec import decode  # JSON or Sparkplug protobuf, by the first byte
from twin.sparkplug.payload import PayloadError

FIRST, LAST = ("NBIRTH",), ("NDEATH", "DDEATH")
SERIALLED = ("DBIRTH", "DDATA")


def _serial(kind: str, raw: bytes) -> int | None:
    try:
        # no clock or size window: this read only orders; the state's own decode applies every check
        return decode(kind, raw, now_ms=None).serial
    except (PayloadError, TypeError, ValueError):
        return None


def apply_order(messages: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """`messages` (topic, payload) in receipt order -> the order to apply them in (see the module doc)."""
    nodes: dict[str, tuple[list, list, list]] = defaultdict(lambda: ([], [], []))
    for topic, raw in messages:
        parts = topic.split("/")
        kind, node = (parts[2], parts[3]) if len(parts) >= 4 else ("", "")
        first, middle, last = nodes[node]
        (first if kind in FIRST else last if kind in LAST else middle).append((topic, raw, kind, parts))
    out: list[tuple[str, bytes]] = []
    for first, middle, last in nodes.values():
        by_device: dict[str, list[int]] = defaultdict(list)
        for i, (_, _, kind, parts) in enumerate(middle):
            if kind in SERIALLED and len(parts) == 5:
                by_device[parts[4]].append(i)
        ordered = list(middle)
        for positions in by_device.values():
            if len(positions) < 2:
                continue  # the common case at a few messages per device and batch: nothing to read or sort
            keyed = [(serial, middle[i][2] == "DDATA", i) for i in positions
                     if (serial := _serial(middle[i][2], middle[i][1])) is not None]
            slots = [i for _, _, i in keyed]  # messages whose serial cannot be read keep their place
            for slot, (_, _, i) in zip(slots, sorted(keyed), strict=True):
                ordered[slot] = middle[i]
        out += [(topic, raw) for topic, raw, _, _ in first + ordered + last]
    return out
