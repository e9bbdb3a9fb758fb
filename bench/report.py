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


def _storm(storm: dict) -> list[str]:
    """The two columns side by side: the service as configured and STORM_PROTECTION=off."""
    cfg = storm["config"]
    columns = storm["columns"]
    lines = [
        f"Token storm, end to end: {cfg['rate_per_second']:g} requests/s ({cfg['overload']} x the ACS issue "
        f"limit of {cfg['issue_limit']} per {cfg['window_seconds']:g} s, create-and-issue the same) for "
        f"{cfg['windows'] * cfg['window_seconds']:g} s, {cfg['users']} users, open loop "
        f"(client timeout {cfg['client_timeout']:g} s)"
    ]

    def ops(counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"

    def ms(c: dict) -> str:
        return f"{c['p50_ms']:g} / {c['p99_ms']:g}" if c["answers"]["200"] else "-"

    rows = [
        ("requests (token + refresh)", lambda c: f"{c['requests']} ({ops(c['routes'])})"),
        *((f"  answered {k}", lambda c, k=k: str(c["answers"][k])) for k in _answer_kinds(columns)),
        ("  other, by kind", lambda c: ops(c["other"])),
        ("ACS calls", lambda c: f"{c['acs_calls_total']}: {ops(c['acs_calls'])}"),
        ("ACS 429s", lambda c: f"{c['acs_429_total']} ({c['acs_429_share']:.1%}): {ops(c['acs_429'])}"),
        (
            "tokens answered / ACS issue calls",
            lambda c: f"{c['tokens_per_issue_call']} ({c['answers']['200']} / {c['acs_issue_calls']})",
        ),
        ("p50 / p99 ms of the 200s", ms),
        ("late starts / most in flight", lambda c: f"{c['late_starts']} / {c['max_in_flight']}"),
        ("seconds (to the last answer)", lambda c: f"{c['seconds']:g}"),
    ]
    labels = {"service": "service", "baseline": "baseline (STORM_PROTECTION=off)"}
    cells = [[label] + [cell(columns[name]) for name in columns] for label, cell in rows]
    head = ["", *(labels.get(name, name) for name in columns)]
    widths = [max(len(row[i]) for row in [head, *cells]) for i in range(len(head))]
    for row in [head, *cells]:
        lines.append("  " + " | ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)))
        if row is head:
            lines.append("  " + "-+-".join("-" * width for width in widths))
    return lines


def _answer_kinds(columns: dict) -> list[str]:
    return list(next(iter(columns.values()))["answers"])


def render(results: dict) -> str:
    tp = results.get("throughput")  # absent from a storm-only run
    sections = [
        *(
            [
                _throughput_table("Refresh", tp["refresh"]),
                _throughput_table("First issue", tp["first_issue"]),
                _calls_table(results["calls"]),
            ]
            if tp
            else []
        ),
        *([_filing(results["filing"])] if "filing" in results else []),
        *([_cold_start(results["cold_start"])] if "cold_start" in results else []),
        *([_bottleneck(tp)] if tp else []),
        *([_storm(results["storm"])] if "storm" in results else []),
    ]
    lines = [line for section in sections for line in [*section, ""]]
    lines.append("Targets")
    for t in results.get("targets", []):
        lines.append(f"  {t['status']:<16} {t['target']}: {t['value']} (goal {t['goal']})")
    return "\n".join(lines)
