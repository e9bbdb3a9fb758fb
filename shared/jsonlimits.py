"""JSON from callers, parsed with bounds: whatever the input, a ValueError or a shallow value.

`json.loads` alone raises RecursionError for deep nesting (at a depth that depends on the
interpreter and on how deep the stack already is) and a plain ValueError, not JSONDecodeError,
for an integer over Python's 4300-digit limit: code that catches only JSONDecodeError answers
both with a 500. Here the nesting is measured before parsing, without recursion, so that nothing
we accept can overflow a stack later either (PyJWT parses the same header again; repr and logging
walk values). Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32  # our bodies, JWT headers and claims nest 3 levels at most; 32 leaves room
_SIGNIFICANT = re.compile(r'[\[\]{}"\\]')


class TooDeep(ValueError):
    """The JSON nests arrays and objects deeper than allowed."""


def too_deep(text: str, max_depth: int = MAX_DEPTH) -> bool:
    """Whether `text` nests arrays/objects more than `max_depth` levels, outside strings.

    Linear and recursion-free: it visits only brackets, quotes and backslashes. Malformed text
    gets some answer; json.loads then rejects it.
    """
    level, in_string, escaped = 0, False, -1
    for match in _SIGNIFICANT.finditer(text):
        at, char = match.start(), match.group()
        if at == escaped:
            continue  # the character after a backslash, inside a string
        if in_string:
            if char == "\\":
                escaped = at + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            level += 1
            if level > max_depth:
                return True
        elif char in "]}":
            level -= 1
    return False


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` that raises only ValueError: JSONDecodeError, UnicodeDecodeError, TooDeep, or
    the int-digit limit's ValueError."""
    if isinstance(data, bytes | bytearray):  # as json.loads decodes bytes (UTF-8, -16 or -32)
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    text = data
    if too_deep(text, max_depth):
        raise TooDeep(f"nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except RecursionError:  # cannot happen after the check above; kept as the last line of defence
        raise TooDeep(f"nested more than {max_depth} levels deep") from None
