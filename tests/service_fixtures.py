"""Fixtures that configure the service (shared/) for the session's local stack.

Loaded as a plugin by conftest.py, after it has pointed SSL_CERT_FILE at the stack's CA.
"""

from __future__ import annotations

import pytest

from devstack.service_settings import settings_for_host
from shared.clients import reset_clients
from shared.settings import reset_settings
from tests.service_helpers import Users

SETTING_NAMES = (
    "AUTH_MODE",
    "AUTH_ISSUER",
    "AUTH_AUDIENCE",
    "ACS_ENDPOINT",
    "ACS_CONNECTION_STRING",
    "TABLES_ENDPOINT",
    "TABLES_CONNECTION_STRING",
    "TOKEN_ALLOWED_SCOPES",
    "TOKEN_DEFAULT_SCOPES",
    "TOKEN_DEFAULT_MINUTES",
    "IDENTITY_TABLE",
    "AZURE_CLIENT_ID",
    "IDENTITY_RETENTION_DAYS",
    "EVENTS_REVOKE_ON_USER_UPDATED",
    "EVENTS_USER_DELETED_TYPES",
    "EVENTS_CREDENTIALS_CHANGED_TYPES",
    "RATE_LIMIT_PER_MINUTE",
    "TEAMS_CLIENT_APP_ID",
    "DEMO_PAGE_ENABLED",
)


async def configure(monkeypatch, stack, *, managed_identity: bool, **extra: str) -> None:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings_for_host(stack.env, managed_identity=managed_identity).items():
        if name not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            monkeypatch.setenv(name, value)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    await reset_clients()


async def _service(stack, monkeypatch, *, managed_identity: bool):
    await configure(monkeypatch, stack, managed_identity=managed_identity)
    yield Users(stack)
    await reset_clients()
    reset_settings()


@pytest.fixture
async def service(stack, emulator, monkeypatch):
    """The service configured for the stack with keys (connection strings)."""
    async for users in _service(stack, monkeypatch, managed_identity=False):
        yield users


@pytest.fixture
async def keyless_service(stack, emulator, monkeypatch):
    """The service configured with endpoints only: managed identity for ACS and Storage."""
    async for users in _service(stack, monkeypatch, managed_identity=True):
        yield users
