"""Benchmarks: the service against the floor that ACS and Table Storage set (`make bench`).

`python -m bench` starts its own local stack on free ports, measures the floor (the same backend
calls made directly with the aio SDKs), the service at handler level and end to end through the
dev host, counts backend calls per operation from outside the service, and measures cold start;
it prints a table, writes bench/results.json and bench/throughput.png, and checks the targets.
"""
