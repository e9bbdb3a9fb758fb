"""A local stack for one benchmark run: the same `python -m devstack up` that `make run` starts.

The stack's CA must be trusted before anything imports aiohttp (it builds its default TLS context
from SSL_CERT_FILE once, at import), so `trust_new_ca` runs first and the stack reuses that CA.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 90.0


def trust_new_ca() -> Path:
    """Make a CA and a loopback server certificate in a temporary folder and trust it; return the folder."""
    if "aiohttp" in sys.modules:
        raise RuntimeError("trust_new_ca() must run before aiohttp is imported")
    from devstack.ca import create_tls_files  # cryptography only

    folder = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    tls = create_tls_files(folder)
    os.environ["SSL_CERT_FILE"] = os.environ["REQUESTS_CA_BUNDLE"] = str(tls.ca_cert)
    return folder


class LocalStack:
    """`python -m devstack up --free-ports` in a temporary state folder, stopped on exit."""

    def __init__(self, tls_dir: Path) -> None:
        self.tls_dir = tls_dir
        self.state_dir = Path(tempfile.mkdtemp(prefix="bench-stack-")) / "state"
        self.process: subprocess.Popen | None = None
        self.env: dict = {}

    def __enter__(self) -> LocalStack:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devstack",
                "up",
                "--free-ports",
                "--quiet",
                "--state-dir",
                str(self.state_dir),
                "--tls-dir",
                str(self.tls_dir),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        env_path = self.state_dir / "env.json"
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not env_path.exists():
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"devstack up exited with {self.process.returncode}: {err}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("devstack up did not become ready in time")
            time.sleep(0.1)
        self.env = json.loads(env_path.read_text())
        return self

    def __exit__(self, *_exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.state_dir.parent, ignore_errors=True)
