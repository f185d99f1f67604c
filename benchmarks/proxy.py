"""Proxy benchmark: latency (p50, p99) and throughput of a deployed service, direct and through its proxy.

Usage: .venv/bin/python benchmarks/proxy.py [--requests N] [--rounds R] [--concurrency C] [--seconds S]

Deploys the offline-generated service of examples/intents/loyalty-points.yaml with the local runtime (the
same proxy and platform layer as `codemind demo`), then reads one stored object over keep-alive connections,
alternating direct (the version's private port) and proxied (the environment's URL) rounds so drift hits
both alike.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INTENT = REPO / "examples" / "intents" / "loyalty-points.yaml"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.connect()
    return conn


def get(conn: http.client.HTTPConnection, path: str) -> None:
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        raise SystemExit(f"GET {path} answered {resp.status}")


def latencies(port: int, path: str, n: int) -> list[float]:
    """Seconds per request, one keep-alive connection, one request at a time."""
    conn = connect(port)
    try:
        get(conn, path)  # warm the connection
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            get(conn, path)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        conn.close()


def throughput(port: int, path: str, concurrency: int, seconds: float) -> float:
    """Requests per second with `concurrency` keep-alive clients for `seconds`."""
    counts = [0] * concurrency
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            conn = connect(port)
            while not stop.is_set():
                get(conn, path)
                counts[i] += 1
            conn.close()
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"throughput run failed: {errors[0]!r}")
    return sum(counts) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="sequential requests per round and target")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds (default 8)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the throughput run (default 8)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of throughput per target (default 4)")
    args = parser.parse_args()
    for name in ("requests", "rounds", "concurrency", "seconds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")

    from codemind_dagster.agents.offline.service_codegen import render_service
    from codemind_dagster.domain.code import write_bundle
    from codemind_dagster.domain.intent import read_intent_file
    from codemind_dagster.resources.runtime import LocalRuntime

    tmp = Path(tempfile.mkdtemp(prefix="codemind-bench-proxy-"))
    runtime = LocalRuntime(tmp / "runtime")
    try:
        intent = read_intent_file(INTENT)
        write_bundle(tmp / "bundle", render_service(intent))
        out = runtime.deploy(service=intent.name, environment="dev", artifact="bench", bundle_dir=tmp / "bundle")
        if not out.ok:
            raise SystemExit(f"deploy failed: {out.reason}")
        state = json.loads((tmp / "runtime" / intent.name / "dev" / "state.json").read_text())
        direct_port, proxy_port = state["live"]["port"], state["port"]

        entity = intent.spec.entities[0]
        conn = connect(proxy_port)
        body = json.dumps({"email": "bench@example.com"} if entity.name == "Customer" else {})
        conn.request("POST", f"/{entity.collection}", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        created = json.loads(resp.read())
        conn.close()
        if resp.status != 201:
            raise SystemExit(f"POST /{entity.collection} answered {resp.status}: {created}")
        path = f"/{entity.collection}/{created['id']}"

        direct: list[float] = []
        proxied: list[float] = []
        latencies(direct_port, path, 200)  # warm both paths before measuring
        latencies(proxy_port, path, 200)
        for r in range(args.rounds):
            order = [(direct_port, direct), (proxy_port, proxied)]
            for port, into in order if r % 2 == 0 else reversed(order):
                into += latencies(port, path, args.requests)
        # Throughput in alternating slices as well; the median slice of each target is reported.
        rates: dict[int, list[float]] = {direct_port: [], proxy_port: []}
        slices = 4
        for r in range(slices):
            for port in (direct_port, proxy_port) if r % 2 == 0 else (proxy_port, direct_port):
                rates[port].append(throughput(port, path, args.concurrency, args.seconds / slices))
        direct_rps, proxy_rps = statistics.median(rates[direct_port]), statistics.median(rates[proxy_port])
    finally:
        runtime.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    def ms(values: list[float], q: float | None = None) -> float:
        return 1000 * (statistics.fmean(values) if q is None else percentile(values, q))

    p50 = ms(proxied, 0.5) - ms(direct, 0.5)
    p99 = ms(proxied, 0.99) - ms(direct, 0.99)
    n = args.requests * args.rounds
    print(f"\nGET {path} of {intent.name}, {n} sequential requests per target on one keep-alive connection, "
          f"then {args.concurrency} keep-alive clients for {args.seconds:g}s per target (median of 4 slices)\n")
    print(f"{'target':<22} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'req/s':>9}")
    for name, values, rps in (("direct (service port)", direct, direct_rps), ("through the proxy", proxied,
                                                                               proxy_rps)):
        print(f"{name:<22} {ms(values, 0.5):>8.3f} {ms(values, 0.99):>8.3f} {ms(values):>8.3f} {rps:>9.0f}")
    print(f"{'proxy overhead':<22} {p50:>8.3f} {p99:>8.3f} {ms(proxied) - ms(direct):>8.3f} "
          f"{100 * (proxy_rps / direct_rps - 1):>8.1f}%")
    print(f"RESULT proxy_p50_overhead_ms={p50:.3f} proxy_p99_overhead_ms={p99:.3f} direct_rps={direct_rps:.0f} "
          f"proxy_rps={proxy_rps:.0f}")
    if p50 >= 1.0:
        print(f"proxy p50 overhead {p50:.3f} ms is not under 1 ms", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
