"""`wrenn sandbox ...` against the real `wrenn up`: create, list, exec (stdout, exit code,
stdin, user), pause, resume with the file intact, info, kill; a template built from a Dockerfile,
paused filesystem-only and resumed by a cold boot with its start command running again."""

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


def template_cli(*args: str, cwd=ROOT, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(wrenn_binary()), "template", *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=os.environ.copy(),
        cwd=cwd,
    )
    if check:
        assert proc.returncode == 0, f"wrenn template {args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_cli_builds_a_template_from_a_dockerfile(wrenn, tmp_path):
    tag = secrets.token_hex(4)
    name = f"cli-df-{tag}"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text(f"cli {tag}\n")
    (tmp_path / "Dockerfile").write_text(
        "ARG GREETING=hello\n"
        "FROM base\n"
        "ENV APP_DIR=/srv/site\n"
        "COPY --chown=user site $APP_DIR\n"
        "RUN echo \"$GREETING from $(id -un)\" > $APP_DIR/who.txt \\\n"
        "    && chown user $APP_DIR/who.txt\n"
        "WORKDIR /srv/site\n"
        "EXPOSE 8080\n"
        'CMD ["python3", "-m", "http.server", "8080"]\n'
    )
    built = template_cli(
        "build", "-f", str(tmp_path / "Dockerfile"), "--name", name,
        "--build-arg", "GREETING=hi", "--ready-cmd", "curl -sf localhost:8080/index.html",
        str(tmp_path),
    )
    assert built.stdout.strip() == name, built
    log = built.stderr
    assert "warning: line 8: EXPOSE is ignored" in log, log
    assert "[4/7] COPY site /srv/site" in log and "start command: python3 -m http.server 8080" in log, log
    listed = json.loads(template_cli("list", "--json").stdout)
    assert any(name in t["names"] and t["buildStatus"] == "ready" for t in listed), listed
    assert name in template_cli("list").stdout

    sid = cli("create", "--template", name).stdout.strip()
    try:
        out = cli("exec", sid, "--", "cat who.txt index.html; stat -c %U index.html; echo $APP_DIR").stdout
        assert out == f"hi from root\ncli {tag}\nuser\n/srv/site\n", out
        served = cli("exec", sid, "--", "curl -s localhost:8080/who.txt").stdout
        assert served == "hi from root\n", served
        # Paused keeping only the disk: the resume boots it, and the start command runs again.
        assert "filesystem only" in cli("pause", sid, "--filesystem").stdout
        cli("resume", sid)
        again = cli(
            "exec", sid, "--",
            "for i in $(seq 100); do curl -sf localhost:8080/who.txt && break; sleep 0.2; done",
        ).stdout
        assert again == "hi from root\n", again
    finally:
        cli("kill", sid, check=False)

    # A failing step: its output and exit code, a failing exit, and no new version.
    (tmp_path / "Dockerfile.bad").write_text("FROM base\nRUN echo cli-broken; exit 4\n")
    bad = template_cli("build", "-f", str(tmp_path / "Dockerfile.bad"), "--name", f"{name}-bad", str(tmp_path), check=False)
    assert bad.returncode == 1, bad
    assert "cli-broken" in bad.stderr and "exit code 4" in bad.stderr, bad.stderr
    # Input the subset does not take is refused before anything is sent.
    (tmp_path / "Dockerfile.multi").write_text("FROM base\nFROM base\n")
    multi = template_cli("build", "-f", str(tmp_path / "Dockerfile.multi"), "--name", f"{name}-m", str(tmp_path), check=False)
    assert multi.returncode == 1 and "line 2" in multi.stderr, multi.stderr

    assert "deleted" in template_cli("delete", name).stdout
    assert not any(name in t["names"] for t in json.loads(template_cli("list", "--json").stdout))
