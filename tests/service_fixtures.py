"""Fixtures that configure the service (shared/) for the session's local stack.

Loaded as a plugin by conftest.py, after it has pointed SSL_CERT_FILE at the stack's CA.
"""

from __future__ import annotations

import pytest

from devstack.service_settings import settings_for_host
from shared.compose import reset_services
from shared.settings import SETTING_NAMES, reset_settings
from tests.service_helpers import Users


async def configure(monkeypatch, stack, *, managed_identity: bool, **extra: str) -> None:
    """The service's settings for the stack and `extra`, none left over from the environment."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings_for_host(stack.env, managed_identity=managed_identity).items():
        if name not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
            monkeypatch.setenv(name, value)
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    await reset_services()


async def _service(stack, monkeypatch, *, managed_identity: bool):
    await configure(monkeypatch, stack, managed_identity=managed_identity)
    yield Users(stack)
    await reset_services()
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
