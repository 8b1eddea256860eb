"""The official E2B Python SDK's part of `wrenn bench`: time to first command, commands, pause
and resume with memory dirtied, uploads and downloads. `wrenn bench` runs it with a Python
that has the `e2b` package and the connection in the environment (E2B_API_URL,
E2B_SANDBOX_URL, E2B_API_KEY); it prints one JSON object a line and nothing else on stdout:

    {"kind": "info", "e2b_version": "2.63.0"}
    {"kind": "created", "id": "..."}           every sandbox it made, before it uses it
    {"kind": "sample", "metric": "ttfc", "ms": 812.5}
    {"kind": "killed", "id": "..."}
    {"kind": "error", "message": "..."}        then it exits non-zero

`wrenn bench` kills every sandbox it saw created and not killed, so a driver that dies leaves
nothing behind. Run by hand: `.venv/bin/python bench/sdk_bench.py --quick`.
"""

import argparse
import json
import os
import sys
import time

from e2b import Sandbox

MIB = 1 << 20
RUN = os.environ.get("WRENN_BENCH_RUN", "manual")


def emit(**obj):
    print(json.dumps(obj), flush=True)


def sample(metric, seconds):
    emit(kind="sample", metric=metric, ms=seconds * 1000.0)


class Tracked:
    """Every sandbox this driver made, killed at the end whatever happened."""

    def __init__(self):
        self.alive = {}

    def create(self):
        # Tagged with the run, so `wrenn bench` finds even one this driver could not report.
        sbx = Sandbox.create(timeout=600, metadata={"wrenn-bench": RUN})
        self.alive[sbx.sandbox_id] = sbx
        emit(kind="created", id=sbx.sandbox_id)
        return sbx

    def kill(self, sbx):
        sbx.kill()
        self.alive.pop(sbx.sandbox_id, None)
        emit(kind="killed", id=sbx.sandbox_id)

    def kill_all(self):
        for sbx in list(self.alive.values()):
            try:
                self.kill(sbx)
            except Exception as e:  # the Rust side tries again
                print(f"kill {sbx.sandbox_id}: {e}", file=sys.stderr)


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def first_command(t, samples, warmup):
    """Create, first and second `echo`, `kill`: each sample a fresh sandbox."""
    for i in range(warmup + samples):
        t0 = time.perf_counter()
        sbx = t.create()
        t1 = time.perf_counter()
        out = sbx.commands.run("echo ready")
        t2 = time.perf_counter()
        assert out.stdout == "ready\n", out
        _, second = timed(lambda: sbx.commands.run("echo again"))
        _, killed = timed(lambda: t.kill(sbx))
        if i >= warmup:
            sample("sdk_create", t1 - t0)
            sample("ttfc", t2 - t0)
            sample("first_cmd", t2 - t1)
            sample("second_cmd", second)
            sample("sdk_kill", killed)


def exec_true(t, samples, warmup):
    """Round trips of `commands.run("true")` in one sandbox, once warm."""
    sbx = t.create()
    for i in range(warmup + samples):
        out, took = timed(lambda: sbx.commands.run("true"))
        assert out.exit_code == 0, out
        if i >= warmup:
            sample("exec_true", took)
    t.kill(sbx)


def dirty(sbx, mib):
    # tmpfs is guest memory. One random MiB repeated: every page differs from the template's,
    # without waiting for the emulated guest to make `mib` MiB of randomness.
    sbx.commands.run(
        f"head -c {MIB} /dev/urandom > /tmp/r && for i in $(seq {mib}); do cat /tmp/r; done "
        f"> /dev/shm/dirty && rm /tmp/r && sync",
        timeout=600,
    )


def pause_resume(t, mib, samples):
    """Pause and resume of one sandbox with `mib` MiB dirtied in its memory, then the first
    command after each resume. The pages stay dirty: every pause writes them again."""
    sbx = t.create()
    dirty(sbx, mib)
    sbx.commands.run("true")
    for _ in range(samples):
        _, paused = timed(sbx.pause)
        sbx, resumed = timed(lambda: Sandbox.connect(sbx.sandbox_id, timeout=600))
        out, first = timed(lambda: sbx.commands.run("echo back"))
        assert out.stdout == "back\n", out
        sample(f"pause_{mib}", paused)
        sample(f"resume_{mib}", resumed)
        sample(f"after_resume_{mib}", first)
    t.kill(sbx)


def transfer(t, mib, samples):
    """`files.write` and `files.read` of `mib` MiB through the edge proxy."""
    sbx = t.create()
    data = bytes(range(256)) * (mib * MIB // 256)
    for _ in range(samples):
        _, up = timed(lambda: sbx.files.write("/tmp/blob", data, request_timeout=600))
        back, down = timed(lambda: sbx.files.read("/tmp/blob", format="bytes", request_timeout=600))
        assert len(back) == len(data), (len(back), len(data))
        sample(f"upload_{mib}", up)
        sample(f"download_{mib}", down)
    t.kill(sbx)


def pkg_version():
    try:
        from importlib.metadata import version

        return version("e2b")
    except Exception:
        return "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=10, help="samples of create + first command")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--exec-samples", type=int, default=30)
    ap.add_argument("--pause-samples", type=int, default=5, help="pause/resume rounds, 10 MiB")
    ap.add_argument("--pause-big-samples", type=int, default=3, help="pause/resume rounds, 200 MiB")
    ap.add_argument("--transfer-samples", type=int, default=3)
    ap.add_argument("--transfer-mib", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="a few samples of each")
    a = ap.parse_args()
    if a.quick:
        a.samples, a.warmup, a.exec_samples = 2, 0, 5
        a.pause_samples, a.pause_big_samples, a.transfer_samples = 1, 1, 1

    emit(kind="info", e2b_version=pkg_version())
    t = Tracked()
    try:
        first_command(t, a.samples, a.warmup)
        exec_true(t, a.exec_samples, warmup=3)
        pause_resume(t, 10, a.pause_samples)
        pause_resume(t, 200, a.pause_big_samples)
        transfer(t, a.transfer_mib, a.transfer_samples)
    except BaseException as e:  # KeyboardInterrupt too: say why, then clean up
        emit(kind="error", message=f"{type(e).__name__}: {e}")
        t.kill_all()
        sys.exit(1)
    t.kill_all()


if __name__ == "__main__":
    main()
