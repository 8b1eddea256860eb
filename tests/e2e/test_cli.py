"""`wrenn sandbox ...` against the real `wrenn up`: create, list, exec (stdout, exit code,
stdin, user), pause, resume with the file intact, info, kill."""

import json
import os
import secrets
import subprocess

from conftest import ROOT, wrenn_binary


def cli(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(wrenn_binary()), "sandbox", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
        cwd=ROOT,
    )
    if check:
        assert proc.returncode == 0, f"wrenn sandbox {args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_cli_lifecycle(wrenn):
    tag = secrets.token_hex(4)
    sid = cli("create", "--metadata", f"cli={tag}", "--env", "GREETING=hello").stdout.strip()
    assert sid and " " not in sid, sid
    try:
        listed = json.loads(cli("list", "--metadata", f"cli={tag}", "--json").stdout)
        assert [s["sandboxID"] for s in listed] == [sid], listed
        assert listed[0]["state"] == "running"

        out = cli("exec", sid, "--", 'echo "$GREETING $(id -un) $PWD"').stdout
        assert out == "hello user /home/user\n", out
        assert cli("exec", sid, "--user", "root", "--", "id -un").stdout == "root\n"
        failed = cli("exec", sid, "--", "echo oops >&2; exit 7", check=False)
        assert failed.returncode == 7 and failed.stderr.strip().endswith("oops"), failed
        piped = cli("exec", sid, "--", "tr a-z A-Z > /tmp/cli.txt; cat /tmp/cli.txt", stdin="kept\n")
        assert piped.stdout == "KEPT\n"

        assert sid in cli("pause", sid).stdout
        paused = json.loads(cli("list", "--metadata", f"cli={tag}", "--state", "paused", "--json").stdout)
        assert [s["sandboxID"] for s in paused] == [sid]
        cli("resume", sid)
        assert cli("exec", sid, "--", "cat /tmp/cli.txt").stdout == "KEPT\n"
        info = cli("info", sid).stdout
        assert "running" in info and "base" in info, info
    finally:
        cli("kill", sid, check=False)
    gone = cli("info", sid, check=False)
    assert gone.returncode != 0 and "not found" in gone.stderr, gone
