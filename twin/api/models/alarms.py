"""An alarm occurrence with its ISA-18.2 state: the fields of twin.domain.alarms.Alarm, read from the dataclass so
that the API cannot drift from what the twin stores and sends (Alarm.to_dict)."""

from __future__ import annotations

from dataclasses import fields
from typing import get_type_hints

from pydantic import create_model

from twin.domain.alarms import Alarm, AlarmState

_TYPES = get_type_hints(Alarm)
# to_dict sends every field, so the schema requires each; acked_role, added later, it has always published as
# optional (default None), and keeps so
_OPTIONAL = {"acked_role"}

AlarmOut = create_model(
    "AlarmOut", __module__=__name__,
    **{f.name: (_TYPES[f.name], f.default if f.name in _OPTIONAL else ...) for f in fields(Alarm)},
    state=(AlarmState, ...))
