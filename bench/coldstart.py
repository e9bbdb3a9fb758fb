"""Cold start: what importing function_app costs, against importing only the packages it needs.

`python -X importtime` in fresh interpreters, so each run pays every import. Two moments count:
- indexing: the Functions host imports function_app before anything else;
- first request: the worker then builds its clients, which imports the SDK-backed modules.
For each, the baseline imports exactly the third-party modules that moment loads (found by
running it once and listing sys.modules), so the difference is the service's own import cost.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

INDEX = "import function_app"
# The first request's imports, without I/O: build the clients from settings that need no network.
FIRST_REQUEST = (
    "import function_app\n"
    "from shared import compose, settings\n"
    "compose.compose(settings.load({'AUTH_ISSUER': 'https://idp.example', 'AUTH_AUDIENCE': 'api',"
    " 'ACS_CONNECTION_STRING': 'endpoint=https://acs.example/;accesskey=a2V5',"
    " 'TABLES_CONNECTION_STRING': 'DefaultEndpointsProtocol=https;AccountName=a;AccountKey=a2V5;"
    "TableEndpoint=https://a.table.example/'}))\n"
)
_LIST_MODULES = (
    "import json, sys\n"
    "before = set(sys.modules)\n"
    "{code}\n"
    "print(json.dumps(sorted(set(sys.modules) - before)))"
)


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """(module, depth, self us, cumulative us) for each `-X importtime` line."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        parts = line[len("import time:") :].split("|")
        self_us, cumulative_us, name = int(parts[0]), int(parts[1]), parts[2]
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), depth, self_us, cumulative_us))
    return rows


def third_party(modules: list[str]) -> list[str]:
    """Modules that are neither the standard library nor the service's own."""
    own = ("function_app", "shared", "devstack", "bench", "tests")
    return [
        m
        for m in modules
        if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] not in own and m != "__main__"
    ]


def _import_all(modules: list[str]) -> str:
    names = json.dumps(modules)
    return (
        "import importlib\n"
        f"for name in {names}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        pass\n"
    )


def _total_us(code: str, startup: set[str]) -> tuple[int, list[tuple[str, int, int, int]]]:
    rows = parse_importtime(_python(code, "-X", "importtime").stderr)
    total = sum(cum for name, depth, _self, cum in rows if depth == 0 and name not in startup)
    return total, rows


def measure_moment(code: str, repeats: int, startup: set[str]) -> dict:
    loaded = json.loads(_python(_LIST_MODULES.format(code=code)).stdout.strip().splitlines()[-1])
    deps = third_party(loaded)
    service_runs, deps_runs, rows = [], [], []
    for _ in range(repeats):  # alternated, so that machine noise hits both alike
        total, rows_now = _total_us(code, startup)
        service_runs.append(total)
        if not rows or total == statistics.median_low(service_runs):
            rows = rows_now
        deps_runs.append(_total_us(_import_all(deps), startup)[0])
    service_ms = statistics.median(service_runs) / 1000
    deps_ms = statistics.median(deps_runs) / 1000
    heaviest = sorted((r for r in rows if r[0] not in startup), key=lambda r: r[3], reverse=True)[:12]
    roots = sorted(
        {m.split(".")[0] if m.split(".")[0] != "azure" else ".".join(m.split(".")[:2]) for m in deps}
    )
    return {
        "total_ms": round(service_ms, 1),
        "dependencies_ms": round(deps_ms, 1),
        "overhead_ms": round(service_ms - deps_ms, 1),
        "dependencies": roots,
        "runs_ms": [round(v / 1000, 1) for v in service_runs],
        "dependency_runs_ms": [round(v / 1000, 1) for v in deps_runs],
        "heaviest": [
            {"module": name, "self_ms": round(s / 1000, 1), "cumulative_ms": round(c / 1000, 1)}
            for name, _depth, s, c in heaviest
        ],
    }


def measure(repeats: int = 5) -> dict:
    startup = {name for name, *_ in parse_importtime(_python("pass", "-X", "importtime").stderr)}
    return {
        "repeats": repeats,
        "index": measure_moment(INDEX, repeats, startup),
        "first_request": measure_moment(FIRST_REQUEST, repeats, startup),
    }
