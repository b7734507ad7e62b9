"""Which encoding a Sparkplug payload travels in: protobuf (Sparkplug B, the default) or our JSON.

Decoding needs no setting: a payload whose first non-blank byte is `{` or `[` is JSON (an array is
then refused as not an object), anything else is protobuf. That cannot misread a Sparkplug
payload: its first byte is a field tag, and `{` (0x7B) or `[` (0x5B) would be field 15 or 11 as a
group, which the schema has not; the blanks (0x09, 0x0A, 0x0D, 0x20) would be a timestamp or uuid
of the wrong wire type. So one twin reads edges of both kinds; the setting
(`TwinConfig.payload`, `EdgeConfig.payload`) picks what a side sends.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from twin.sparkplug import payload as json_codec
from twin.sparkplug import protobuf
from twin.sparkplug.payload import DEFAULT_LIMITS, SEQ_MODULUS, Limits, Payload

CODECS = ("protobuf", "json")
DEFAULT_CODEC = "protobuf"
_BLANKS = b" \t\r\n"
_JSON_STARTS = (b"{", b"[")
_JSON_FIRST, _BLANK_BYTES = frozenset(b"{["), frozenset(_BLANKS)


def check_codec(name: str, owner: str) -> None:
    if name not in CODECS:
        raise ValueError(f"{owner}.payload must be one of {', '.join(CODECS)}, got {name!r}")


def is_json(raw: bytes) -> bool:
    if not raw:
        return False
    first = raw[0]  # an int: no one-byte slice per message
    return first in _JSON_FIRST or (first in _BLANK_BYTES and raw.lstrip(_BLANKS)[:1] in _JSON_STARTS)


def decode(kind: str, raw: bytes, *, now_ms: int | None = None, limits: Limits = DEFAULT_LIMITS,
           aliases: Mapping[int, str] | None = None, as_values: bool = False) -> Payload:
    """twin.sparkplug.payload.decode or twin.sparkplug.protobuf.decode (which names alias-only metrics from
    `aliases`, and may give a data message's metrics as Payload.values: `as_values`), by the payload's
    first byte (see the module's docstring)."""
    if is_json(raw):
        return json_codec.decode(kind, raw, now_ms=now_ms, limits=limits)
    return protobuf.decode(kind, raw, now_ms=now_ms, limits=limits, aliases=aliases, as_values=as_values)


def encode(payload: Payload, codec: str, *, aliases: Mapping[str, int] | None = None, names: bool = True) -> bytes:
    """The payload's bytes in `codec`; aliases apply to protobuf only (our JSON names every metric)."""
    if codec == "json":
        return payload.to_json()
    return protobuf.encode(payload, aliases=aliases, names=names)


def with_seq(raw: bytes, seq: int) -> bytes:
    """An encoded payload (either codec, told apart as `decode` does) with its Sparkplug `seq` set.

    An edge node's seq is one counter over all its messages, so it is known only when a message is
    published, not when it is made (a DDATA waits in the spool, and a resend after a reconnect follows
    a new NBIRTH): payloads are encoded without it and stamped here. Raises ValueError outside 0-255."""
    if type(seq) is not int or not 0 <= seq < SEQ_MODULUS:
        raise ValueError(f"seq must be an integer in 0..{SEQ_MODULUS - 1}, got {seq!r}")
    if not is_json(raw):
        return protobuf.with_seq(raw, seq)
    # the stdlib, as Payload.to_json wrote it (it may hold a NaN, which orjson would refuse); key order kept
    obj = json.loads(raw)
    if not isinstance(obj, dict):
        raise ValueError("a JSON payload must be an object")
    obj["seq"] = seq
    return json.dumps(obj, separators=(",", ":")).encode()
