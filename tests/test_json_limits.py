"""Bounded JSON parsing (shared/jsonlimits.py) and the parsers built on it, as pure functions.

Over HTTP the 16 KB limits cap nesting near 8000 levels, which this interpreter's json happens to
survive; these call the parsers with 20,000 levels, which it does not, to show the bound holds
whatever the interpreter's own limit (tests/test_fuzz_api.py and test_jwt_attacks.py go over HTTP).
"""

from __future__ import annotations

import base64
import json

import pytest

from shared import jsonlimits
from shared.auth import unverified_segment
from shared.errors import BadRequest
from shared.policy import parse_json_object

DEEPER_THAN_THE_INTERPRETER = 20_000


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_the_interpreter_itself_overflows_at_this_depth():
    """The premise: without the bound, these inputs raise RecursionError (a 500 in a handler)."""
    with pytest.raises(RecursionError):
        json.loads(_nested(DEEPER_THAN_THE_INTERPRETER))


@pytest.mark.parametrize(
    ("text", "deep"),
    [
        (_nested(32), False),
        (_nested(33), True),
        ('{"a":' * 33 + "1" + "}" * 33, True),
        ('["' + "[" * 100 + '"]', False),  # brackets inside a string do not nest
        ('["\\"' + "[" * 100 + '"]', False),  # nor after an escaped quote
        ('["\\\\"' + ",[" * 40 + "]" * 40 + "]", True),  # an escaped backslash ends no string
        ("", False),
    ],
)
def test_depth_is_measured_outside_strings(text, deep):
    assert jsonlimits.too_deep(text) is deep


@pytest.mark.parametrize(
    "data",
    [
        _nested(DEEPER_THAN_THE_INTERPRETER).encode(),
        b'{"n":' + b"9" * 5000 + b"}",
        b"\xff\xfe\xff",
        b"{",
    ],
)
def test_loads_raises_only_value_error(data):
    with pytest.raises(ValueError):
        jsonlimits.loads(data)


def test_loads_reads_what_json_reads():
    for data in (b'{"a": [1, {"b": "x\\\\"}], "c": null}', '"\u00e9"'.encode("utf-16"), b"1e999"):
        assert jsonlimits.loads(data) == json.loads(data)


def test_a_jwt_segment_nested_past_the_interpreter_is_not_a_jwt():
    segment = base64.urlsafe_b64encode(_nested(DEEPER_THAN_THE_INTERPRETER).encode()).decode().rstrip("=")
    assert unverified_segment(f"{segment}.e30.sig", 0) is None


@pytest.mark.parametrize(
    "body",
    [_nested(DEEPER_THAN_THE_INTERPRETER).encode(), b'{"expiresInMinutes":' + b"9" * 5000 + b"}"],
)
def test_a_body_past_the_parsers_limits_is_a_400(body):
    with pytest.raises(BadRequest) as caught:
        parse_json_object(body, max_bytes=len(body))
    assert caught.value.status == 400 and caught.value.code == "invalid_json"
