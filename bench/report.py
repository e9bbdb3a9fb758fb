"""The printed table: throughput, latency, ratios, calls per operation, cold start, targets."""

from __future__ import annotations

MODE_TITLES = {
    "floor": "floor (SDKs)",
    "handler": "handler level",
    "handler_new_bearer": "handler, new bearer",
    "worker": "worker runtime, in-process",
    "e2e": "end to end",
}


def _throughput_table(title: str, by_concurrency: dict) -> list[str]:
    modes = [m for m in MODE_TITLES if m in next(iter(by_concurrency.values()))]
    head = f"  {'c':>3} | " + " | ".join(f"{MODE_TITLES[m]:<26}" for m in modes)
    lines = [
        f"{title}: ops/s (median of rounds), p50 / p99 ms, x floor",
        head,
        "  " + "-" * (len(head) - 2),
    ]
    for c, result in by_concurrency.items():
        cells = []
        for mode in modes:
            r = result[mode]
            ratio = f" x{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else ""
            errors = f" ERR{r['errors']}" if r["errors"] else ""
            cells.append(
                f"{r['throughput']:>6.0f}/s {r['p50_ms']:>5.1f}/{r['p99_ms']:>6.1f}{ratio}{errors}".ljust(26)
            )
        lines.append(f"  {c:>3} | " + " | ".join(cells))
    return lines


def _calls_table(calls: dict) -> list[str]:
    lines = ["Backend calls per operation (Azurite via a counting proxy, ACS via the emulator's counters)"]
    width = max([len("operation"), *map(len, calls)])
    lines.append(f"  {'operation':<{width}} {'reads':>5} {'ACS':>4} {'writes':>6}  detail")
    for op, c in calls.items():
        detail = ", ".join(f"{k} {v:g}" for k, v in {**c["table"], **c["acs"]}.items())
        lines.append(
            f"  {op:<{width}} {c['table_reads']:>5g} {c['acs_calls']:>4g} {c['table_writes']:>6g}  {detail}"
        )
    return lines


def _cold_start(cold: dict) -> list[str]:
    lines = [f"Cold start (python -X importtime, median of {cold['repeats']})"]
    for moment, title in (("index", "import function_app"), ("first_request", "  + first request's imports")):
        m = cold[moment]
        lines.append(
            f"  {title:<30} {m['total_ms']:>6.1f} ms; its dependencies alone {m['dependencies_ms']:.1f} ms; "
            f"overhead {m['overhead_ms']:.1f} ms"
        )
    heaviest = ", ".join(f"{h['module']} {h['cumulative_ms']:.0f}" for h in cold["index"]["heaviest"][:6])
    lines.append(f"  heaviest at index (cumulative ms): {heaviest}")
    return lines


def _bottleneck(throughput: dict) -> list[str]:
    lines = ["CPU by process (cores busy during the timed run; the machine's total is the limit)"]
    for op, by_c in throughput.items():
        for c, result in by_c.items():
            for mode in (m for m in MODE_TITLES if m in result):
                cpu = result[mode].get("cpu", {})
                busy = ", ".join(f"{label.split(' (')[0]} {v['cores']:.2f}" for label, v in cpu.items())
                total = sum(v["cores"] for v in cpu.values())
                lines.append(f"  {op:<11} c={c:<3} {MODE_TITLES[mode]:<19} total {total:.2f}: {busy}")
    return lines


def _filing(filing: dict) -> list[str]:
    lines = [f"Index filing of a first issue, {filing['concurrency']} at once (bench/filing.py)"]
    for way in ("transaction", "single upserts"):
        f = filing[way]
        lines.append(
            f"  {way:<15} {f['requests']} request(s), {f['cpu_ms_per_filing']:.2f} ms CPU each, "
            f"{f['throughput']:.0f}/s"
        )
    return lines


def render(results: dict) -> str:
    tp = results["throughput"]
    sections = [
        _throughput_table("Refresh", tp["refresh"]),
        _throughput_table("First issue", tp["first_issue"]),
        _calls_table(results["calls"]),
        *([_filing(results["filing"])] if "filing" in results else []),
        _cold_start(results["cold_start"]),
        _bottleneck(tp),
    ]
    lines = [line for section in sections for line in [*section, ""]]
    lines.append("Targets")
    for t in results.get("targets", []):
        lines.append(f"  {t['status']:<16} {t['target']}: {t['value']} (goal {t['goal']})")
    return "\n".join(lines)
