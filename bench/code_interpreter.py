"""`code-interpreter-v1` through the official code-interpreter SDK (`e2b_code_interpreter`), against
a running Wrenn (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY in the environment, e.g. `source
/var/lib/wrenn/env`): `Sandbox.create()`, the first `run_code`, a second one, and the first
matplotlib figure (PNG). Prints medians and maxima in seconds.

    .venv/bin/python bench/code_interpreter.py --samples 5
"""

import argparse
import statistics
import time

from e2b_code_interpreter import Sandbox

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"


def timed(fn):
    started = time.monotonic()
    value = fn()
    return time.monotonic() - started, value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args()
    runs = {"Sandbox.create()": [], "first run_code": [], "second run_code": [], "first plot": []}
    for _ in range(args.samples):
        t, sbx = timed(lambda: Sandbox.create(timeout=300))
        runs["Sandbox.create()"].append(t)
        try:
            t, ex = timed(lambda: sbx.run_code("1+1"))
            assert ex.text == "2", ex
            runs["first run_code"].append(t)
            t, ex = timed(lambda: sbx.run_code("2+2"))
            assert ex.text == "4", ex
            runs["second run_code"].append(t)
            t, ex = timed(lambda: sbx.run_code(PLOT, timeout=300, request_timeout=300))
            assert ex.error is None and ex.results and ex.results[0].png, ex
            runs["first plot"].append(t)
        finally:
            sbx.kill()
    print(f"| what | median s | max s | samples |\n| --- | --- | --- | --- |")
    for what, values in runs.items():
        print(f"| {what} | {statistics.median(values):.3f} | {max(values):.3f} | {len(values)} |")


if __name__ == "__main__":
    main()
