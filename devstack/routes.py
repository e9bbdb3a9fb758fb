"""HTTP trigger route templates, matched the way the Functions host (ASP.NET routing) does.

Supported: literal segments, `{name}`, `{name?}` (optional), `{name:int}`-style constraints,
`{name=default}` and `{*rest}` catch-alls. Literals match case-insensitively. Routes are tried in
the order the host sorts them (`compare`), so `token/refresh` wins over `token/{action}` whatever
the registration order. Paths arrive decoded as Kestrel decodes them (`kestrel_decoded_path`):
route values are not decoded again, so an encoded slash stays `%2F` inside its segment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_PARAM = re.compile(r"\{([^{}]+)\}")
_ESCAPES = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
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
    # Each segment's first part as WebJobsRouteBuilder compares them: (is a parameter, its
    # constraint count or, for a literal, its text).
    heads: tuple[tuple[bool, int | str], ...] = ()

    @classmethod
    def parse(cls, template: str) -> RouteTemplate:
        pattern, precedence, names, heads = "", [], [], []
        defaults: dict[str, str] = {}

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
            first = _PARAM.match(segment)
            heads.append((True, first.group(1).count(":")) if first else (False, _PARAM.split(segment)[0]))
        return cls(
            template,
            re.compile(pattern, re.IGNORECASE),
            tuple(precedence),
            tuple(names),
            defaults,
            tuple(heads),
        )

    def match(self, path: str) -> dict[str, str] | None:
        """Match a path relative to the route prefix, decoded as `kestrel_decoded_path` does.

        One leading and one trailing slash are ignored, as ASP.NET's template matcher ignores them;
        an empty segment anywhere else matches nothing (`/api//token` is not `/api/token`).
        """
        path = path.removeprefix("/")
        found = self.regex.fullmatch(path.removesuffix("/") if path.endswith("/") else path)
        if found is None:
            return None
        values = {
            name: value for name, value in zip(self.names, found.groups(), strict=True) if value is not None
        }
        return self.defaults | values


def compare(x: RouteTemplate, y: RouteTemplate) -> int:
    """The order in which the host tries routes (WebJobsRouteBuilder.RouteComparison, in
    Azure/azure-webjobs-sdk-extensions): segment by segment, a literal before a parameter, the
    parameter with more constraints first, literals by their text; then the longer route first.
    """
    for i, (x_param, x_key) in enumerate(x.heads):
        if i >= len(y.heads):
            return -1
        y_param, y_key = y.heads[i]
        if x_param != y_param:
            return 1 if x_param else -1
        if x_param and x_key != y_key:
            return -1 if x_key > y_key else 1  # type: ignore[operator]
        if not x_param:
            a, b = str(x_key).lower(), str(y_key).lower()
            if a != b:
                return -1 if a < b else 1
    return 1 if len(y.heads) > len(x.heads) else 0


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4, as Kestrel's PathNormalizer applies it after decoding: `..` never climbs
    above the root."""
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out) or "/"


def kestrel_decoded_path(raw_path: str) -> str:
    """A request path as ASP.NET Core's server (Kestrel) makes HttpRequest.Path of it.

    Every escape is decoded except `%2F`, which would otherwise change where segments end (an
    escape that does not decode to UTF-8 is left as it came); then dot segments are removed, so
    `%2e%2e` climbs too.
    """
    return remove_dot_segments(_percent_decoded(raw_path))


def _percent_decoded(raw_path: str) -> str:

    def decode(run: re.Match[str]) -> str:
        text = run.group(0)
        if re.fullmatch(r"(?:%2[fF])+", text):
            return text
        parts = re.split(r"(%2[fF])", text)  # a slash inside a run stays encoded
        out = []
        for part in parts:
            try:
                out.append(part if part.lower() == "%2f" else unquote_to_bytes(part).decode("utf-8"))
            except UnicodeDecodeError:
                out.append(part)
        return "".join(out)

    return _ESCAPES.sub(decode, raw_path)
