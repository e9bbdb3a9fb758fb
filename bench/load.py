"""Closed-loop load: `concurrency` workers run `n` operations in total, each timed on its own."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

Operation = Callable[[int], Awaitable[object]]


@dataclass
class Run:
    ops: int
    concurrency: int
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, one per completed operation
    errors: int = 0
    first_error: str = ""

    def summary(self) -> dict:
        ordered = sorted(self.latencies)
        return {
            "ops": self.ops,
            "concurrency": self.concurrency,
            "seconds": round(self.elapsed, 3),
            "throughput": round(len(ordered) / self.elapsed, 1) if self.elapsed else 0.0,
            "p50_ms": round(percentile(ordered, 50) * 1000, 2),
            "p99_ms": round(percentile(ordered, 99) * 1000, 2),
            "errors": self.errors,
            **({"first_error": self.first_error} if self.first_error else {}),
        }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values (0 for none)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def closed_loop(operation: Operation, n: int, concurrency: int) -> Run:
    """Operation i for i in 0..n-1, at most `concurrency` at once; each worker starts its next
    operation as soon as its last one ends, as callers holding a connection each would."""
    run = Run(ops=n, concurrency=concurrency)
    indexes = itertools.count()

    async def worker() -> None:
        while (i := next(indexes)) < n:
            started = time.perf_counter()
            try:
                await operation(i)
            except Exception as err:  # noqa: BLE001 - counted and reported, the run goes on
                run.errors += 1
                run.first_error = run.first_error or f"{type(err).__name__}: {err}"[:300]
                continue
            run.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    run.elapsed = time.perf_counter() - started
    return run
