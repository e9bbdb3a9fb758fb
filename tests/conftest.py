"""Shared fixtures: one local stack (Azurite + ACS emulator + issuer + managed identity) per session.

The stack's CA is made here, at import, before anything imports aiohttp: aiohttp builds its
default TLS context once, from SSL_CERT_FILE, when it is first imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

assert "aiohttp" not in sys.modules, "conftest must set SSL_CERT_FILE before aiohttp is imported"

from devstack.ca import create_tls_files  # noqa: E402  (cryptography only)

REPO_ROOT = Path(__file__).resolve().parent.parent
TLS_DIR = Path(tempfile.mkdtemp(prefix="devstack-tls-"))
TLS = create_tls_files(TLS_DIR)
os.environ["SSL_CERT_FILE"] = os.environ["REQUESTS_CA_BUNDLE"] = str(TLS.ca_cert)

STACK_START_TIMEOUT = 90.0
pytest_plugins = ["tests.service_fixtures"]


class RunningStack:
    """A `python -m devstack up` child process and the env.json it wrote."""

    def __init__(self, process: subprocess.Popen, state_dir: Path, env: dict) -> None:
        self.process, self.state_dir, self.env = process, state_dir, env

    def __getitem__(self, key: str):
        return self.env[key]

    def timer(self, name: str) -> str:
        """`python -m devstack timer NAME` against this stack: what it printed."""
        out = subprocess.run(
            [sys.executable, "-m", "devstack", "timer", name, "--state-dir", str(self.state_dir)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return out.stdout

    def token(self, *args: str) -> str:
        """`python -m devstack token ARGS...` against this stack: the printed JWT."""
        out = subprocess.run(
            [sys.executable, "-m", "devstack", "token", *args, "--state-dir", str(self.state_dir)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return out.stdout


def start_stack(state_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devstack",
            "up",
            "--free-ports",
            "--quiet",
            "--state-dir",
            str(state_dir),
            "--tls-dir",
            str(TLS_DIR),
            *extra,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_env(process: subprocess.Popen, state_dir: Path, timeout: float = STACK_START_TIMEOUT) -> dict:
    env_path = state_dir / "env.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _out, err = process.communicate()
            raise RuntimeError(f"devstack up exited with {process.returncode}: {err.decode()}")
        if env_path.exists():
            return json.loads(env_path.read_text())
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("devstack up did not become ready in time")


def stop_stack(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    state_dir = tmp_path_factory.mktemp("devstack")
    process = start_stack(state_dir)
    try:
        yield RunningStack(process, state_dir, wait_for_env(process, state_dir))
    finally:
        stop_stack(process)


@pytest.fixture
def emulator(stack: RunningStack) -> Iterator[EmulatorHooks]:
    """The emulator's test hooks, with faults cleared before and after each test."""
    hooks = EmulatorHooks(stack["acs_emulator_hooks"])
    hooks.faults(latencyMs=0, throttleRate=0, errorRate=0, down=False, limits=False, retryAfterSeconds=1)
    yield hooks
    hooks.faults(latencyMs=0, throttleRate=0, errorRate=0, down=False, limits=False, retryAfterSeconds=1)


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
