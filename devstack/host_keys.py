"""Function keys, as the Functions host checks them.

The key comes from the `x-functions-key` header or, when that header is absent, the `code` query
parameter (AuthenticationLevelHandler.GetAuthorizationKeyInfoAsync in Azure/azure-functions-host:
a header that is present but empty is not followed by the query). What it grants
(SecretManager): a function key that function, a host key every function, the master key every
function and the host's admin API. A function's `authLevel` is the least it needs
(FunctionAuthorizationHandler).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from .host_functions import AUTH_LEVELS

KEY_HEADER = "x-functions-key"
KEY_QUERY = "code"


@dataclass(frozen=True)
class HostKeys:
    """The dev host's secrets: one function key (for every function), the default host key, the master key."""

    function_key: str | None = None
    host_key: str | None = None
    master_key: str | None = None

    def level(self, given: str) -> str:
        """The authorization level a presented key grants ("anonymous" for none or a wrong one)."""

        def same(secret: str | None) -> bool:
            return bool(secret) and hmac.compare_digest(given.encode(), secret.encode())  # type: ignore[union-attr]

        if not given:
            return "anonymous"
        if same(self.master_key):
            return "admin"
        if same(self.host_key) or same(self.function_key):
            return "function"
        return "anonymous"


def presented_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str:
    """The header (case-insensitive, the first if repeated), else the first `code` in the query,
    whose keys ASP.NET also compares case-insensitively."""
    if KEY_HEADER in headers:
        return headers[KEY_HEADER]
    return next((value for key, value in query.items() if key.lower() == KEY_QUERY), "")


def allows(granted: str, required: str) -> bool:
    return AUTH_LEVELS.index(granted) >= AUTH_LEVELS.index(required)
