"""Telemetry: `measure.py` is what the service counts and times, `setup.py` the export to Azure
Monitor, configured off the event loop."""

from .measure import (
    acs_client_options,
    acs_operation,
    acs_refused_here,
    counts_revocations,
    counts_tokens,
    table_operation,
    token_issued,
)
from .setup import configure, configure_in_background

__all__ = [
    "acs_client_options",
    "acs_operation",
    "acs_refused_here",
    "configure",
    "configure_in_background",
    "counts_revocations",
    "counts_tokens",
    "table_operation",
    "token_issued",
]
