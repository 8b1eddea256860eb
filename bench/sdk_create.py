"""Create, time-to-first-command, pause and resume through the official E2B Python SDK, against a running
Wrenn (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY in the environment, e.g. `source
/var/lib/wrenn/env`). Prints a Markdown report with medians and p99.

    .venv/bin/python bench/sdk_create.py --samples 30
"""

import argparse
import os
import platform
import statistics
import subprocess
import time

from e2b import Sandbox


def pct(values, p):
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--accel", default=os.environ.get("WRENN_ACCEL", "see `wrenn up` banner"))
    args = ap.parse_args()

    create, first_cmd, echo_only, second, kill = [], [], [], [], []
    pause, resume, after_resume = [], [], []
    for i in range(args.warmup + args.samples):
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        t1 = time.perf_counter()
        out = sbx.commands.run("echo ready")
        t2 = time.perf_counter()
        assert out.stdout == "ready\n", out
        t2b = time.perf_counter()
        sbx.commands.run("echo again")
        t2c = time.perf_counter()
        sbx.pause()
        t4 = time.perf_counter()
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=120)
        t5 = time.perf_counter()
        out = sbx.commands.run("echo back")
        t6 = time.perf_counter()
        assert out.stdout == "back\n", out
        sbx.kill()
        t3 = time.perf_counter()
        if i >= args.warmup:
            create.append((t1 - t0) * 1000)
            first_cmd.append((t2 - t0) * 1000)
            echo_only.append((t2 - t1) * 1000)
            second.append((t2c - t2b) * 1000)
            pause.append((t4 - t2c) * 1000)
            resume.append((t5 - t4) * 1000)
            after_resume.append((t6 - t5) * 1000)
            kill.append((t3 - t6) * 1000)

    cores = os.cpu_count()
    print(f"## Create through the API (Python SDK), {time.strftime('%Y-%m-%d')}\n")
    print(f"Machine: {cpu_model()}, {cores} cores; accelerator: {args.accel}; "
          f"{args.samples} sequential samples after {args.warmup} warm-up; e2b {pkg_version()}.\n")
    print("| step | median ms | p99 ms | min ms | max ms |")
    print("|---|---|---|---|---|")
    for name, vals in [
        ("`Sandbox.create()`", create),
        ("create + first `commands.run('echo')`", first_cmd),
        ("first `commands.run('echo')` alone", echo_only),
        ("second `commands.run('echo')`", second),
        ("`pause()`", pause),
        ("resume: `Sandbox.connect()` of the paused sandbox", resume),
        ("first `commands.run('echo')` after resume", after_resume),
        ("`kill()`", kill),
    ]:
        print(f"| {name} | {statistics.median(vals):.0f} | {pct(vals, 99):.0f} | {min(vals):.0f} | {max(vals):.0f} |")


def pkg_version():
    try:
        from importlib.metadata import version
        return version("e2b")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
