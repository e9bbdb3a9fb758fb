"""`python -m bench [--quick]`: start a local stack, measure, print, write results.json and the chart.

Exits 1 when a target fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from devstack.layout import ISSUER_KEY_FILE

from .stack import LocalStack, trust_new_ca

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the code runs, not the speed"
    )
    parser.add_argument("--out", type=Path, help="default bench/results.json (--quick: a temporary folder)")
    parser.add_argument(
        "--chart", type=Path, help="default bench/throughput.png (--quick: a temporary folder)"
    )
    parser.add_argument("--rounds", type=int, help="rounds per refresh measurement (default 5)")
    parser.add_argument(
        "--storm-only",
        action="store_true",
        help="only the token storm (bench/storm.py); writes to a temporary folder unless --out",
    )
    args = parser.parse_args(argv)
    # A quick run's numbers mean nothing, and a storm-only run has only the storm's: neither may
    # replace the real results and chart.
    folder = Path(tempfile.mkdtemp(prefix="bench-quick-")) if args.quick or args.storm_only else HERE
    args.out = args.out or folder / "results.json"
    args.chart = args.chart or folder / "throughput.png"

    tls_dir = trust_new_ca(prefix="bench-tls-").ca_cert.parent  # before anything imports aiohttp
    from . import chart, coldstart, report, targets
    from .run import Config, run, run_storm

    config = Config.quick_config() if args.quick else Config()
    if args.storm_only:
        print("starting the local stack for the token storm ...", flush=True)
        with LocalStack(tls_dir) as stack:
            key = stack.state_dir / ISSUER_KEY_FILE
            results = run_storm(stack.env, key, config, log=lambda line: print(line, flush=True))
        shutil.rmtree(tls_dir, ignore_errors=True)
        return _finish(results, args, targets, report, chart=None)
    if args.rounds:
        config = Config(**{**config.__dict__, "rounds": args.rounds})
    print(f"cold start (python -X importtime, {config.coldstart_repeats} runs each) ...", flush=True)
    cold = coldstart.measure(config.coldstart_repeats)  # before the stack starts: a quiet machine
    print("starting the local stack (Azurite, ACS emulator, issuer, MSI, dev host) ...", flush=True)
    with LocalStack(tls_dir) as stack:
        results = run(
            stack.env,
            stack.state_dir / ISSUER_KEY_FILE,
            tls_dir,
            config,
            stack_pid=stack.running.process.pid if stack.running else None,
            cold_start=cold,
            log=lambda line: print(line, flush=True),
        )
    shutil.rmtree(tls_dir, ignore_errors=True)
    return _finish(results, args, targets, report, chart)


def _finish(results: dict, args: argparse.Namespace, targets, report, chart) -> int:
    """Targets, results.json, the chart (not for a storm-only run), the printed report; exit code."""
    # A storm-only run is judged on the storm's targets alone (the rest were not measured).
    results["targets"] = targets.evaluate(results) if chart else targets.storm_targets(results["storm"])
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if chart is not None:
        chart.draw(results, args.chart)
    print()
    print(report.render(results))
    print(f"\nwrote {args.out}" + (f" and {args.chart}" if chart is not None else ""))
    failures = targets.failed(results["targets"])
    if failures and not args.quick:
        print(f"{len(failures)} target(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
