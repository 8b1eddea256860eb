#!/usr/bin/env bash
# Runs the official E2B SDKs' own test suites (e2b-dev/E2B: packages/python-sdk/tests/{sync,async}
# with pytest, packages/js-sdk/tests with vitest) against a `wrenn up` of its own.
#
#   tests/upstream/run.sh [python-sync|python-async|js|all] [--e2b-checkout DIR]
#
# DIR is an e2b-dev/E2B checkout or bare clone (default: $E2B_CHECKOUT, else the local mirror
# /work/.mirror/e2b-dev+E2B/repo). The upstream tests are exported to a temporary directory
# outside this repository and are never copied into it. tests/upstream/exclusions.toml says
# which of them are not run, and why.
#
# Pinned SDKs: Python `e2b` as in tests/sdk/requirements.txt, JS `e2b` as in
# tests/sdk/package.json, in a venv (target/upstream/venv) and a node directory
# (target/upstream/js) of their own, made on first use (PyPI and npm are needed then).
#
# Tests reach nothing outside this machine: every suite runs in a network namespace (and mount
# namespace) of its own that has only loopback, where a bridge on 127.0.0.1:<port> forwards
# to `wrenn up` through a Unix socket; DNS there resolves nothing.
#
# Results: target/upstream/results/<suite>.xml (JUnit) and <suite>.json, summary.txt,
# wrenn-up.log. Runs as root (wrenn up needs it). Environment:
#   WRENN_UPSTREAM_ALLOW_UNREVIEWED=1  run an upstream commit other than the reviewed one
#   WRENN_UPSTREAM_KEEP=1              keep the temporary directory
#   WRENN_BIN, WRENN_GUEST_ENVD        the wrenn binary / guest envd to copy (defaults below)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tests/upstream"
UP="$ROOT/target/upstream"
VENV="$UP/venv"
JSDIR="$UP/js"
BIN="$UP/bin"
STATE="$UP/state"
RESULTS="$UP/results"
EXCLUSIONS="$HERE/exclusions.toml"

# Guests run under TCG emulation here (no KVM), several times slower than E2B's cloud that
# the upstream suites are tuned for (pytest.ini says 30 s, vitest 30 s): allow 180 s a test.
TEST_TIMEOUT=180
# Test-runner pins: upstream's own lock files at the reviewed commit (uv.lock, pnpm-lock.yaml).
PY_TEST_DEPS=(pytest==9.1.1 pytest-asyncio==1.4.0 pytest-timeout==2.4.0 pytest-dotenv==0.5.2 python-dotenv==1.2.2)
JS_VITEST=4.1.10
JS_MSW=2.12.14 # only imported while collecting (the msw suites themselves are excluded)
JS_TAR=7.5.21
JS_DOTENV=16.4.5

usage() {
  echo "usage: tests/upstream/run.sh [python-sync|python-async|js|all] [--e2b-checkout DIR]" >&2
  exit 2
}

SUITE=all
CHECKOUT="${E2B_CHECKOUT:-/work/.mirror/e2b-dev+E2B/repo}"
while [ $# -gt 0 ]; do
  case "$1" in
    python-sync | python-async | js | all) SUITE="$1" ;;
    --e2b-checkout)
      [ $# -ge 2 ] || usage
      CHECKOUT="$2"
      shift
      ;;
    --e2b-checkout=*) CHECKOUT="${1#*=}" ;;
    -h | --help) usage ;;
    *) usage ;;
  esac
  shift
done
case "$SUITE" in
  all) SUITES=(python-sync python-async js) ;;
  *) SUITES=("$SUITE") ;;
esac

log() { echo "==> $*" >&2; }
die() {
  echo "error: $*" >&2
  exit 1
}

NEED_JS=0
for s in "${SUITES[@]}"; do
  [ "$s" != js ] || NEED_JS=1
done

[ "$(id -u)" = 0 ] || die "must run as root (wrenn up needs network namespaces, taps and nftables)"
for tool in unshare ip mount git tar flock; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
if [ "$NEED_JS" = 1 ]; then
  for tool in npm node; do
    command -v "$tool" >/dev/null || die "$tool not found"
  done
fi

mkdir -p "$UP" "$BIN" "$RESULTS"
# One run at a time: a run owns target/upstream (its state directory, results, copies).
exec 9>"$UP/run.lock"
flock -n 9 || die "another tests/upstream/run.sh is running"

# ------------------------------------------------------------------------------------------
# Cleanup: always stop our wrenn up (SIGTERM) and whatever QEMU it left.
# ------------------------------------------------------------------------------------------
WORK=""
WRENN_PID=""
BRIDGE_PID=""

