"""Create latency and creates/s of a Wrenn cluster through one control-plane replica vs. two.

Starts the cluster of tests/e2e/cluster.py (PostgreSQL, two `wrenn server` replicas, three
`wrenn agent`s in network namespaces of their own), then through the REST API:

- create latency at concurrency 1 (each sandbox killed after its create), through replica 0;
- creates/s sustained for `--seconds` at concurrency 8, each worker creating and killing in a
  loop, all through replica 0, then spread over both replicas, alternated `--rounds` times.

Prints one JSON line per figure (median and p99 in ms, count) and a Markdown table. Needs root,
a local PostgreSQL server and the Debian image in the image cache (a `wrenn up` builds it).
Run: `.venv/bin/python bench/cluster_bench.py [--seconds 30]`.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
import cluster as lab  # noqa: E402


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def create_and_kill(client: httpx.Client, url: str, key: str) -> float:
    t = time.perf_counter()
    r = client.post(
        f"{url}/v2/sandboxes",
        headers={"X-API-KEY": key},
        json={"templateID": "base", "timeout": 120},
        timeout=120,
    )
    took = time.perf_counter() - t
    r.raise_for_status()
    sid = r.json()["sandboxID"]
    client.delete(f"{url}/sandboxes/{sid}", headers={"X-API-KEY": key}, timeout=60)
    return took


def sustained(c: lab.Cluster, replicas: list[int], seconds: float, workers: int = 8) -> dict:
    lat: list[float] = []
    errors = 0
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def worker(n: int):
        nonlocal errors
        url = c.server_url(replicas[n % len(replicas)])
        with httpx.Client() as client:
            while time.monotonic() < end:
                try:
                    took = create_and_kill(client, url, c.api_key)
                    with lock:
                        lat.append(took)
                except Exception:
                    with lock:
                        errors += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {
        "replicas": len(replicas),
        "creates": len(lat),
        "errors": errors,
        "creates_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
        "p99_ms": round(pct(lat, 99) * 1000, 1) if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--serial", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    c = lab.Cluster()
    try:
        c.setup()
        with httpx.Client() as client:
            create_and_kill(client, c.server_url(0), c.api_key)  # first create: warm paths
            lat = [create_and_kill(client, c.server_url(0), c.api_key) for _ in range(args.serial)]
        serial = {
            "figure": "create, concurrency 1, one replica",
            "n": len(lat),
            "p50_ms": round(statistics.median(lat) * 1000, 1),
            "p99_ms": round(pct(lat, 99) * 1000, 1),
        }
        print(json.dumps(serial), flush=True)
        # Alternated, so what the machine does meanwhile (the agents' cleanup of the sandboxes
        # killed, page cache) weighs on both the same.
        rounds = []
        for replicas in ([0], [0, 1]) * args.rounds:
            r = sustained(c, replicas, args.seconds)
            print(json.dumps({"figure": "sustained, concurrency 8", **r}), flush=True)
            rounds.append(r)
        print("\n| through | creates/s | create p50 | create p99 | creates | errors |")
        print("|---|---|---|---|---|---|")
        for r in rounds:
            print(
                f"| {r['replicas']} replica(s) | {r['creates_per_s']} | {r['p50_ms']} ms "
                f"| {r['p99_ms']} ms | {r['creates']} | {r['errors']} |"
            )
    finally:
        c.teardown()


if __name__ == "__main__":
    main()
