"""The official E2B JS SDK (e2b 2.x, unmodified) against `wrenn up`: runs the node test suite in
tests/e2e/js with the `wrenn` fixture's E2B_API_URL / E2B_SANDBOX_URL / E2B_API_KEY.

The suite imports the SDK that scripts/sdk-env.sh installs in tests/sdk/node_modules.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = ROOT / "tests" / "e2e" / "js"
SDK = ROOT / "tests" / "sdk" / "node_modules" / "e2b" / "package.json"
TIMEOUT = float(os.environ.get("WRENN_E2E_JS_TIMEOUT", "900"))


def test_js_sdk_suite(wrenn):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JS SDK suite needs Node.js >= 20")
    assert SDK.exists(), f"{SDK} is missing: run scripts/sdk-env.sh to install the JS SDK"

    env = dict(os.environ)
    env.update({k: wrenn.env[k] for k in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY")})
    env.pop("E2B_DEBUG", None)
    env.pop("E2B_DOMAIN", None)
    # One file at a time: the files share the host's sandbox capacity with each other.
    # WRENN_E2E_JS_ONLY (a file name in tests/e2e/js) runs one file, for development.
    only = os.environ.get("WRENN_E2E_JS_ONLY")
    target = str(JS_DIR / only) if only else str(JS_DIR)
    cmd = [node, "--test", "--test-concurrency=1", "--test-reporter=spec", target]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"the JS suite did not finish in {TIMEOUT:.0f}s; output so far:\n{out or ''}")
    output = proc.stdout + proc.stderr
    print(output)
    if proc.returncode != 0:
        pytest.fail(
            f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{output[-20000:]}",
            pytrace=False,
        )
