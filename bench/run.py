"""One benchmark run against a running local stack: throughput, calls per operation, cold start.

Floor, handler level, worker level and end to end run against the same stack, interleaved in rounds (the
order rotates each round) so that noise from the machine hits all three alike; throughput is the
median over rounds and each ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from . import coldstart
from .backends import EndToEnd, Floor, HandlerLevel, WorkerLevel, service_environment
from .counting import AcsCounter, TableCountingProxy, summarize
from .cpu import CpuMeter, stack_processes
from .filing import filing_cost
from .load import Operation, closed_loop, percentile
from .storm import StormConfig, storm
from .users import Users

MODES = ("floor", "handler", "e2e")


@dataclass(frozen=True)
class Config:
    concurrency: tuple[int, ...] = (1, 16, 64)
    refresh_ops: dict[int, int] = field(default_factory=lambda: {1: 200, 16: 1000, 64: 1500})
    issue_ops: dict[int, int] = field(default_factory=lambda: {1: 80, 16: 300, 64: 400})
    rounds: int = 5  # refresh, where the targets are
    issue_rounds: int = 3  # each first issue creates an identity: fewer rounds keep the run short
    pool: int = 128  # users whose tokens are refreshed, round robin
    count_operations: int = 5  # operations of each kind for the call counts
    filing_ops: int = 300  # index filings per round, each way (bench/filing.py)
    filing_concurrency: int = 16
    coldstart_repeats: int = 5
    storm: StormConfig = field(default_factory=StormConfig)  # bench/storm.py
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        """Seconds, not minutes: proves the code runs end to end; its numbers mean nothing."""
        return cls(
            concurrency=(1, 4),
            refresh_ops={1: 6, 4: 12},
            issue_ops={1: 3, 4: 8},
            rounds=1,
            issue_rounds=1,
            pool=8,
            count_operations=2,
            filing_ops=6,
            filing_concurrency=4,
            coldstart_repeats=1,
            storm=StormConfig.quick(),
            quick=True,
        )


Log = Callable[[str], None]


async def _gather_limited(calls: list, limit: int = 16) -> list:
    gate = asyncio.Semaphore(limit)

    async def one(call):
        async with gate:
            return await call()

    return await asyncio.gather(*(one(call) for call in calls))


def _summarize_mode(runs: list, cpu: list[dict]) -> dict:
    latencies = sorted(latency for run in runs for latency in run.latencies)
    summaries = [run.summary() for run in runs]
    result = {
        "throughput": round(statistics.median(s["throughput"] for s in summaries), 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "ops_per_round": runs[0].ops,
        "rounds": [s["throughput"] for s in summaries],
        "errors": sum(s["errors"] for s in summaries),
    }
    first_error = next((s["first_error"] for s in summaries if "first_error" in s), None)
    if first_error:
        result["first_error"] = first_error
    labels = cpu[0].keys() if cpu else ()
    result["cpu"] = {
        label: {
            key: round(statistics.median(c[label][key] for c in cpu), 3) for key in ("cores", "cpu_ms_per_op")
        }
        for label in labels
    }
    return result


async def compare(
    make: dict[str, Callable[[int], tuple[Operation, Operation]]],
    n: int,
    concurrency: int,
    rounds: int,
    meter: CpuMeter,
) -> dict:
    """Each round runs every mode once (a warm-up, then `n` timed operations)."""
    runs: dict[str, list] = {mode: [] for mode in make}
    cpu: dict[str, list] = {mode: [] for mode in make}
    ratios: dict[str, list[float]] = {mode: [] for mode in make if mode != "floor"}
    order = list(make)
    for round_no in range(rounds):
        shift = round_no % len(order)
        for mode in order[shift:] + order[:shift]:
            warm, timed = make[mode](round_no)
            await closed_loop(warm, 2 * concurrency, concurrency)
            gc.collect()  # garbage of the last run is not this run's cost
            before = meter.sample()
            run = await closed_loop(timed, n, concurrency)
            cpu[mode].append(meter.usage(before, meter.sample(), run.elapsed, len(run.latencies)))
            runs[mode].append(run)
        floor = runs["floor"][-1].summary()["throughput"]
        for mode in ratios:
            ratios[mode].append(runs[mode][-1].summary()["throughput"] / floor if floor else 0.0)
    result = {mode: _summarize_mode(runs[mode], cpu[mode]) for mode in make}
    for mode, values in ratios.items():
        result[mode]["ratio_to_floor"] = round(statistics.median(values), 3)
        result[mode]["ratio_rounds"] = [round(v, 3) for v in values]
    return result


async def throughput(env: dict, users: Users, config: Config, meter: CpuMeter, log: Log) -> dict:
    out: dict = {"refresh": {}, "first_issue": {}}
    with service_environment(env):
        async with HandlerLevel() as handler, WorkerLevel() as worker, Floor(env) as floor:
            names = [f"pool-{i}" for i in range(config.pool)]
            tokens = [users.token(name) for name in names]
            keys = [users.key_of(name) for name in names]
            created = await _gather_limited([lambda t=t: handler.call("issue_token", t) for t in tokens])
            ids = [json.loads(response.get_body())["communicationUserId"] for response in created]
            size = len(names)

            def floor_refresh(i: int):
                return floor.refresh(keys[i % size], ids[i % size])

            def handler_refresh(i: int):
                return handler.call("refresh_token", tokens[i % size])

            def worker_refresh(i: int):
                return worker.call("refresh_token", tokens[i % size])

            # Warm every path up before the first timed run (JIT in Azurite, pools, caches).
            warm_c = max(config.concurrency)
            async with EndToEnd(env["api"], warm_c) as e2e:
                for op in (
                    floor_refresh,
                    handler_refresh,
                    worker_refresh,
                    lambda i: e2e.call("token/refresh", tokens[i % size]),
                ):
                    await closed_loop(op, 4 * warm_c, warm_c)

            for c in config.concurrency:
                async with EndToEnd(env["api"], c) as e2e:
                    n = config.refresh_ops[c]

                    def new_bearer(_round: int, n=n, c=c) -> tuple[Operation, Operation]:
                        # A bearer never seen before on every request: JWT validation in full each time.
                        fresh = [users.unique_token(names[i % size]) for i in range(n + 2 * c)]
                        return (
                            lambda i: handler.call("refresh_token", fresh[i]),
                            lambda i: handler.call("refresh_token", fresh[2 * c + i]),
                        )

                    refresh_make = {
                        "floor": lambda _r: (floor_refresh, floor_refresh),
                        "handler": lambda _r: (handler_refresh, handler_refresh),
                        "handler_new_bearer": new_bearer,
                        "worker": lambda _r: (worker_refresh, worker_refresh),
                        "e2e": lambda _r, e2e=e2e: (
                            (lambda i: e2e.call("token/refresh", tokens[i % size]),) * 2
                        ),
                    }
                    out["refresh"][str(c)] = await compare(refresh_make, n, c, config.rounds, meter)
                    log(_line("refresh", c, out["refresh"][str(c)]))

                    n = config.issue_ops[c]
                    warm = 2 * c

                    def fresh(mode: str, round_no: int, c=c, n=n, warm=warm) -> list[str]:
                        return [f"new-{mode}-{c}-{round_no}-{i}" for i in range(warm + n)]

                    def issue_make(mode: str, e2e=e2e, fresh=fresh, warm=warm):
                        def make(round_no: int) -> tuple[Operation, Operation]:
                            new = fresh(mode, round_no)
                            if mode == "floor":
                                issuer = users.env["issuer"]
                                new_keys = [users.key_of(name) for name in new]

                                def op(i, off):
                                    return floor.first_issue(new_keys[off + i], issuer, new[off + i])
                            else:
                                new_tokens = [users.token(name) for name in new]
                                if mode == "handler":

                                    def op(i, off):
                                        return handler.call("issue_token", new_tokens[off + i])
                                else:

                                    def op(i, off):
                                        return e2e.call("token", new_tokens[off + i])

                            return (lambda i: op(i, 0)), (lambda i: op(i, warm))

                        return make

                    issue = await compare({m: issue_make(m) for m in MODES}, n, c, config.issue_rounds, meter)
                    out["first_issue"][str(c)] = issue
                    log(_line("first issue", c, issue))

            from shared.compose import services

            clients = services()
            out["per_worker"] = {
                "handler_requests": handler.calls,
                "jwks_fetches": clients.jwks.fetches if clients.jwks else None,
                "jwt_verifications": getattr(clients.authenticator, "verifications", None),
            }
    return out


def _line(name: str, c: int, result: dict) -> str:
    parts = [f"{mode} {result[mode]['throughput']:.0f}/s" for mode in result]
    ratios = " ".join(
        f"{mode}/floor {result[mode]['ratio_to_floor']:.2f}" for mode in result if mode != "floor"
    )
    return f"  {name:<12} c={c:<3} " + ", ".join(parts) + f"  ({ratios})"


async def call_counts(env: dict, users: Users, tls_dir: Path, n: int) -> dict:
    """Each operation `n` times, one at a time, for fresh users; backend calls counted outside."""
    from shared.compose import services

    results: dict = {}
    async with (
        TableCountingProxy(env["tables_endpoint"], tls_dir) as proxy,
        aiohttp.ClientSession() as http,
    ):
        acs = AcsCounter(env["acs_emulator_hooks"])

        async def count(label: str, calls: list[Callable]) -> None:
            proxy.calls.clear()
            proxy.statuses.clear()
            before = await acs.calls(http)
            for call in calls:
                await call()
            results[label] = summarize(proxy.calls.copy(), (await acs.calls(http)) - before, len(calls))
            # Every answer, so that a retried failure would show (a first issue's read is a 404 miss).
            results[label]["table_statuses"] = {
                k: round(v / len(calls), 2) for k, v in sorted(proxy.statuses.items())
            }

        with service_environment(env, TABLES_ENDPOINT=proxy.endpoint):
            async with HandlerLevel() as handler:
                # Once per worker, not per request: the table's creation, JWKS, managed-identity tokens.
                proxy.calls.clear()
                before = await acs.calls(http)
                await handler.call("issue_token", users.token("count-warm-up"))
                results["first request of a worker"] = summarize(
                    proxy.calls.copy(), (await acs.calls(http)) - before, 1
                )

                entra = [users.token(f"count-entra-{i}") for i in range(n)]
                plain = [users.token_without_entra_ids(f"count-plain-{i}") for i in range(n)]
                await count("first issue", [lambda t=t: handler.call("issue_token", t) for t in entra])
                await count(
                    "first issue, no oid/tid", [lambda t=t: handler.call("issue_token", t) for t in plain]
                )
                await count("repeated issue", [lambda t=t: handler.call("issue_token", t) for t in entra])
                await count("refresh", [lambda t=t: handler.call("refresh_token", t) for t in entra])
                await count(
                    "identity (GET)",
                    [lambda t=t: handler.call("get_identity", t, method="GET") for t in entra],
                )
                await count("revoke", [lambda t=t: handler.call("revoke_tokens", t) for t in entra])
                tokens_service = services().tokens
                tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
                real_clock, tokens_service.clock = tokens_service.clock, (lambda: tomorrow)
                try:
                    await count(
                        "refresh, first of a new day",
                        [lambda t=t: handler.call("refresh_token", t) for t in entra],
                    )
                finally:
                    tokens_service.clock = real_clock
        # Entra users keyed by object id: Graph events find them without a lookup row.
        with service_environment(env, TABLES_ENDPOINT=proxy.endpoint, AUTH_USER_CLAIM="oid"):
            async with HandlerLevel() as handler:
                await handler.call("issue_token", users.token("count-oid-warm-up"))
                by_oid = [users.token(f"count-oid-{i}") for i in range(n)]
                await count(
                    "first issue, AUTH_USER_CLAIM=oid",
                    [lambda t=t: handler.call("issue_token", t) for t in by_oid],
                )
    return results


async def measure_stack(
    env: dict, issuer_key: Path, tls_dir: Path, config: Config, *, stack_pid: int | None, log: Log
) -> dict:
    users = Users(env, issuer_key)
    meter = CpuMeter(stack_processes(stack_pid))
    log("backend calls per operation (counted outside the service) ...")
    calls = await call_counts(env, users, tls_dir, config.count_operations)
    log("throughput: floor, handler level, worker level, end to end ...")
    measured = await throughput(env, users, config, meter, log)
    log("index filing: one transaction against single upserts ...")
    with service_environment(env):
        async with Floor(env) as floor:
            filing = await filing_cost(
                floor.table,
                ops=config.filing_ops,
                concurrency=config.filing_concurrency,
                rounds=config.issue_rounds,
            )
    log(
        f"token storm: {config.storm.overload} x the issue limit ({config.storm.issue_limit} per "
        f"{config.storm.window_seconds:g} s), end to end, the service and its baseline ..."
    )
    stormed = await storm(env, users, config.storm, log)
    return {
        "throughput": {"refresh": measured["refresh"], "first_issue": measured["first_issue"]},
        "storm": stormed,
        "per_worker": measured["per_worker"],
        "calls": calls,
        "filing": filing,
        "processes": list(meter.pids),
    }


def run_storm(env: dict, issuer_key: Path, config: Config, *, log: Log = print) -> dict:
    """The token storm alone (`python -m bench --storm-only`): no other measurement."""
    started = time.monotonic()
    results = {"storm": asyncio.run(storm(env, Users(env, issuer_key), config.storm, log))}
    results["meta"] = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "config": {"storm": asdict(config.storm)},
        "seconds": round(time.monotonic() - started, 1),
    }
    return results


def run(
    env: dict,
    issuer_key: Path,
    tls_dir: Path,
    config: Config,
    *,
    stack_pid: int | None = None,
    cold_start: dict | None = None,
    log: Log = print,
) -> dict:
    """Everything but the stack's start: callers (`python -m bench`, the tests) bring one."""
    started = time.monotonic()
    if cold_start is None:
        log("cold start (python -X importtime) ...")
        cold_start = coldstart.measure(config.coldstart_repeats)
    results = asyncio.run(measure_stack(env, issuer_key, tls_dir, config, stack_pid=stack_pid, log=log))
    results["cold_start"] = cold_start
    results["meta"] = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "config": {k: v for k, v in asdict(config).items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    return results