qemu_pids() {
  # QEMU processes of our state directory only (their command lines name its files).
  local pid
  for pid in $(pgrep -f qemu-system 2>/dev/null || true); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$STATE/"; then
      echo "$pid"
    fi
  done
}

kill_qemu_leftovers() {
  local pids
  pids="$(qemu_pids)"
  [ -n "$pids" ] || return 0
  log "killing leftover QEMU processes: $(echo $pids)"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  sleep 3
  pids="$(qemu_pids)"
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
}

cleanup() {
  local rc=$?
  set +e
  if [ -n "$BRIDGE_PID" ]; then
    kill "$BRIDGE_PID" 2>/dev/null
    wait "$BRIDGE_PID" 2>/dev/null
  fi
  if [ -n "$WRENN_PID" ] && kill -0 "$WRENN_PID" 2>/dev/null; then
    log "stopping wrenn up (SIGTERM, pid $WRENN_PID)"
    kill -TERM "$WRENN_PID"
    for _ in $(seq 1 180); do
      kill -0 "$WRENN_PID" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$WRENN_PID" 2>/dev/null; then
      log "wrenn up did not stop in 180 s: SIGKILL"
      kill -KILL "$WRENN_PID"
    fi
    wait "$WRENN_PID" 2>/dev/null
    log "wrenn up exited with $?"
  fi
  kill_qemu_leftovers
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    if [ "${WRENN_UPSTREAM_KEEP:-0}" = 1 ]; then
      log "kept $WORK"
    else
      rm -rf "$WORK"
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK="$(mktemp -d /var/tmp/wrenn-upstream.XXXXXX)"
case "$WORK/" in "$ROOT"/*) die "temporary directory $WORK is inside the repository" ;; esac

# ------------------------------------------------------------------------------------------
# Pinned versions
# ------------------------------------------------------------------------------------------
E2B_PY="$(sed -n 's/^e2b==\([^ #]*\).*/\1/p' "$ROOT/tests/sdk/requirements.txt")"
[ -n "$E2B_PY" ] || die "no e2b pin in tests/sdk/requirements.txt"
E2B_JS="$(sed -n 's/^ *"e2b": *"\([^"]*\)".*/\1/p' "$ROOT/tests/sdk/package.json")"
[ -n "$E2B_JS" ] || die "no e2b pin in tests/sdk/package.json"

# ------------------------------------------------------------------------------------------
# The venv and the node directory
# ------------------------------------------------------------------------------------------
base_python() {
  if [ -x "$ROOT/.venv/bin/python" ]; then
    "$ROOT/.venv/bin/python" -c 'import sys; print(sys._base_executable)'
  else
    command -v python3
  fi
}

prepare_venv() {
  local stamp="e2b==$E2B_PY ${PY_TEST_DEPS[*]}"
  if [ -f "$VENV/.wrenn-stamp" ] && [ "$(cat "$VENV/.wrenn-stamp")" = "$stamp" ]; then
    return
  fi
  log "making $VENV ($stamp)"
  rm -rf "$VENV"
  "$(base_python)" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "e2b==$E2B_PY" "${PY_TEST_DEPS[@]}"
  echo "$stamp" >"$VENV/.wrenn-stamp"
}

prepare_js() {
  local stamp="e2b@$E2B_JS vitest@$JS_VITEST msw@$JS_MSW tar@$JS_TAR dotenv@$JS_DOTENV"
  if [ -f "$JSDIR/.wrenn-stamp" ] && [ "$(cat "$JSDIR/.wrenn-stamp")" = "$stamp" ] && [ -d "$JSDIR/node_modules/e2b" ]; then
    return
  fi
  log "making $JSDIR ($stamp)"
  rm -rf "$JSDIR"
  mkdir -p "$JSDIR"
  cat >"$JSDIR/package.json" <<EOF
{
  "name": "wrenn-upstream-js",
  "private": true,
  "type": "module",
  "dependencies": {
    "e2b": "$E2B_JS",
    "vitest": "$JS_VITEST",
    "msw": "$JS_MSW",
    "tar": "$JS_TAR",
    "dotenv": "$JS_DOTENV"
  }
}
EOF
  (cd "$JSDIR" && npm install --no-audit --no-fund --ignore-scripts --loglevel=error >&2)
  echo "$stamp" >"$JSDIR/.wrenn-stamp"
}

prepare_venv # the helpers below run on the venv's Python (3.11+, tomllib) whatever the suite
[ "$NEED_JS" = 0 ] || prepare_js
PY="$VENV/bin/python"

# ------------------------------------------------------------------------------------------
# Export the upstream tests (outside the repository)
# ------------------------------------------------------------------------------------------
UPSTREAM_PATHS=(packages/python-sdk/tests packages/python-sdk/pytest.ini packages/js-sdk/tests packages/js-sdk/package.json packages/js-sdk/tsconfig.json)
[ -e "$CHECKOUT" ] || die "no e2b checkout at $CHECKOUT (pass --e2b-checkout DIR)"
if [ -d "$CHECKOUT/packages/python-sdk/tests" ]; then
  UPSTREAM_COMMIT="$(git -C "$CHECKOUT" rev-parse HEAD 2>/dev/null || echo unknown)"
  if [ -n "$(git -C "$CHECKOUT" status --porcelain -- packages/python-sdk/tests packages/js-sdk/tests 2>/dev/null)" ]; then
    UPSTREAM_COMMIT="$UPSTREAM_COMMIT+modified"
  fi
  for p in "${UPSTREAM_PATHS[@]}"; do
    mkdir -p "$WORK/$(dirname "$p")"
    cp -a "$CHECKOUT/$p" "$WORK/$p"
  done
else
  GIT_DIR_="$CHECKOUT"
  [ -d "$CHECKOUT/.git" ] && GIT_DIR_="$CHECKOUT/.git"
  UPSTREAM_COMMIT="$(git --git-dir="$GIT_DIR_" rev-parse HEAD)"
  git --git-dir="$GIT_DIR_" archive HEAD "${UPSTREAM_PATHS[@]}" | tar -x -C "$WORK"
fi
REVIEWED="$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["reviewed"]["commit"])' "$EXCLUSIONS")"
log "upstream tests: e2b-dev/E2B $UPSTREAM_COMMIT (from $CHECKOUT) in $WORK"
if [ "$UPSTREAM_COMMIT" != "$REVIEWED" ]; then
  if [ "${WRENN_UPSTREAM_ALLOW_UNREVIEWED:-0}" = 1 ]; then
    log "WARNING: upstream $UPSTREAM_COMMIT is not the reviewed $REVIEWED: new tests run unread (network isolation still applies)"
  else
    die "upstream $UPSTREAM_COMMIT is not the commit whose tests were reviewed ($REVIEWED); read the new tests, update exclusions.toml, or set WRENN_UPSTREAM_ALLOW_UNREVIEWED=1"
  fi
fi

# ------------------------------------------------------------------------------------------
# Helpers, written into the temporary directory
# ------------------------------------------------------------------------------------------
mkdir -p "$WORK/helpers" "$WORK/etc"

cat >"$WORK/helpers/upstream_common.py" <<'PYEOF'
"""Shared by the pytest plugin and the runner's helpers: exclusions.toml and its matching."""
import tomllib


def covers(entry: str, test_id: str) -> bool:
    if test_id == entry:
        return True
    if entry.endswith("/"):
        return test_id.startswith(entry)
    return any(test_id.startswith(entry + sep) for sep in ("::", "[", " > "))


def load(path):
    with open(path, "rb") as f:
        data = tomllib.load(f)
    rules = []
    for e in data.get("exclude", []):
        rules.append({"kind": "excluded", "reason": e["reason"], "python": e.get("python", []), "js": e.get("js", [])})
    for p in data.get("pending", []):
        rules.append({
            "kind": "pending-run" if p["run"] else "pending-not-run",
            "reason": p["reason"], "issue": str(p["issue"]), "topic": p["topic"],
            "python": p.get("python", []), "js": p.get("js", []),
        })
    # Exclusions win over pending entries.
    rules.sort(key=lambda r: r["kind"] != "excluded")
    return rules


def classify(rules, lang, test_id):
    for r in rules:
        for entry in r[lang]:
            if covers(entry, test_id):
                out = {"category": r["kind"], "reason": r["reason"], "rule": entry}
                if "issue" in r:
                    out.update(issue=r["issue"], topic=r["topic"])
                return out
    return {"category": "run"}


def unused(rules, lang, test_ids, scope):
    """Entries within `scope` (a path prefix) that match no collected test."""
    out = []
    for r in rules:
        for entry in r[lang]:
            if entry.startswith(scope) and not any(covers(entry, t) for t in test_ids):
                out.append(entry)
    return out
PYEOF

cat >"$WORK/helpers/wrenn_upstream_pytest.py" <<'PYEOF'
"""pytest plugin: deselects what exclusions.toml does not run, records every outcome."""
import json
import os
import time

import pytest

import upstream_common

RULES = upstream_common.load(os.environ["WRENN_UPSTREAM_EXCLUSIONS"])
OUT = os.environ["WRENN_UPSTREAM_OUT"]
SCOPE = os.environ["WRENN_UPSTREAM_SCOPE"]
STATE = {"tests": {}, "collect_errors": [], "started": time.time()}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    keep, drop = [], []
    for item in items:
        c = upstream_common.classify(RULES, "python", item.nodeid)
        STATE["tests"][item.nodeid] = dict(c, outcome=None)
        (drop if c["category"] in ("excluded", "pending-not-run") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    STATE["unused_rules"] = upstream_common.unused(RULES, "python", list(STATE["tests"]), SCOPE)


def pytest_collectreport(report):
    if report.failed:
        STATE["collect_errors"].append({"nodeid": report.nodeid, "message": str(report.longrepr)[-2000:]})


def pytest_runtest_logreport(report):
    t = STATE["tests"].setdefault(report.nodeid, {"category": "run", "outcome": None})
    t["duration"] = t.get("duration", 0) + report.duration
    if report.when == "call" or report.failed or report.skipped:
        if t["outcome"] in ("failed", "error"):
            return  # keep the first failure (a teardown after a failed call)
        if report.failed:
            t["outcome"] = "failed" if report.when == "call" else "error"
            crash = getattr(report.longrepr, "reprcrash", None)
            t["message"] = crash.message if crash else str(report.longrepr)[-1500:]
            t["when"] = report.when
            t["longrepr"] = str(report.longrepr)[-6000:]
        elif report.skipped:
            t["outcome"] = "skipped"
            if isinstance(report.longrepr, tuple):
                t["message"] = report.longrepr[2]
        else:
            t["outcome"] = "passed"


def pytest_sessionfinish(session, exitstatus):
    STATE["duration"] = time.time() - STATE.pop("started")
    STATE["exitstatus"] = int(exitstatus)
    with open(OUT, "w") as f:
        json.dump(STATE, f, indent=1)
PYEOF

cat >"$WORK/helpers/runner.py" <<'PYEOF'
"""The runner's helpers: the Unix-socket bridge, the vitest plan, the summary."""
import asyncio
import json
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import upstream_common  # noqa: E402


# --- bridge -----------------------------------------------------------------------------

async def _pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError, RuntimeError):
            pass


def _handler(connect):
    async def handle(cr, cw):
        try:
            ur, uw = await connect()
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pump(cr, uw), _pump(ur, cw))
        for w in (cw, uw):
            try:
                w.close()
            except (ConnectionError, OSError, RuntimeError):
                pass
    return handle


async def _bridge(mode, a, b):
    if mode == "unix-to-tcp":  # host side: Unix socket a -> TCP b
        host, port = b.rsplit(":", 1)
        server = await asyncio.start_unix_server(
            _handler(lambda: asyncio.open_connection(host, int(port))), path=a)
    else:  # in the test namespace: TCP a -> Unix socket b
        host, port = a.rsplit(":", 1)
        server = await asyncio.start_server(
            _handler(lambda: asyncio.open_unix_connection(b)), host, int(port))
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


# --- vitest plan --------------------------------------------------------------------------

def js_plan(exclusions, collected_path, out_path):
    rules = upstream_common.load(exclusions)
    collected = json.load(open(collected_path))
    tests = {}
    for t in collected["tests"]:
        tid = f"{t['file']}::{t['name']}"
        tests.setdefault(tid, dict(upstream_common.classify(rules, "js", tid), file=t["file"], count=0))
        tests[tid]["count"] += 1  # upstream repeats a few names in one file
    run_files = sorted({t["file"] for t in tests.values() if t["category"] in ("run", "pending-run")})
    drop = sorted(tid for tid, t in tests.items()
                  if t["file"] in run_files and t["category"] in ("excluded", "pending-not-run"))
    plan = {
        "tests": tests,
        "run_files": run_files,
        "drop": drop,
        "collect_failed": collected["failed"],
        "unused_rules": upstream_common.unused(rules, "js", list(tests), "tests/"),
    }
    json.dump(plan, open(out_path, "w"), indent=1)


# --- summary ------------------------------------------------------------------------------

def _js_outcomes(plan, report_path, root):
    tests = {tid: dict(t, outcome=None) for tid, t in plan["tests"].items()}
    if not os.path.exists(report_path):
        return tests, None
    report = json.load(open(report_path))
    for f in report.get("testResults", []):
        rel = os.path.relpath(f["name"], root)
        for a in f.get("assertionResults", []):
            tid = f"{rel}::{' > '.join(a.get('ancestorTitles', []) + [a['title']])}"
            t = tests.setdefault(tid, {"category": "run", "file": rel, "count": 1})
            status = {"passed": "passed", "failed": "failed"}.get(a["status"], "skipped")
            if t.get("outcome") == "failed":
                continue
            t["outcome"] = status
            t["duration"] = (a.get("duration") or 0) / 1000
            if status == "failed":
                msgs = a.get("failureMessages") or []
                t["message"] = (msgs[0].splitlines() or [""])[0][:500] if msgs else ""
                t["longrepr"] = "\n".join(msgs)[-6000:]
        if f.get("status") == "failed" and not f.get("assertionResults"):
            tests[f"{rel}::<file>"] = {"category": "run", "file": rel, "count": 1,
                                       "outcome": "error", "message": (f.get("message") or "")[:500]}
    return tests, report


def summary(suite, results_dir, extra):
    results_dir = Path(results_dir)
    if suite == "js":
        plan = json.load(open(results_dir / "js.plan.json"))
        tests, _ = _js_outcomes(plan, results_dir / "js.vitest.json", extra)
        data = {"tests": tests, "collect_errors": plan["collect_failed"], "unused_rules": plan["unused_rules"]}
        json.dump(data, open(results_dir / "js.json", "w"), indent=1)
    else:
        data = json.load(open(results_dir / f"{suite}.json"))
        tests = data["tests"]
    n = lambda t: t.get("count", 1)  # noqa: E731
    collected = sum(n(t) for t in tests.values() if not t.get("file", "").endswith("<file>"))
    by = {}
    for t in tests.values():
        by.setdefault(t["category"], []).append(t)
    excluded = by.get("excluded", [])
    pend_run = by.get("pending-run", [])
    pend_not = by.get("pending-not-run", [])
    ran = [t for t in tests.values() if t["category"] in ("run", "pending-run")]
    outcome = lambda ts, o: sum(n(t) for t in ts if t.get("outcome") == o)  # noqa: E731
    lines = [f"== {suite}",
             f"collected upstream: {collected}",
             f"excluded: {sum(n(t) for t in excluded)}"]
    reasons = {}
    for t in excluded:
        reasons[t["reason"]] = reasons.get(t["reason"], 0) + n(t)
    for r, c in sorted(reasons.items(), key=lambda x: -x[1]):
        lines.append(f"    {c:4d}  {r}")
    lines.append(f"pending: {sum(n(t) for t in pend_run + pend_not)} "
                 f"(run: {sum(n(t) for t in pend_run)}, not run: {sum(n(t) for t in pend_not)})")
    issues = {}
    for t in pend_run + pend_not:
        k = (t["issue"], t["topic"], t["category"])
        issues[k] = issues.get(k, 0) + n(t)
    for (issue, topic, cat), c in sorted(issues.items()):
        lines.append(f"    {c:4d}  issue {issue} ({topic}), {'run' if cat == 'pending-run' else 'not run'}")
    lines.append(f"run: {sum(n(t) for t in ran)}  passed: {outcome(ran, 'passed')}  "
                 f"failed: {outcome(ran, 'failed') + outcome(ran, 'error')}  skipped: {outcome(ran, 'skipped')}"
                 f"  (not reached: {sum(n(t) for t in ran if t.get('outcome') is None)})")
    lines.append(f"  of them pending: passed {outcome(pend_run, 'passed')}, "
                 f"failed {outcome(pend_run, 'failed') + outcome(pend_run, 'error')}, skipped {outcome(pend_run, 'skipped')}")
    if data.get("collect_errors"):
        lines.append(f"collection errors: {len(data['collect_errors'])}")
        for e in data["collect_errors"]:
            where = e.get("nodeid") or e.get("file")
            in_file = [t for tid, t in tests.items() if tid.startswith(where + "::")]
            note = " (not run anyway; its tests counted by static parsing)" if in_file and all(
                t["category"] in ("excluded", "pending-not-run") for t in in_file) else ""
            msg = " ".join(str(e.get("message") or e.get("error")).split())[-300:]
            lines.append(f"    {where}{note}: {msg}")
    if data.get("unused_rules"):
        lines.append("exclusions.toml entries that match nothing here: " + ", ".join(data["unused_rules"]))
    fails = [(tid, t) for tid, t in tests.items() if t.get("outcome") in ("failed", "error")]
    if fails:
        lines.append("failures:")
        for tid, t in sorted(fails):
            tag = " [pending issue %s]" % t["issue"] if t["category"] == "pending-run" else ""
            msg = " ".join(str(t.get("message", "")).split())[:300]
            lines.append(f"  {tid}{tag}\n      {msg}")
    text = "\n".join(lines)
    print(text)
    with open(results_dir / "summary.txt", "a") as f:
        f.write(text + "\n\n")


def main():
    cmd = sys.argv[1]
    if cmd == "free-port":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            print(s.getsockname()[1])
    elif cmd == "bridge":
        asyncio.run(_bridge(*sys.argv[2:5]))
    elif cmd == "js-plan":
        js_plan(*sys.argv[2:5])
    elif cmd == "summary":
        summary(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
PYEOF

# The vitest side: a collector, a setup file that skips single excluded tests before their
# fixtures (a sandbox) are made, and configs that resolve the tests' `../src` imports to the
# installed package.
cat >"$WORK/helpers/vitest-collect.mjs" <<'JSEOF'
// Collects (imports, does not run) every upstream test file; prints the tests it found and
// the files that could not be loaded.
import { writeFileSync } from 'node:fs'
import { createVitest } from 'vitest/node'

const [config, out] = process.argv.slice(2)
const vitest = await createVitest('test', { config, watch: false, run: true, reporters: [] })
const tests = []
const failed = []
const seen = new Set()
for (const staticParse of [false, true]) {
  // Dynamic collection first; files it cannot load are parsed statically.
  const res = await vitest.collect([], staticParse ? { staticParse: true } : {})
  for (const m of res.testModules) {
    const file = m.relativeModuleId
    if (seen.has(file)) continue
    const errors = m.errors()
    if (errors.length && !staticParse) {
      failed.push({ file, error: String(errors[0].message).slice(0, 300) })
      continue
    }
    seen.add(file)
    for (const t of m.children.allTests()) tests.push({ file, name: t.fullName, static: staticParse })
  }
}
writeFileSync(out, JSON.stringify({ tests, failed }, null, 1))
await vitest.close()
process.exit(0)
JSEOF

cat >"$WORK/helpers/vitest-setup.ts" <<'JSEOF'
import { beforeEach } from 'vitest'

// Single tests that exclusions.toml does not run, in files that do run: skipped before the
// test body, so their fixtures (a sandbox) are never made.
const drop = new Set<string>(JSON.parse(process.env.WRENN_UPSTREAM_DROP || '[]'))

beforeEach(({ task, skip }) => {
  const names: string[] = []
  let s: any = task
  while (s && s !== s.file && s.type !== 'module') {
    names.unshift(s.name)
    s = s.suite
  }
  const id = `${task.file.name}::${names.join(' > ')}`
  if (drop.has(id)) skip(`not run (tests/upstream/exclusions.toml): ${id}`)
})
JSEOF

# ------------------------------------------------------------------------------------------
# wrenn up
# ------------------------------------------------------------------------------------------
WRENN_SRC="${WRENN_BIN:-$ROOT/target/debug/wrenn}"
[ -x "$WRENN_SRC" ] || die "$WRENN_SRC not found: build it with \`cargo build -p wrenn\`"
ENVD_SRC="${WRENN_GUEST_ENVD:-}"
if [ -z "$ENVD_SRC" ]; then
  for c in "$ROOT/target/x86_64-unknown-linux-gnu/guest/envd" /usr/local/lib/wrenn/envd; do
    if [ -f "$c" ]; then
      ENVD_SRC="$c"
      break
    fi
  done
fi
[ -n "$ENVD_SRC" ] || die "no guest envd (run scripts/build-guest-envd.sh or set WRENN_GUEST_ENVD)"
# Copies, so a concurrent cargo build cannot replace them mid-run. The copied binary would
# look for the guest envd next to its own build directory, so it gets --envd explicitly.
# The upstream suites are the base SDK's: no code-interpreter template (--no-code-interpreter).
cp "$WRENN_SRC" "$BIN/wrenn.tmp" && mv -f "$BIN/wrenn.tmp" "$BIN/wrenn"
cp "$ENVD_SRC" "$BIN/envd.tmp" && mv -f "$BIN/envd.tmp" "$BIN/envd"

kill_qemu_leftovers # of an earlier run that was killed
# A fresh state each run (the built template is kept: it only depends on the image).
if [ -d "$STATE" ]; then
  find "$STATE" -mindepth 1 -maxdepth 1 ! -name templates -exec rm -rf {} +
fi
mkdir -p "$STATE"

: >"$RESULTS/summary.txt"
PORT="$("$PY" "$WORK/helpers/runner.py" free-port)"
log "starting wrenn up on 127.0.0.1:$PORT (state $STATE, log $RESULTS/wrenn-up.log)"
"$BIN/wrenn" up \
  --state-dir "$STATE" \
  --listen "127.0.0.1:$PORT" \
  --first-slot 24576 --slots 1024 \
  --uplink none \
  --progress plain \
  --envd "$BIN/envd" \
  --no-code-interpreter \
  >"$WORK/wrenn-up.out" 2>"$RESULTS/wrenn-up.log" 9>&- &
WRENN_PID=$!

deadline=$((SECONDS + ${WRENN_UPSTREAM_START_TIMEOUT:-1200}))
until grep -q '^export E2B_API_KEY=' "$WORK/wrenn-up.out" 2>/dev/null; do
  kill -0 "$WRENN_PID" 2>/dev/null || {
    tail -40 "$RESULTS/wrenn-up.log" >&2
    die "wrenn up exited before it was ready"
  }
  [ "$SECONDS" -lt "$deadline" ] || die "wrenn up not ready in time; see $RESULTS/wrenn-up.log"
  sleep 1
done
E2B_API_URL="$(sed -n 's/^export E2B_API_URL=//p' "$WORK/wrenn-up.out")"
E2B_SANDBOX_URL="$(sed -n 's/^export E2B_SANDBOX_URL=//p' "$WORK/wrenn-up.out")"
E2B_API_KEY="$(sed -n 's/^export E2B_API_KEY=//p' "$WORK/wrenn-up.out")"
case "$E2B_API_URL $E2B_SANDBOX_URL" in
  "http://127.0.0.1:$PORT http://127.0.0.1:$PORT") ;;
  *) die "unexpected wrenn up URLs: $E2B_API_URL $E2B_SANDBOX_URL" ;;
esac
log "wrenn up ready: $E2B_API_URL"

# The host end of the bridge into the test namespaces.
SOCK="$WORK/wrenn.sock"
"$PY" "$WORK/helpers/runner.py" bridge unix-to-tcp "$SOCK" "127.0.0.1:$PORT" >"$WORK/bridge.out" 2>&1 9>&- &
BRIDGE_PID=$!
for _ in $(seq 1 50); do
  [ -S "$SOCK" ] && break
  sleep 0.1
done
[ -S "$SOCK" ] || die "bridge did not start"

# ------------------------------------------------------------------------------------------
# The isolated namespace every suite runs in
# ------------------------------------------------------------------------------------------
printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"$WORK/etc/resolv.conf"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files\n' >"$WORK/etc/nsswitch.conf"
cat >"$WORK/helpers/in-netns.sh" <<'SHEOF'
#!/usr/bin/env bash
# Runs "$@" inside the fresh network + mount namespace: only loopback, DNS resolves nothing,
# 127.0.0.1:$PORT bridged to wrenn up.
set -euo pipefail
ip link set lo up
# No name resolution that could leave through a host daemon's Unix socket.
resolv="$(readlink -f /etc/resolv.conf || true)"
[ -n "$resolv" ] && [ -e "$resolv" ] && mount --bind "$WORK/etc/resolv.conf" "$resolv"
mount --bind "$WORK/etc/nsswitch.conf" /etc/nsswitch.conf
for d in /run/systemd/resolve /run/nscd /var/run/nscd; do
  [ -d "$d" ] && mount -t tmpfs none "$d"
done
# Nothing but loopback, no routes.
links="$(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')"
[ "$links" = "lo " ] || { echo "isolation check failed: links $links" >&2; exit 1; }
[ -z "$(ip -4 route show table main)" ] && [ -z "$(ip -6 route show table main | grep -v '^::1 ' || true)" ] \
  || { echo "isolation check failed: routes" >&2; exit 1; }
"$PY" "$WORK/helpers/runner.py" bridge tcp-to-unix "127.0.0.1:$PORT" "$SOCK" >"$WORK/bridge-ns.out" 2>&1 &
bridge=$!
trap 'kill $bridge 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  grep -q ready "$WORK/bridge-ns.out" 2>/dev/null && break
  sleep 0.1
done
grep -q ready "$WORK/bridge-ns.out" || { echo "namespace bridge did not start" >&2; exit 1; }
"$@"
SHEOF
chmod +x "$WORK/helpers/in-netns.sh"

in_netns() {
  env -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u all_proxy -u ALL_PROXY \
    -u no_proxy -u NO_PROXY -u E2B_DOMAIN -u E2B_DEBUG -u E2B_ACCESS_TOKEN -u CI \
    WORK="$WORK" PY="$PY" PORT="$PORT" SOCK="$SOCK" \
    E2B_API_URL="$E2B_API_URL" E2B_SANDBOX_URL="$E2B_SANDBOX_URL" E2B_API_KEY="$E2B_API_KEY" \
    unshare --net --mount --propagation private -- "$WORK/helpers/in-netns.sh" "$@"
}

# ------------------------------------------------------------------------------------------
# Suites
# ------------------------------------------------------------------------------------------
run_python() {
  local suite="$1" dir="$2"
  rm -f "$RESULTS/$suite.xml" "$RESULTS/$suite.json"
  log "$suite: pytest $dir"
  (
    cd "$WORK/packages/python-sdk"
    # Serial (2 cores), no cache in the export, our per-test timeout (upstream's markers that
    # set one stay), and the plugin that applies exclusions.toml.
    in_netns env PYTHONPATH="$WORK/helpers" \
      WRENN_UPSTREAM_EXCLUSIONS="$EXCLUSIONS" WRENN_UPSTREAM_OUT="$RESULTS/$suite.json" \
      WRENN_UPSTREAM_SCOPE="$dir/" \
      "$PY" -m pytest "$dir" -p no:cacheprovider -p wrenn_upstream_pytest \
      --timeout "$TEST_TIMEOUT" --continue-on-collection-errors \
      --junitxml "$RESULTS/$suite.xml" -o junit_suite_name="$suite" -q -rfE
  ) || true
  [ -f "$RESULTS/$suite.json" ] || die "$suite: pytest wrote no results"
}

run_js() {
  local js="$WORK/packages/js-sdk"
  rm -f "$RESULTS"/js.*
  ln -sfn "$JSDIR/node_modules" "$js/node_modules"
  cp "$WORK/helpers/vitest-setup.ts" "$js/wrenn-vitest-setup.ts"
  cp "$WORK/helpers/vitest-collect.mjs" "$js/wrenn-vitest-collect.mjs"
  # Collecting: every `../src...` import resolves to the package, so every file loads that can.
  cat >"$js/wrenn-vitest-collect.config.mts" <<'EOF'
import { defineConfig } from 'vitest/config'
export default defineConfig({
  resolve: { alias: [{ find: /^(\.\.\/)+src(\/.*)?$/, replacement: 'e2b' }] },
  test: { include: ['tests/**/*.test.{ts,tsx}'], environment: 'node' },
})
EOF
  log "js: collecting"
  (cd "$js" && in_netns node wrenn-vitest-collect.mjs wrenn-vitest-collect.config.mts "$RESULTS/js.collected.json")
  "$PY" "$WORK/helpers/runner.py" js-plan "$EXCLUSIONS" "$RESULTS/js.collected.json" "$RESULTS/js.plan.json"
  local files drop
  files="$("$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["run_files"]))' "$RESULTS/js.plan.json")"
  drop="$("$PY" -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["drop"]))' "$RESULTS/js.plan.json")"
  # Running: only the index of the package is importable (`../src`, `../src/index.js`), plus
  # `../src/errors` and `../src/sandbox/filesystem`, whose used names the index re-exports.
  cat >"$js/wrenn-vitest.config.mts" <<EOF
