"""The parts of host.json the dev host applies, read as the Functions host reads them.

Any host.json value can be overridden by an app setting named `AzureFunctionsJobHost__<path>`
(`__` for each level), as in Azure; e.g. AzureFunctionsJobHost__functionTimeout=00:00:05.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

OVERRIDE_PREFIX = "AzureFunctionsJobHost__"
DEFAULT_ROUTE_PREFIX = "api"
# Flex Consumption's default when host.json sets none (ScriptJobHostOptionsSetup.DefaultFunctionTimeout).
DEFAULT_FUNCTION_TIMEOUT = 30 * 60.0
MIN_FUNCTION_TIMEOUT = 1.0  # ScriptJobHostOptionsSetup.MinFunctionTimeout; Flex has no maximum
_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d+))?$")


def parse_function_timeout(text: str) -> float | None:
    """functionTimeout as the host validates it: at least a second, or -1 for none (Flex allows it)."""
    seconds = parse_timespan(text)
    if seconds is not None and seconds < MIN_FUNCTION_TIMEOUT:
        raise ValueError(
            f"functionTimeout must be greater than 00:00:01 and less than unbounded (got {text!r})"
        )
    return seconds


def parse_timespan(text: str) -> float | None:
    """A .NET TimeSpan ("[d.]hh:mm:ss[.fff]") in seconds; "-1" means no limit (None)."""
    text = text.strip()
    if text == "-1":
        return None
    found = _TIMESPAN.match(text)
    if not found:
        raise ValueError(f"functionTimeout {text!r} is not a TimeSpan like 00:05:00")
    days, hours, minutes, seconds, fraction = found.groups()
    total = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(seconds)
    return total + (float(f"0.{fraction}") if fraction else 0.0)


@dataclass(frozen=True)
class HostConfig:
    function_timeout: float | None = DEFAULT_FUNCTION_TIMEOUT  # seconds; None: unlimited
    route_prefix: str = DEFAULT_ROUTE_PREFIX

    @classmethod
    def load(cls, app_dir: Path, environ: Mapping[str, str]) -> HostConfig:
        path = app_dir / "host.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        timeout = environ.get(OVERRIDE_PREFIX + "functionTimeout", data.get("functionTimeout"))
        prefix = environ.get(
            OVERRIDE_PREFIX + "extensions__http__routePrefix",
            ((data.get("extensions") or {}).get("http") or {}).get("routePrefix", DEFAULT_ROUTE_PREFIX),
        )
        return cls(
            function_timeout=DEFAULT_FUNCTION_TIMEOUT
            if timeout is None
            else parse_function_timeout(str(timeout)),
            route_prefix=str(prefix).strip("/"),
        )
