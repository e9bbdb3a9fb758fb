"""A `python -m devstack up` child process, for tests and benchmarks that need a whole stack.

Light on purpose (standard library, plus cryptography for the CA): callers import it before
aiohttp, because aiohttp builds its default TLS context from SSL_CERT_FILE once, at import, and
the stack's CA must be trusted by then. `trust_new_ca` makes that CA; stacks reuse it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .ca import TlsFiles, create_tls_files
from .layout import ENV_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 90.0


def trust_new_ca(prefix: str = "devstack-tls-") -> TlsFiles:
    """Make a CA and loopback certificate in a temporary folder and trust it in this process."""
    if "aiohttp" in sys.modules:
        raise RuntimeError("trust the stack's CA before aiohttp is imported: it reads SSL_CERT_FILE once")
    tls = create_tls_files(Path(tempfile.mkdtemp(prefix=prefix)))
    os.environ["SSL_CERT_FILE"] = os.environ["REQUESTS_CA_BUNDLE"] = str(tls.ca_cert)
    return tls


def start(
    state_dir: Path, tls_dir: Path, *extra: str, env: dict | None = None, stdout=subprocess.PIPE
) -> subprocess.Popen:
    """`devstack up` on free ports with the given CA; returns at once (see `wait_for_env`)."""
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
            str(tls_dir),
            *extra,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
    )


def wait_for_env(process: subprocess.Popen, state_dir: Path, timeout: float = START_TIMEOUT_SECONDS) -> dict:
    """The env.json the stack writes once everything answers; raises with its stderr if it dies."""
    env_path = state_dir / ENV_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _out, err = process.communicate()
            raise RuntimeError(
                f"devstack up exited with {process.returncode}: {err.decode(errors='replace')}"
            )
        if env_path.exists():
            return json.loads(env_path.read_text())
        time.sleep(0.1)
    stop(process)
    raise RuntimeError("devstack up did not become ready in time")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM (the stack stops its children), then SIGKILL if it does not finish in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class RunningStack:
    """A started stack: its env.json values by key, and its command-line helpers."""

    def __init__(self, process: subprocess.Popen, state_dir: Path, env: dict) -> None:
        self.process, self.state_dir, self.env = process, state_dir, env

    @classmethod
    def launch(cls, state_dir: Path, tls_dir: Path, *extra: str) -> RunningStack:
        process = start(state_dir, tls_dir, *extra, stdout=subprocess.DEVNULL)
        return cls(process, state_dir, wait_for_env(process, state_dir))

    def close(self) -> None:
        stop(self.process)

    def __getitem__(self, key: str):
        return self.env[key]

    def _devstack(self, *args: str, timeout: float) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "devstack", *args, "--state-dir", str(self.state_dir)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )
        return out.stdout

    def token(self, *args: str) -> str:
        """`python -m devstack token ARGS...` against this stack: the printed JWT."""
        return self._devstack("token", *args, timeout=30)

    def timer(self, name: str, *args: str) -> str:
        """`python -m devstack timer NAME ARGS...` against this stack: what it printed."""
        return self._devstack("timer", name, *args, timeout=120)
