"""Fixtures that configure the service (shared/) for the session's local stack.

Loaded as a plugin by conftest.py, after it has pointed SSL_CERT_FILE at the stack's CA.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from devstack.service_settings import settings_for_host
from shared.compose import acs_client, compose, install, reset_services, table_client
from shared.settings import SETTING_NAMES, get_settings, reset_settings
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


async def trust_only(monkeypatch, entries: list[dict]) -> None:
    """AUTH_ISSUERS = `entries`, in place of the stack's AUTH_ISSUER and its three settings."""
    import json

    from shared.settings import SINGLE_ISSUER

    for single in SINGLE_ISSUER:
        monkeypatch.delenv(single.name, raising=False)
    monkeypatch.setenv("AUTH_ISSUERS", json.dumps(entries))
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


class ClientCalls:
    """An SDK client of the service's (Table Storage, ACS Identity) with chosen calls replaced:
    what a test injects through compose's seams (shared/compose.py) to fail, hold or count a call.
    `Pause` (tests/test_retention.py) holds a call of it as of any object."""

    def __init__(self, real) -> None:
        self.real = real
        self.replaced: dict[str, object] = {}

    def __getattr__(self, name: str):
        return self.replaced.get(name) or getattr(self.real, name)

    def replace(self, **calls) -> None:
        """From now on, `name` is `call` (which may call `self.real.name`)."""
        self.replaced.update(calls)

    @contextmanager
    def replacing(self, **calls):
        """`replace` for the block only."""
        self.replace(**calls)
        try:
            yield self
        finally:
            for name in calls:
                self.replaced.pop(name, None)


@dataclass
class Seams:
    table: ClientCalls
    acs: ClientCalls


@pytest.fixture
async def seams(service) -> Seams:
    """`service`, serving with Table and ACS clients whose calls a test may replace or hold."""
    settings = get_settings()
    injected = Seams(ClientCalls(table_client(settings)), ClientCalls(acs_client(settings)))
    install(compose(settings, table=injected.table, acs=injected.acs))
    return injected


@pytest.fixture
def table_calls(seams: Seams) -> ClientCalls:
    return seams.table


@pytest.fixture
def acs_calls(seams: Seams) -> ClientCalls:
    return seams.acs
