"""HTTP trigger route templates, matched the way the Functions host (ASP.NET routing) does.

Supported: literal segments, `{name}`, `{name?}` (optional), `{name:int}`-style constraints,
`{name=default}` and `{*rest}` catch-alls. Literals match case-insensitively and a literal segment
beats a parameter, so `token/refresh` wins over `token/{action}` whatever the registration order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_PARAM = re.compile(r"\{([^{}]+)\}")
_CONSTRAINTS = {
    "int": r"-?\d+",
    "long": r"-?\d+",
    "alpha": r"[A-Za-z]+",
    "bool": r"(?i:true|false)",
    "guid": r"\{?[0-9A-Fa-f]{8}-?(?:[0-9A-Fa-f]{4}-?){3}[0-9A-Fa-f]{12}\}?",
}
# Precedence of a segment's kind, lower first (ASP.NET's route "order").
_LITERAL, _CONSTRAINED, _PLAIN, _OPTIONAL, _CATCH_ALL = range(5)


@dataclass(frozen=True)
class _Param:
    name: str
    pattern: str
    kind: int
    default: str | None


def _parse_param(spec: str) -> _Param:
    catch_all = spec.startswith("*")
    spec = spec.lstrip("*")
    spec, _, default = spec.partition("=")
    optional = spec.endswith("?")
    name, *constraints = spec.rstrip("?").split(":")
    pattern = ".*" if catch_all else "[^/]+"
    for constraint in constraints:
        pattern = _CONSTRAINTS.get(constraint.split("(")[0].lower(), pattern)
    if catch_all:
        kind = _CATCH_ALL
    elif optional or default:
        kind = _OPTIONAL
    else:
        kind = _CONSTRAINED if constraints else _PLAIN
    return _Param(name, pattern, kind, default or None)


@dataclass(frozen=True)
class RouteTemplate:
    """A compiled template; `match` returns the route params, URL-decoded, or None."""

    template: str
    regex: re.Pattern[str]
    precedence: tuple[int, ...]
    names: tuple[str, ...]
    defaults: dict[str, str]

    @classmethod
    def parse(cls, template: str) -> RouteTemplate:
        pattern, precedence, names, defaults = "", [], [], {}

        def group(param: _Param) -> str:  # positional: a route param name need not be an identifier
            names.append(param.name)
            return f"({param.pattern})"

        for i, segment in enumerate(template.strip("/").split("/")):
            params = [_parse_param(m.group(1)) for m in _PARAM.finditer(segment)]
            slash = "/" if i else ""
            if _PARAM.fullmatch(segment) and params[0].kind in (_OPTIONAL, _CATCH_ALL):
                pattern += f"(?:{slash}{group(params[0])})?"
            else:
                pieces = _PARAM.split(segment)  # literals at even indexes, parameter specs at odd
                pattern += slash + "".join(
                    re.escape(piece) if j % 2 == 0 else group(params[j // 2])
                    for j, piece in enumerate(pieces)
                )
            precedence.append(max((p.kind for p in params), default=_LITERAL))
            defaults |= {p.name: p.default for p in params if p.default is not None}
        return cls(template, re.compile(pattern, re.IGNORECASE), tuple(precedence), tuple(names), defaults)

    def match(self, path: str) -> dict[str, str] | None:
        """Match a raw (still percent-encoded) path relative to the route prefix."""
        found = self.regex.fullmatch(path.strip("/"))
        if found is None:
            return None
        values = {
            name: unquote(value)
            for name, value in zip(self.names, found.groups(), strict=True)
            if value is not None
        }
        return self.defaults | values
