"""Shared fixtures: one local stack (Azurite + ACS emulator + issuer + managed identity) per session.

The stack's CA is made here, at import, before anything imports aiohttp: aiohttp builds its
default TLS context once, from SSL_CERT_FILE, when it is first imported.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

assert "aiohttp" not in sys.modules, "conftest must set SSL_CERT_FILE before aiohttp is imported"

# Standard library and cryptography only; re-exported for tests that drive `devstack up` themselves.
from devstack import running  # noqa: E402
from devstack.running import REPO_ROOT, RunningStack, wait_for_env  # noqa: E402, F401
from devstack.running import stop as stop_stack  # noqa: E402, F401

TLS = running.trust_new_ca()
TLS_DIR = TLS.ca_cert.parent
pytest_plugins = ["tests.service_fixtures"]


def _show_bodies() -> None:
    """A failed `assert response.status_code == 200` prints the response: let that show the body
    (a problem's code and detail say why), for HTTP responses and for the handlers' own."""
    import azure.functions as func
    import requests

    def http_repr(self: requests.Response) -> str:
        return f"<Response [{self.status_code}] {self.text[:400]!r}>"

    def handler_repr(self: func.HttpResponse) -> str:
        return f"<HttpResponse [{self.status_code}] {(self.get_body() or b'')[:400]!r}>"

    requests.Response.__repr__ = http_repr  # type: ignore[method-assign]
    func.HttpResponse.__repr__ = handler_repr  # type: ignore[method-assign]


_show_bodies()


def start_stack(state_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`devstack up` trusting this session's CA (tests of `up` itself drive the process)."""
    return running.start(state_dir, TLS_DIR, *extra, env=env)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    running_stack = RunningStack.launch(tmp_path_factory.mktemp("devstack"), TLS_DIR)
    try:
        yield running_stack
    finally:
        running_stack.close()


@pytest.fixture
def emulator(stack: RunningStack) -> Iterator[EmulatorHooks]:
    """The emulator's test hooks, with faults cleared before and after each test."""
    hooks = EmulatorHooks(stack["acs_emulator_hooks"])
    hooks.faults(**NO_FAULTS)
    yield hooks
    hooks.faults(**NO_FAULTS)


# Revocation takes effect at once unless a test sets a propagation delay (ACS: up to 15 minutes).
NO_FAULTS = {
    "latencyMs": 0,
    "throttleRate": 0,
    "errorRate": 0,
    "down": False,
    "limits": False,
    "retryAfterSeconds": 1,
    "revocationDelaySeconds": 0,
}


class EmulatorHooks:
    def __init__(self, base: str) -> None:
        import requests

        self.base = base
        self.http = requests.Session()

    def _post(self, path: str, body: dict) -> dict:
        response = self.http.post(self.base + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict:
        response = self.http.get(self.base + "stats", timeout=10)
        response.raise_for_status()
        return response.json()

    def verify(self, token: str) -> dict:
        return self._post("tokens:verify", {"token": token})

    def faults(self, **faults) -> dict:
        return self._post("faults", faults)

    def reset(self) -> dict:
        return self._post("reset", {})


@pytest.fixture
def managed_identity_env(stack: RunningStack, monkeypatch: pytest.MonkeyPatch) -> RunningStack:
    """App Service managed-identity variables pointing at the stack's dev endpoint."""
    monkeypatch.setenv("IDENTITY_ENDPOINT", stack["identity_endpoint"])
    monkeypatch.setenv("IDENTITY_HEADER", stack["identity_header"])
    for name in ("MSI_ENDPOINT", "MSI_SECRET", "AZURE_CLIENT_ID", "IDENTITY_SERVER_THUMBPRINT"):
        monkeypatch.delenv(name, raising=False)
    return stack
