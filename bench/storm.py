"""The token storm (issue 18): users asking for tokens at 10 x ACS's issue limit, end to end.

The emulator's service limits are set small (`StormConfig.issue_limit` issues per `window_seconds`,
the same for create-and-issue, as ACS's own limits are equal), so that a storm is cheap to make on
a small machine. The offered rate is `overload` (10) x the issue limit, for `windows` windows.

Workload, the same schedule (seeded) for each column:
- a pool of `users`; a user's requests are POST /api/token until one has answered 200 (its first
  issue; concurrent first requests of one user happen, as a reconnecting client's would), and
  POST /api/token/refresh from then on;
- reconnect waves: every half window `wave_fraction` of the pool asks at the same instant (after a
  network blip or a deploy); the rest of the requests arrive at uniformly random times (a Poisson
  process given their count), each from a user drawn at random.

Open loop: each request is sent at its scheduled time whether or not earlier ones have answered,
as independent clients do; a closed loop would slow down with the service and hide the overload.
A cap on requests in flight (`max_in_flight`) bounds the load generator's sockets and memory so
that the machine is not what gives way; it is rate x client timeout plus a wave, more than the
schedule can have in flight but for a random bunching of arrivals, so it does not turn the open
loop into a closed one. Were it ever to bind,
the delayed requests are counted (`late_starts`), and latency is measured from the scheduled
time either way, so a delay on the client's side is not hidden (no coordinated omission). A
request unanswered after `client_timeout` seconds counts as "other" (a client gives up), so a storm
the service answers slowly cannot stretch the run without bound.

Two columns, each through a dev host of its own, launched the same way from the stack's settings
(`devstack.host_launcher`) and stopped after its run, so that its in-flight work cannot spill
into the next column's counts:
- "service": the service as configured;
- "baseline": the same with the app setting STORM_PROTECTION=off, which switches coalescing,
  fresh-token reuse and adaptive throttling off.
Both share the stack's ACS emulator and Azurite; each column sets the limits again (fresh windows)
and takes its ACS counts as the difference of the emulator's stats before and after.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from devstack import children, host_launcher
from devstack.layout import DEFAULT_FUNCTION_APP
from devstack.service_settings import read_local_settings

from .load import percentile
from .users import Users

COLUMNS = {"service": {"STORM_PROTECTION": "on"}, "baseline": {"STORM_PROTECTION": "off"}}
# The cleanup timer of a storm's host must not call ACS during a run (its probes issue tokens):
# once a year, i.e. never within one.
STORM_HOST_SETTINGS = {"CLEANUP_SCHEDULE": "0 0 0 1 1 *"}
HOST_START_TIMEOUT = 60.0
ANSWERS = ("200", "429 with Retry-After", "429 without Retry-After", "other")


@dataclass(frozen=True)
class StormConfig:
    issue_limit: int = 50  # issueAccessToken (and createIdentityAndIssueAccessToken) per window
    window_seconds: float = 10.0
    windows: int = 3  # how long the storm lasts, in windows
    overload: int = 10  # offered rate = overload x issue_limit / window_seconds
    users: int = 100  # twice a window's creates: the first issues alone overrun one window
    wave_fraction: float = 0.5  # of the pool, reconnecting at once every half window
    client_timeout: float = 30.0  # a client's patience
    seed: int = 18

    @classmethod
    def quick(cls) -> StormConfig:
        """Seconds: 2 issues per 1 s window, offered 20 a second for 2 s by 4 users."""
        return cls(issue_limit=2, window_seconds=1.0, windows=2, users=4, client_timeout=4.0)

    @property
    def max_in_flight(self) -> int:
        """Requests in flight are at most rate x the longest a request stays (the client timeout),
        plus one wave arriving at once: a cap this size bounds the load generator's sockets and
        memory without ever holding back a request the schedule sends (`late_starts` shows it)."""
        return math.ceil(self.rate * self.client_timeout) + math.ceil(self.wave_fraction * self.users)

    @property
    def rate(self) -> float:
        return self.overload * self.issue_limit / self.window_seconds

    @property
    def seconds(self) -> float:
        return self.windows * self.window_seconds

    @property
    def limits(self) -> dict:
        return {
            "issueAccessToken": self.issue_limit,
            "createIdentityAndIssueAccessToken": self.issue_limit,
            "windowSeconds": self.window_seconds,
        }


def schedule(config: StormConfig) -> list[tuple[float, int]]:
    """(seconds from the start, user index) for every request, in time order."""
    rng = random.Random(config.seed)
    total = round(config.rate * config.seconds)
    every = config.window_seconds / 2
    wave_size = max(1, round(config.wave_fraction * config.users))
    waves = [every / 2 + k * every for k in range(int(config.seconds / every))]
    arrivals = [(at, user) for at in waves for user in rng.sample(range(config.users), wave_size)]
    steady = max(0, total - len(arrivals))
    arrivals += [(rng.uniform(0, config.seconds), rng.randrange(config.users)) for _ in range(steady)]
    return sorted(arrivals)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StormHost:
    """A dev host of its own on the stack (`python -m devstack host`), with extra app settings."""

    def __init__(self, env: dict, settings: dict[str, str]) -> None:
        self.env, self.settings = env, settings
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.log = Path(tempfile.mkdtemp(prefix="bench-storm-host-")) / "host.log"

    async def __aenter__(self) -> StormHost:
        environment = host_launcher.environment(
            self.env,
            function_key=self.env["function_key"],
            host_key=self.env["host_key"],
            master_key=self.env["master_key"],
            local_settings=read_local_settings(),
            base=os.environ,
        )
        environment |= STORM_HOST_SETTINGS | self.settings
        self.process = host_launcher.start(self.port, DEFAULT_FUNCTION_APP, environment, self.log)
        deadline = time.monotonic() + HOST_START_TIMEOUT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the storm's dev host exited: {self.log.read_text()[-2000:]}")
                try:
                    async with session.get(f"{self.api}/") as response:
                        await response.read()
                        return self
                except (TimeoutError, aiohttp.ClientError, OSError):
                    if time.monotonic() > deadline:
                        children.stop(self.process)
                        raise RuntimeError("the storm's dev host did not answer in time") from None
                    await asyncio.sleep(0.1)

    async def __aexit__(self, *_exc) -> None:
        children.stop(self.process)
        self.log.unlink(missing_ok=True)
        self.log.parent.rmdir()


async def _emulator(session: aiohttp.ClientSession, hooks: str, path: str, body: dict | None = None) -> dict:
    request = session.get(hooks + path) if body is None else session.post(hooks + path, json=body)
    async with request as response:
        response.raise_for_status()
        return await response.json()


def _retry_after_seconds(value: str | None) -> int | None:
    """A Retry-After a client can follow (RFC 9110: delay-seconds or an HTTP date), in seconds."""
    if not value:
        return None
    if value.strip().isdigit():
        return int(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0, round(when.timestamp() - time.time()))


def _difference(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


async def _one_column(
    label: str, settings: dict, env: dict, users: Users, config: StormConfig, plan: list, log: Callable
) -> dict:
    hooks = env["acs_emulator_hooks"]
    names = [f"storm-{label}-{i}-{os.urandom(3).hex()}" for i in range(config.users)]
    tokens = [users.token(name) for name in names]
    issued = [False] * config.users  # a 200 from POST /api/token: refreshes from then on
    statuses: Counter[str] = Counter()
    other: Counter[str] = Counter()
    latencies: list[float] = []  # of the 200s, from the scheduled time
    routes: Counter[str] = Counter()
    retry_after: list[int] = []
    late = 0
    in_flight = max_in_flight = 0
    gate = asyncio.Semaphore(config.max_in_flight)

    async with (
        StormHost(env, settings) as host,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_in_flight),
            timeout=aiohttp.ClientTimeout(total=config.client_timeout),
        ) as session,
    ):
        # One warm-up request (worker start, JWKS, clients) before the limits and the counts.
        warm_up = {"Authorization": f"Bearer {users.token(f'storm-{label}-warm-up')}"}
        async with session.post(f"{host.api}/token", headers=warm_up) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"the storm's warm-up request answered {response.status}")
        saved_limits = (await _emulator(session, hooks, "faults"))["limits"]
        await _emulator(session, hooks, "faults", {"limits": config.limits})  # fresh windows
        before = await _emulator(session, hooks, "stats")

        async def request(scheduled: float, user: int) -> None:
            nonlocal late, in_flight, max_in_flight
            if gate.locked():  # the cap is what delays this one
                late += 1
            async with gate:
                route = "token/refresh" if issued[user] else "token"
                routes[route] += 1
                in_flight += 1
                max_in_flight = max(max_in_flight, in_flight)
                try:
                    headers = {"Authorization": f"Bearer {tokens[user]}"}
                    async with session.post(f"{host.api}/{route}", headers=headers) as response:
                        await response.read()
                        status, wait = response.status, response.headers.get("Retry-After")
                except TimeoutError:
                    statuses["other"] += 1
                    other["no answer in time"] += 1
                    return
                except aiohttp.ClientError as err:
                    statuses["other"] += 1
                    other[type(err).__name__] += 1
                    return
                finally:
                    in_flight -= 1
            if status == 200:
                statuses["200"] += 1
                latencies.append(time.perf_counter() - scheduled)
                issued[user] = True
            elif status == 429 and (seconds := _retry_after_seconds(wait)) is not None:
                statuses["429 with Retry-After"] += 1
                retry_after.append(seconds)
            elif status == 429:
                statuses["429 without Retry-After"] += 1
            else:
                statuses["other"] += 1
                other[str(status)] += 1

        log(f"  storm {label}: {len(plan)} requests over {config.seconds:g} s ({config.rate:g}/s) ...")
        tasks = []
        start = time.perf_counter()
        try:
            for at, user in plan:
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(request(start + at, user)))
            await asyncio.gather(*tasks)
        except BaseException:
            await _emulator(session, hooks, "faults", {"limits": saved_limits})
            raise
        elapsed = time.perf_counter() - start
    # The host is stopped: nothing of this column still calls ACS.
    async with aiohttp.ClientSession() as session:
        after = await _emulator(session, hooks, "stats")
        await _emulator(session, hooks, "faults", {"limits": saved_limits})

    calls = _difference(after["calls"], before["calls"])
    refused = _difference(after.get("limited", {}), before.get("limited", {}))
    # Every create the service makes asks for a token too (create-and-issue): each issues one.
    issue_calls = calls.get("issueAccessToken", 0) + calls.get("createIdentity", 0)
    acs_total = sum(calls.values())
    ordered = sorted(latencies)
    return {
        "requests": len(plan),
        "routes": dict(routes),
        "answers": {k: statuses.get(k, 0) for k in ANSWERS},
        "other": dict(other),
        "retry_after_seconds": {
            "min": min(retry_after, default=None),
            "max": max(retry_after, default=None),
        },
        "acs_calls": calls,
        "acs_calls_total": acs_total,
        "acs_429": refused,
        "acs_429_total": sum(refused.values()),
        "acs_429_share": round(sum(refused.values()) / acs_total, 4) if acs_total else 0.0,
        "acs_issue_calls": issue_calls,
        "tokens_per_issue_call": round(statuses["200"] / issue_calls, 2) if issue_calls else None,
        "p50_ms": round(percentile(ordered, 50) * 1000, 1),
        "p99_ms": round(percentile(ordered, 99) * 1000, 1),
        "seconds": round(elapsed, 1),
        "late_starts": late,
        "max_in_flight": max_in_flight,
    }


async def storm(env: dict, users: Users, config: StormConfig, log: Callable[[str], None]) -> dict:
    plan = schedule(config)
    result: dict = {
        "config": {
            **asdict(config),
            "rate_per_second": config.rate,
            "max_in_flight": config.max_in_flight,
            "limits": config.limits,
        },
        "columns": {},
    }
    for label, settings in COLUMNS.items():
        result["columns"][label] = await _one_column(label, settings, env, users, config, plan, log)
        c = result["columns"][label]
        log(f"    {c['answers']}, ACS {c['acs_calls']}, ACS 429s {c['acs_429_total']}")
    return result
