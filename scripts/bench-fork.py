#!/usr/bin/env python3
"""Fork and snapshot latency, and what idle children cost in host memory, through the official
Python SDK against a running `wrenn up` (source its env file: E2B_API_URL, E2B_SANDBOX_URL,
E2B_API_KEY). Prints medians and p99 (over few runs: the p99 is the worst run).

  .venv/bin/python scripts/bench-fork.py [--runs 5] [--state-dir DIR]

`--state-dir` (the instance's, on this machine) adds the proportional set size (PSS) of each
QEMU, read from /proc, for the idle-children measurement, and what a snapshot and a snapshot of
a child made from it store on disk.
"""

import argparse
import statistics
import subprocess
import time
from pathlib import Path

from e2b import Sandbox


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def report(name, xs):
    print(f"{name}: median {statistics.median(xs):.3f} s, p99 {pct(xs, 99):.3f} s (n={len(xs)})")


def dirty(s: Sandbox, mib: int):
    # tmpfs: memory, not disk.
    s.commands.run(f"head -c {mib << 20} /dev/urandom > /dev/shm/dirty && sync", timeout=300)


def qemu_pss_kib(sandbox_ids, state_dir: Path) -> dict:
    out = {}
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        for sid in sandbox_ids:
            if f"{state_dir}/sandboxes/{sid}/" in args:
                for l in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if l.startswith("Pss:"):
                        out[sid] = int(l.split()[1])
    return out


def stored_mb(state_dir: Path, snapshot_id: str) -> tuple:
    """What a snapshot's directory holds on disk (allocated bytes): its memory diff and its disk
    layer, in MB."""
    d = state_dir / "snapshots" / snapshot_id
    size = lambda f: (d / f).stat().st_blocks * 512 / 1e6 if (d / f).exists() else 0.0
    return size("memory.diff"), size("rootfs.qcow2")


def layered_sizes(src: Sandbox, state_dir: Path):
    """A snapshot of the source, a child from it that changes a little, and the child's
    snapshot: what each stores itself."""
    src.commands.run("head -c 8M /dev/urandom > /dev/shm/parent && sync", timeout=120)
    parent = src.create_snapshot()
    child = Sandbox.create(template=parent.snapshot_id, timeout=600)
    try:
        child.commands.run("echo child > /home/user/child.txt && head -c 1M /dev/urandom > /dev/shm/child && sync")
        grandchild = child.create_snapshot()
        pm, pd = stored_mb(state_dir, parent.snapshot_id)
        cm, cd = stored_mb(state_dir, grandchild.snapshot_id)
        print(f"snapshot of the source stores: memory {pm:.1f} MB, disk {pd:.1f} MB")
        print(f"snapshot of a child of it stores: memory {cm:.1f} MB, disk {cd:.1f} MB")
        Sandbox.delete_snapshot(grandchild.snapshot_id)
    finally:
        child.kill()
        Sandbox.delete_snapshot(parent.snapshot_id)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--state-dir", type=Path)
    a = ap.parse_args()

    src = Sandbox.create(timeout=1800)
    try:
        for n in (1, 8):
            totals = []
            for _ in range(a.runs):
                t = time.monotonic()
                forks = src.fork(count=n, timeout=600)
                totals.append(time.monotonic() - t)
                errors = [f for f in forks if isinstance(f, Exception)]
                assert not errors, errors
                if n == 8 and a.state_dir and len(totals) == 1:
                    time.sleep(5)
                    ids = [f.sandbox_id for f in forks] + [src.sandbox_id]
                    pss = qemu_pss_kib(ids, a.state_dir)
                    kids = [pss[i] for i in ids[:-1] if i in pss]
                    if kids:
                        print(
                            f"idle PSS: source {pss.get(src.sandbox_id, 0) / 1024:.1f} MiB, "
                            f"children median {statistics.median(kids) / 1024:.1f} MiB, "
                            f"max {max(kids) / 1024:.1f} MiB (n={len(kids)})"
                        )
                for f in forks:
                    f.kill()
            report(f"fork N={n} total", totals)
            report(f"fork N={n} per child", [t / n for t in totals])
        for mib in (10, 200):
            times = []
            for _ in range(a.runs):
                dirty(src, mib)
                t = time.monotonic()
                snap = src.create_snapshot()
                times.append(time.monotonic() - t)
                Sandbox.delete_snapshot(snap.snapshot_id)
            report(f"snapshot of a running sandbox, {mib} MiB dirtied", times)
        if a.state_dir:
            layered_sizes(src, a.state_dir)
    finally:
        src.kill()


if __name__ == "__main__":
    main()
