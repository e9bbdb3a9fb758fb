"""Child processes of `devstack up` (Azurite, the dev host): none may outlive the stack."""

from __future__ import annotations

import ctypes
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path


def die_with_parent() -> None:
    """Ask Linux to SIGTERM the child if `devstack up` dies without cleaning up (even by SIGKILL).

    Meant as `preexec_fn`; together with `process_group=0` (so Ctrl-C reaches only us, and we stop
    the children in order), it is what keeps a killed stack from leaving servers behind.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop(process: subprocess.Popen, timeout: float = 5.0) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def spawn(
    command: list[str], *, cwd: Path, log_path: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen:
    """Start a child that logs to `log_path` and dies with us.

    Must be called from the main thread: the parent-death signal follows the creating thread.
    """
    log = log_path.open("wb")
    try:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
            process_group=0,
        )
    finally:
        log.close()
