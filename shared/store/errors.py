"""The store's errors: a Table Storage failure named by what the caller can do about it.

`table.py` raises only these, never azure-core's; the HTTP layer answers every one with 503
(shared/http/problems.py). No SDK import here: importing it stays as light as `shared.errors`.
"""

from __future__ import annotations

# Answers that say a backing service is overloaded or failing, not that the request was wrong.
BUSY = (429, 500, 502, 503, 504)


class StoreError(Exception):
    """Table Storage did not do what was asked. `status_code` is its answer (None: no answer)."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class Unanswered(StoreError):
    """No answer that says what happened (a timeout, 408, 5xx): the write may have landed, or
    still may. Settle it from what the table holds, not from this."""


class Unreachable(Unanswered):
    """Table Storage could not be reached: the connection failed, or the answer never came."""


class Refused(StoreError):
    """A clear no (4xx): the write did not land and never will."""


class AlreadyExists(Refused):
    """An insert found the row there already (409)."""


class Changed(Refused):
    """The row changed since it was read (412, its etag): read it again and decide again."""


class Missing(Refused):
    """No such row (404), where the caller needs to know."""
