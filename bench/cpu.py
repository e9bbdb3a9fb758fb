"""CPU time of the stack's processes (Linux /proc), to show which one limits throughput."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
MACHINE = "machine"
OTHERS = "other processes"


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of one process (its threads included), None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def machine_busy_seconds() -> float:
    """CPU seconds all processes spent busy (every core), from /proc/stat; 0 where unreadable."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stack_processes(stack_pid: int | None) -> dict[str, int]:
    """{label: pid}: this process, `devstack up` (emulator, issuer, MSI), Azurite, dev host, worker."""
    pids = {"bench (client, floor, in-process service)": os.getpid()}
    if stack_pid is None or cpu_seconds(stack_pid) is None:
        return pids
    pids["devstack up (ACS emulator, issuer, MSI)"] = stack_pid
    for child in _children(stack_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "azurite" in cmdline:
            pids["Azurite (node)"] = child
        elif "devstack host" in cmdline:
            pids["dev host (HTTP front)"] = child
            for worker in _children(child):  # the Python worker: azure-functions-runtime and the service
                pids["worker (runtime + service)"] = worker
    return pids


class CpuMeter:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, float]:
        sample = {label: cpu_seconds(pid) or 0.0 for label, pid in self.pids.items()}
        sample[MACHINE] = machine_busy_seconds()
        return sample

    @staticmethod
    def usage(before: dict[str, float], after: dict[str, float], seconds: float, ops: int) -> dict:
        """Per process: cores busy (CPU seconds / wall seconds) and CPU milliseconds per operation;
        OTHERS is what the rest of the machine used meanwhile (noise, if it is not ~0)."""
        used = {label: after[label] - before[label] for label in before}
        used[OTHERS] = max(0.0, used.pop(MACHINE) - sum(used.values()))
        return {
            label: {
                "cores": round(value / seconds, 2) if seconds else 0.0,
                "cpu_ms_per_op": round(value * 1000 / ops, 3) if ops else 0.0,
            }
            for label, value in used.items()
        }
