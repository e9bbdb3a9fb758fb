"""A local stack for one benchmark run: the same `python -m devstack up` that `make run` starts.

The stack's CA must be trusted before anything imports aiohttp (it builds its default TLS context
from SSL_CERT_FILE once, at import), so `trust_new_ca` runs first and the stack reuses that CA.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from devstack.running import RunningStack, trust_new_ca

__all__ = ["LocalStack", "trust_new_ca"]


class LocalStack:
    """`python -m devstack up --free-ports` in a temporary state folder, stopped on exit."""

    def __init__(self, tls_dir: Path) -> None:
        self.tls_dir = tls_dir
        self.state_dir = Path(tempfile.mkdtemp(prefix="bench-stack-")) / "state"
        self.running: RunningStack | None = None
        self.env: dict = {}

    def __enter__(self) -> LocalStack:
        self.running = RunningStack.launch(self.state_dir, self.tls_dir)
        self.env = self.running.env
        return self

    def __exit__(self, *_exc) -> None:
        if self.running is not None:
            self.running.close()
        shutil.rmtree(self.state_dir.parent, ignore_errors=True)
