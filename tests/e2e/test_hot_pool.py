"""The hot pool through the official Python SDK: `wrenn up` with its default hot pool (two
sandboxes of `base`, restored and warmed up ahead of time) serves creates from it. The
sandbox lives in a hot sandbox's directory, answers at once, has the create's env vars, its
own RNG output, and nothing of the warm-up is left in it. (The rest of the
suite runs with `--hot-pool 0`, see conftest; the no-trace comparison with a cold restore is
in crates/wrenn-agent/tests/vm_hotpool.rs.)"""

import time

import pytest
from e2b import Sandbox

from test_faults import sandbox_dirs

RNG = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'"


def hot_ready(wrenn, since: int) -> int:
    """Hot sandboxes that finished their warm-up since log offset `since` (the agent logs each)."""
    with open(wrenn.log, "rb") as f:
        f.seek(since)
        return f.read().decode(errors="replace").count("hot sandbox ready")


@pytest.mark.restarts_wrenn
@pytest.mark.one_database
def test_creates_take_warmed_up_sandboxes_from_the_hot_pool(wrenn):
    if wrenn.external:
        pytest.skip("WRENN_E2E_URL: the suite does not own the wrenn up process")
    # wrenn up's own default from here on (the later restart tests run with it too).
    wrenn.extra_args = []
    since = wrenn.log.stat().st_size
    wrenn.restart()
    deadline = time.monotonic() + 180
    while hot_ready(wrenn, since) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert hot_ready(wrenn, since) == 2, f"the hot pool did not fill: {sandbox_dirs(wrenn)}"

    boxes = [Sandbox.create(envs={"FROM": f"create-{i}"}, metadata={"suite": "hot"}) for i in range(2)]
    try:
        dirs = sandbox_dirs(wrenn)
        for i, sbx in enumerate(boxes):
            home = [name for name, owner in dirs.items() if owner == sbx.sandbox_id]
            assert home and home[0].startswith("hot-"), f"{sbx.sandbox_id} restored cold: {home}"
            assert sbx.commands.run("echo $FROM").stdout.strip() == f"create-{i}"
            assert sbx.commands.run("test -e /tmp/.wrenn-warm-up || echo clean").stdout.strip() == "clean"
            sbx.files.write("/home/user/f.txt", "mine")
            assert sbx.files.read("/home/user/f.txt") == "mine"
        draws = {sbx.commands.run(RNG).stdout.strip() for sbx in boxes}
        assert len(draws) == 2, "pool siblings share RNG output"
    finally:
        for sbx in boxes:
            try:
                sbx.kill()
            except Exception:
                pass
        wrenn.extra_args = ["--hot-pool", "0"]
