"""The request and response bodies of the twin's REST API (they are its OpenAPI schema).

Requests are bounded at the door: every number has a range that the simulation can compute
without overflow or an unbounded run time (422 otherwise). Responses are declared so that the
schema says what the API returns, and schemathesis checks it does (tests/twin/api/test_api_fuzz.py);
floats a feed made NaN or infinite serialise as null, hence `float | None` where values come from
outside. Objects the other parts of the twin may grow (stats, dead letters) allow extra keys.
"""
