"""The official code-interpreter SDK (`e2b_code_interpreter` 2.x, unmodified) against `wrenn up`:
`Sandbox.create()` with no template asks for `code-interpreter-v1`, which `wrenn up` builds at
start (the server already running in its snapshot); cells go through the edge proxy to port
49999 in the guest.

One sandbox for the file (module fixture), killed at the end; the contexts test makes its own.
"""

import base64
import time

import pytest
from e2b_code_interpreter import Sandbox

TIMEOUT = 600
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sbx(wrenn):
    started = time.monotonic()
    s = Sandbox.create(timeout=TIMEOUT)
    print(f"Sandbox.create() took {time.monotonic() - started:.2f} s")
    try:
        yield s
    finally:
        s.kill()


def test_default_template_is_the_code_interpreter(sbx):
    info = sbx.get_info()
    assert info.template_id == "code-interpreter-v1"
    started = time.monotonic()
    ex = sbx.run_code("1+1")
    print(f"first run_code took {time.monotonic() - started:.2f} s")
    assert ex.error is None, ex.error
    assert ex.text == "2"


def test_state_is_kept_between_runs(sbx):
    assert sbx.run_code("x = 3").error is None
    ex = sbx.run_code("x * 2")
    assert ex.error is None, ex.error
    assert ex.text == "6"


def test_stdout_and_the_sandbox_user(sbx):
    ex = sbx.run_code("import os, getpass\nprint(getpass.getuser(), os.getcwd())")
    assert ex.error is None, ex.error
    assert ex.logs.stdout == ["user /home/user\n"]


def test_matplotlib_figure_is_a_png(sbx):
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.show()\n"
    )
    ex = sbx.run_code(code, timeout=300, request_timeout=300)
    assert ex.error is None, ex.error
    pngs = [r.png for r in ex.results if r.png]
    assert len(pngs) == 1, ex.results
    assert base64.b64decode(pngs[0]).startswith(PNG_MAGIC)


def test_pandas_and_numpy_are_installed(sbx):
    ex = sbx.run_code(
        "import numpy as np, pandas as pd\n"
        "int(pd.DataFrame({'a': np.arange(4)})['a'].sum())",
        timeout=300,
        request_timeout=300,
    )
    assert ex.error is None, ex.error
    assert ex.text == "6"


def test_an_exception_is_an_error(sbx):
    ex = sbx.run_code("1/0")
    assert ex.error is not None
    assert ex.error.name == "ZeroDivisionError"
    assert "division by zero" in ex.error.value
    assert ex.results == []


def test_contexts_are_isolated(sbx):
    a = sbx.create_code_context()
    b = sbx.create_code_context()
    assert a.id != b.id
    assert sbx.run_code("y = 'a'", context=a).error is None
    assert sbx.run_code("y = 'b'", context=b).error is None
    # E2B's server strips one pair of quotes from a string's text/plain.
    assert sbx.run_code("y", context=a).text == "a"
    assert sbx.run_code("y", context=b).text == "b"
    # The default context never saw either.
    ex = sbx.run_code("y")
    assert ex.error is not None and ex.error.name == "NameError"
    ids = {c.id for c in sbx.list_code_contexts()}
    assert {a.id, b.id} <= ids
    sbx.remove_code_context(a)
    sbx.remove_code_context(b)


def test_create_envs_reach_the_snapshotted_context(wrenn):
    # The default context's Python was started when the template was built; the sandbox's own
    # env vars (given at create) still reach it, and a cell's envs apply to that cell.
    s = Sandbox.create(envs={"WRENN_E2E_CI": "from-create"}, timeout=TIMEOUT)
    try:
        assert s.run_code("import os; os.environ.get('WRENN_E2E_CI')").text == "from-create"
        ex = s.run_code("os.environ.get('CELL')", envs={"CELL": "from-cell"})
        assert ex.text == "from-cell"
    finally:
        s.kill()
