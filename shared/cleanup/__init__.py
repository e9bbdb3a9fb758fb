"""The cleanup timer (`runner.Cleanup`): queued work (`pending`), retention (`retention`), the dry
run (`preview`); `common` holds what the parts share."""

from .common import LEASE, MAX_BACKOFF, TIMER_OPTIONS, backoff
from .pending import BLOCK_GRACE, LATE_WRITE_GRACE
from .retention import ACS_DELETE_DEADLINE, PROBE_DEADLINE, PROBE_OPTIONS, RETIRE_GRACE
from .runner import EVENT_MEMORY, Cleanup

__all__ = [
    "ACS_DELETE_DEADLINE",
    "BLOCK_GRACE",
    "EVENT_MEMORY",
    "LATE_WRITE_GRACE",
    "LEASE",
    "MAX_BACKOFF",
    "PROBE_DEADLINE",
    "PROBE_OPTIONS",
    "RETIRE_GRACE",
    "TIMER_OPTIONS",
    "Cleanup",
    "backoff",
]
