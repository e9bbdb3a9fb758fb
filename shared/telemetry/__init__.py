"""Telemetry: `measure.py` is what the service counts and times, `setup.py` the export to Azure
Monitor, configured off the event loop."""

from .measure import (
    acs_operation,
    acs_refused_here,
    acs_throttled,
    counts_revocations,
    counts_tokens,
    table_operation,
    token_issued,
)
from .setup import configure, configure_in_background

__all__ = [
    "acs_operation",
    "acs_refused_here",
    "acs_throttled",
    "configure",
    "configure_in_background",
    "counts_revocations",
    "counts_tokens",
    "table_operation",
    "token_issued",
]
