"""What an app setting is: a name, a type that reads its text, a default, a rule and a purpose.

Starlette's `Config` is the model: a setting is declared once and read from the mapping it is
given, so tests pass a dict. This module knows no setting of the app's; settings.py declares them.
A type or a rule says what is wrong in words the operator reads after "App setting NAME: ".
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlparse

from .errors import SettingError

type Rule[V] = Callable[[V], str | None]  # what is wrong with a value, or None


@dataclass(frozen=True)
class Setting[V, D]:
    """One app setting, its value a V once set; D is its default's type (a V, or None: unset).

    Unset or blank means the default; the rule checks set values only.
    """

    name: str
    parse: Callable[[str], V]  # the setting's type: its text to a value, ValueError saying why not
    default: D
    rule: Rule[V] | None
    about: str

    def read(self, env: Mapping[str, str], *, default: V | D | None = None) -> V | D:
        """The value in `env`; `default` stands in for the declared one where that depends on others."""
        raw = env.get(self.name, "").strip()
        if not raw:
            return self.default if default is None else default
        try:
            value = self.parse(raw)
        except ValueError as err:
            raise self.error(str(err)) from None
        problem = self.rule(value) if self.rule is not None else None
        if problem is not None:
            raise self.error(problem)
        return value

    def error(self, detail: str) -> SettingError:
        return SettingError(self.name, detail)


# ---- types ---------------------------------------------------------------------------------------


def text(value: str) -> str:
    return value


def lowered(value: str) -> str:
    return value.lower()


def flag(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError("must be true or false")
    return value.lower() == "true"


def integer(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"must be an integer, not {value!r}") from None


def names(value: str) -> tuple[str, ...]:
    """Comma-separated names, each once, in the order given."""
    items = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    if not items:
        raise ValueError("must list at least one value")
    return items


def is_guid(value: str, *, canonical: bool = False) -> bool:
    """A GUID in its 36-character form; `canonical`: in lower case too, as Entra writes tenant ids."""
    try:
        written = str(uuid.UUID(value))
    except ValueError:
        return False
    return len(value) == 36 and written == (value if canonical else value.lower())


# ---- rules ---------------------------------------------------------------------------------------


def choice(*choices: str) -> Rule[str]:
    def rule(value: str) -> str | None:
        return None if value in choices else f"must be {' or '.join(choices)}"

    return rule


def within(low: int, high: int, low_means: str = "") -> Rule[int]:
    """`low_means`, e.g. " (off)", follows the low bound in the message."""

    def rule(value: int) -> str | None:
        return None if low <= value <= high else f"must be from {low}{low_means} to {high}"

    return rule


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def https_url(value: str, *, http_on_loopback: bool = False) -> str | None:
    try:
        url = urlparse(value)
        url.hostname  # noqa: B018 - raises for a malformed host (an unclosed IPv6 bracket)
    except ValueError:
        return "must be an https URL"
    if url.scheme == "https" and url.hostname:
        return None
    if url.scheme == "http" and http_on_loopback and _is_loopback(url.hostname):
        return None
    return "must be an https URL" + (" (http only on loopback)" if http_on_loopback else "")