import { defineConfig } from 'vitest/config'
export default defineConfig({
  resolve: {
    alias: [
      { find: /^(\.\.\/)+src(\/index(\.js)?)?$/, replacement: 'e2b' },
      { find: /^(\.\.\/)+src\/errors(\.js)?$/, replacement: 'e2b' },
      { find: /^(\.\.\/)+src\/sandbox\/filesystem$/, replacement: 'e2b' },
    ],
  },
  test: {
    include: $files,
    environment: 'node',
    globals: false,
    isolate: true,
    // Serial (2 cores); per-test timeout as for pytest (TCG guests), explicit ones stay.
    fileParallelism: false,
    maxWorkers: 1,
    testTimeout: ${TEST_TIMEOUT}_000,
    hookTimeout: ${TEST_TIMEOUT}_000,
    setupFiles: ['./wrenn-vitest-setup.ts'],
    reporters: ['default', 'json', 'junit'],
    outputFile: { json: '$RESULTS/js.vitest.json', junit: '$RESULTS/js.xml' },
  },
})
EOF
  log "js: vitest ($("$PY" -c 'import json,sys; print(len(json.loads(sys.argv[1])))' "$files") files)"
  (cd "$js" && in_netns env WRENN_UPSTREAM_DROP="$drop" node_modules/.bin/vitest run --config wrenn-vitest.config.mts) || true
}

declare -A DURATION
for s in "${SUITES[@]}"; do
  start=$SECONDS
  case "$s" in
    python-sync) run_python python-sync tests/sync ;;
    python-async) run_python python-async tests/async ;;
    js) run_js ;;
  esac
  DURATION[$s]=$((SECONDS - start))
  kill -0 "$WRENN_PID" 2>/dev/null || die "wrenn up died during $s; see $RESULTS/wrenn-up.log"
done

{
  echo "upstream: e2b-dev/E2B $UPSTREAM_COMMIT; SDKs: python e2b==$E2B_PY, js e2b@$E2B_JS"
  echo
} >>"$RESULTS/summary.txt"
for s in "${SUITES[@]}"; do
  "$PY" "$WORK/helpers/runner.py" summary "$s" "$RESULTS" "$WORK/packages/js-sdk" >/dev/null
  echo "$s took ${DURATION[$s]} s" >>"$RESULTS/summary.txt"
  echo >>"$RESULTS/summary.txt"
done
cat "$RESULTS/summary.txt"
