"""The Python worker behind one wrenn-interpreter context.

The server starts `python3 -u -c <bootstrap>`; the bootstrap reads this source as the first
line of stdin (a JSON string) and runs it. The server writes nothing else until this worker
says `ready`, so the bootstrap's buffered read cannot swallow a command.

From then on:
- the original stdin carries commands, one JSON object a line (`{"code": ..., "env_vars": ...,
  "env": ...}`);
- the original stdout carries events, one JSON object a line: `ready`, then per cell
  `number_of_executions`, `stdout`, `stderr`, `result`, `error` in order, and `done`;
- the original stderr is this worker's own diagnostics, which the server logs.

User code sees none of them: fd 0 becomes /dev/null, fds 1 and 2 become pipes whose output
(subprocesses, C extensions) is streamed as the cell's stdout and stderr, as ipykernel does,
and `sys.stdout`/`sys.stderr` write into the same streams.

A cell runs as IPython would run it: the value of a trailing expression is the main result
(formatted with the object's `_repr_*_` methods), `display()` sends more, open pyplot figures
are sent as PNG after the cell, top-level `await` works, and a cell that is not Python may
use `!cmd`, `%pip`, `%cd` and `%matplotlib` lines.

Only the standard library is imported up front (and nothing that seeds state a memory
snapshot would then share between sandboxes, like `random`); matplotlib, pandas and
e2b_charts are used when user code has imported them.
"""

import ast
import base64
import builtins
import codecs
import datetime
import io
import json
import linecache
import math
import os
import select
import signal
import sys
import threading
import time
import traceback
import types

# ipykernel's flush interval: output written within it goes out as one chunk, so logs split
# into chunks about the way they do on E2B.
FLUSH_INTERVAL = 0.2
# Stream text per event, so one huge print cannot make one huge line.
MAX_CHUNK = 1 << 20
# inspect.CO_COROUTINE, without importing inspect (slow to import).
CO_COROUTINE = 0x80
COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
DRIVER_FILE = "<wrenn-driver>"
MAIN_PID = os.getpid()
MAIN_THREAD = threading.get_ident()

# IPython's display formatters, in its order: (MIME type, method).
REPR_METHODS = [
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("application/pdf", "_repr_pdf_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
]
BINARY_TYPES = ("image/png", "image/jpeg", "application/pdf")
# MIME type -> field of E2B's result, as its server maps them; what is left goes to `extra`.
RESULT_FIELDS = [
    ("text/plain", "text"),
    ("text/html", "html"),
    ("text/markdown", "markdown"),
    ("image/svg+xml", "svg"),
    ("image/png", "png"),
    ("image/jpeg", "jpeg"),
    ("application/pdf", "pdf"),
    ("text/latex", "latex"),
    ("application/json", "json"),
    ("application/javascript", "javascript"),
    ("e2b/data", "data"),
    ("e2b/chart", "chart"),
]
OBJECT_FIELDS = ("json", "data", "chart")


def diag(message):
    """A line for the server's log, never for the user."""
    try:
        os.write(DIAG_FD, ("wrenn-driver: " + message + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


def block_sigint():
    """Keeps SIGINT to the main thread, where the interrupt handler decides about it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class Interrupts:
    """SIGINT from the server interrupts a running cell and nothing else.

    Idle, the signal is ignored (it raced with the end of a cell). While the main thread
    writes an event, it is deferred until the line is whole, so the server never reads half
    a line.
    """

    def __init__(self):
        self.armed = False
        self.holding = 0
        self.deferred = False

    def handler(self, signum, frame):
        if not self.armed:
            return
        if self.holding:
            self.deferred = True
            return
        raise KeyboardInterrupt

    def hold(self):
        self.holding += 1

    def release(self):
        self.holding -= 1
        if self.holding == 0 and self.deferred:
            self.deferred = False
            if self.armed:
                raise KeyboardInterrupt


class Channel:
    """Events to the server, one JSON line each, written whole. Only the hub calls it, under
    its lock, so lines from different threads never interleave."""

    def __init__(self, fd):
        self.fd = fd

    def send(self, *events):
        if not events:
            return
        text = "".join(json.dumps(e, ensure_ascii=False, allow_nan=False) + "\n" for e in events)
        # A lone surrogate (from surrogateescape'd bytes) becomes '?', not invalid JSON.
        data = memoryview(text.encode("utf-8", "replace"))
        main = threading.get_ident() == MAIN_THREAD
        if main:
            INTERRUPTS.hold()
        try:
            while data:
                data = data[os.write(self.fd, data):]
        finally:
            if main:
                INTERRUPTS.release()


class Hub:
    """The cell's stdout and stderr, from sys.stdout/sys.stderr and from fds 1 and 2.

    Text is buffered in arrival order and sent after FLUSH_INTERVAL, on flush(), and before
    any other event, so output and results keep their order. Reading the fd pipes before
    each write keeps a subprocess's output ahead of a print that came after it.
    """

    def __init__(self, channel, pipes):
        self.channel = channel
        self.pipes = pipes  # read end -> "stdout" / "stderr"
        self.decoders = {
            fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in pipes
        }
        for fd in pipes:
            os.set_blocking(fd, False)
        self.lock = threading.RLock()
        self.wake = threading.Condition(self.lock)
        self.pending = []  # [name, [text, ...]] runs in arrival order
        self.size = 0

    def start(self):
        for target in (self._flusher, self._reader):
            threading.Thread(target=target, daemon=True, name="wrenn-" + target.__name__).start()

    def write(self, name, text):
        with self.lock:
            self._drain()
            self._append(name, text)

    def flush(self):
        with self.lock:
            self._drain()
            self.channel.send(*self._take())

    def send(self, event):
        """Sends an event after all output written before it, in one write."""
        with self.lock:
            self._drain()
            self.channel.send(*self._take(), event)

    def _append(self, name, text):
        if not text:
            return
        if self.size == 0:
            self.wake.notify()
        if self.pending and self.pending[-1][0] == name:
            self.pending[-1][1].append(text)
        else:
            self.pending.append([name, [text]])
        self.size += len(text)
        if self.size >= MAX_CHUNK:
            self.channel.send(*self._take())

    def _drain(self):
        for fd, name in self.pipes.items():
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._append(name, self.decoders[fd].decode(data))

    def _take(self):
        """The buffered text as stream events, at most MAX_CHUNK characters each."""
        pending, self.pending, self.size = self.pending, [], 0
        events = []
        if not pending:
            return events
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat()
        for name, parts in pending:
            text = "".join(parts)
            for start in range(0, len(text), MAX_CHUNK):
                chunk = text[start:start + MAX_CHUNK]
                events.append({"type": name, "text": chunk, "timestamp": stamp})
        return events

    def _flusher(self):
        block_sigint()
        with self.lock:
            while True:
                while not self.size:
                    self.wake.wait()
                deadline = time.monotonic() + FLUSH_INTERVAL
                while self.size and (left := deadline - time.monotonic()) > 0:
                    self.wake.wait(left)
                self._drain()
                self.channel.send(*self._take())

    def _reader(self):
        block_sigint()
        fds = list(self.pipes)
        while True:
            select.select(fds, [], [])
            with self.lock:
                self._drain()


class Stream(io.TextIOBase):
    """sys.stdout / sys.stderr: text into the hub, fileno() the captured fd."""

    def __init__(self, name, fd):
        super().__init__()
        self._name = name
        self._fd = fd
        self.buffer = _ByteStream(self)

    @property
    def name(self):
        return "<" + self._name + ">"

    @property
    def encoding(self):
        return "utf-8"

    @property
    def errors(self):
        return "replace"

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not " + type(text).__name__)
        if os.getpid() != MAIN_PID:
            # A forked child (multiprocessing) has no flusher thread: its fd is captured.
            os.write(self._fd, text.encode("utf-8", "replace"))
        else:
            HUB.write(self._name, text)
        return len(text)

    def flush(self):
        if os.getpid() == MAIN_PID:
            HUB.flush()


class _ByteStream(io.RawIOBase):
    """sys.stdout.buffer, for code that writes bytes."""

    def __init__(self, stream):
        super().__init__()
        self._stream = stream

    def writable(self):
        return True

    def write(self, data):
        self._stream.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self):
        self._stream.flush()


# ---------------------------------------------------------------------------------------
# Display: what IPython's display formatter would make of an object, in E2B's result shape.


def real_method(obj, name):
    """The object's display method, as IPython finds it (never a class's, never a mock's)."""
    if isinstance(obj, type):
        return None
    try:
        if hasattr(obj, "_ipython_canary_method_should_not_exist_"):
            return None
        method = getattr(obj, name, None)
    except Exception:
        return None
    return method if callable(method) else None


def format_warning(what, obj):
    """IPython reports a failing formatter on stderr and shows the other formats."""
    text = traceback.format_exc()
    sys.stderr.write(f"{what} of {type(obj).__name__} failed:\n{text}")


def format_bundle(obj):
    """MIME type -> data for obj: its _repr_*_ methods, E2B's extras, and text/plain."""
    data = {}
    bundle = real_method(obj, "_repr_mimebundle_")
    if bundle is not None:
        try:
            found = bundle(include=None, exclude=None)
            if isinstance(found, tuple):
                found = found[0]
            if isinstance(found, dict):
                data.update(found)
        except Exception:
            format_warning("_repr_mimebundle_", obj)
    for mime, name in REPR_METHODS:
        method = real_method(obj, name) if mime not in data else None
        if method is None:
            continue
        try:
            value = method()
        except Exception:
            format_warning(name, obj)
            continue
        if isinstance(value, tuple):
            value = value[0]
        if value is not None:
            data[mime] = value
    add_library_formats(obj, data)
    if "text/plain" not in data:
        try:
            data["text/plain"] = plain_text(obj)
        except Exception:
            format_warning("repr", obj)
    return data


def plain_text(obj):
    text = repr(obj)
    # IPython's pretty printer breaks long containers over lines; pprint does the same
    # (imported only when needed).
    if len(text) > 79 and type(obj) in (list, tuple, dict, set, frozenset):
        import pprint

        text = pprint.pformat(obj, width=79, sort_dicts=False)
    return text


def add_library_formats(obj, data):
    """What E2B's kernel adds: JSON of lists and dicts, DataFrame data, figure PNG/chart."""
    if "application/json" not in data and isinstance(obj, (list, dict)):
        try:
            data["application/json"] = jsonable(obj, strict=True)
        except (TypeError, ValueError, RecursionError):
            pass
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(obj, pandas.DataFrame):
        try:
            data["e2b/data"] = jsonable(obj.to_dict(orient="list"), strict=False)
        except Exception:
            format_warning("DataFrame data", obj)
    figure = sys.modules.get("matplotlib.figure")
    if figure is not None and isinstance(obj, figure.Figure):
        add_figure_formats(obj, data)


def add_figure_formats(fig, data):
    # An empty figure has no image, as with IPython's print_figure.
    if not fig.axes and not fig.lines:
        return
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        data["image/png"] = buf.getvalue()
    except Exception:
        format_warning("PNG", fig)
    chart = charts()
    if chart is not None:
        try:
            data["e2b/chart"] = jsonable(chart(fig), strict=False)
        except Exception:
            pass


_CHARTS = []


def charts():
    """e2b_charts.chart_figure_to_dict when installed (looked up once)."""
    if not _CHARTS:
        try:
            from e2b_charts import chart_figure_to_dict
        except Exception:
            chart_figure_to_dict = None
        _CHARTS.append(chart_figure_to_dict)
    return _CHARTS[0]


def jsonable(obj, strict, depth=0):
    """obj as JSON data: numpy values as Python ones, NaN and infinities as null, dates as
    ISO text. Anything else is TypeError when strict, its str() when not."""
    if depth > 100:
        raise RecursionError("too deep")
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {json_key(k): jsonable(v, strict, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, strict, depth + 1) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):
        return jsonable(obj.tolist(), strict, depth + 1)
    if isinstance(obj, (datetime.date, datetime.time)):
        return obj.isoformat()
    if strict:
        raise TypeError(type(obj).__name__)
    return str(obj)


def json_key(key):
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key)
    raise TypeError(type(key).__name__)


def result_event(data, is_main):
    """E2B's result: its fields from the MIME types, the rest in `extra`."""
    data = dict(data)
    event = {"type": "result"}
    for mime, field in RESULT_FIELDS:
        value = data.pop(mime, None)
        if mime in BINARY_TYPES and isinstance(value, (bytes, bytearray)):
            value = base64.b64encode(value).decode("ascii")
        if value is None:
            continue
        if field in OBJECT_FIELDS:
            try:
                value = jsonable(value, strict=False)
            except RecursionError:
                continue
        elif not isinstance(value, str):
            diag(f"dropped {mime} of type {type(value).__name__}")
            continue
        event[field] = value
    text = event.get("text")
    # E2B's server strips one pair of quotes from text/plain, so `'abc'` reads abc.
    if text and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        event["text"] = text[1:-1]
    extra = {}
    for key, value in data.items():
        try:
            extra[str(key)] = jsonable(value, strict=False)
        except RecursionError:
            pass
    event["extra"] = extra
    event["is_main_result"] = is_main
    return event


def show(obj, is_main):
    """Sends obj as a result; a shown pyplot figure is closed so it is not shown again."""
    HUB.send(result_event(format_bundle(obj), is_main))
    figure = sys.modules.get("matplotlib.figure")
    pyplot = sys.modules.get("matplotlib.pyplot")
    if figure is not None and pyplot is not None and isinstance(obj, figure.Figure):
        pyplot.close(obj)


def display(*objs, raw=False, **kwargs):
    """IPython's display(): each object as a result that is not the cell's value (with
    raw=True, each a MIME bundle already)."""
    for obj in objs:
        if raw and isinstance(obj, dict):
            HUB.send(result_event(obj, False))
        else:
            show(obj, is_main=False)


def show_figures():
    """Every open pyplot figure as a result, then closed (matplotlib-inline's flush)."""
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    pyplot = sys.modules.get("matplotlib.pyplot")
    if helpers is None or pyplot is None:
        return
    for manager in helpers.Gcf.get_all_fig_managers():
        try:
            show(manager.canvas.figure, is_main=False)
        except Exception:
            format_warning("showing", manager.canvas.figure)
    pyplot.close("all")


# Module -> what to change in it when user code first imports it.
PATCHES = {
    # show() sends the figures (as matplotlib-inline's show does).
    "matplotlib.pyplot": lambda m: setattr(m, "show", lambda *a, **k: show_figures()),
    # IPython's display() (IPython.display re-exports it) sends results, when installed.
    "IPython.core.display_functions": lambda m: setattr(m, "display", display),
}


class ImportHook:
    """Applies PATCHES once the module's own code has run, before the import returns."""

    def find_spec(self, name, path=None, target=None):
        patch = PATCHES.pop(name, None)
        if patch is None:
            return None
        import importlib.util

        # Found by the other finders (this one no longer knows the name).
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


# ---------------------------------------------------------------------------------------
# Cells.


class Worker:
    def __init__(self):
        self.count = 0
        self.namespace = None
        self.loop = None

    def setup_namespace(self):
        # User code runs in a fresh __main__ (pickle finds its classes there), not in ours.
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main
        self.namespace = main.__dict__

    def execute(self, request):
        self.count += 1
        filename = f"<cell {self.count}>"
        code = request.get("code") or ""
        saved = {}
        try:
            self.apply_env(request.get("env"))
            # Armed before the count goes out: the server interrupts only once it has read
            # the count, and that interrupt must not be lost.
            INTERRUPTS.armed = True
            try:
                HUB.send({"type": "number_of_executions", "execution_count": self.count})
                self.override_env(request.get("env_vars"), saved)
                self.run_cell(code, filename)
            except BaseException as exc:
                INTERRUPTS.armed = False
                HUB.send(error_event(exc, filename))
        except BaseException as exc:
            diag(f"cell {self.count}: {type(exc).__name__}: {exc}")
        finally:
            INTERRUPTS.armed = False
        if os.getpid() != MAIN_PID:
            # A child forked by the cell returned here: it must not take our commands.
            os._exit(0)
        self.finish(saved)

    def finish(self, saved):
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            show_figures()
        except Exception as exc:
            diag(f"figures: {exc}")
        HUB.send({"type": "done"})

    def apply_env(self, env):
        """The sandbox's environment (envd's /envs), for good."""
        for key, value in (env or {}).items():
            try:
                os.environ[key] = value
            except (ValueError, TypeError) as exc:
                diag(f"env {key!r}: {exc}")

    def override_env(self, env_vars, saved):
        """This execution's env_vars; `saved` gets the values to put back afterwards (also
        when a bad name stops this halfway)."""
        for key, value in (env_vars or {}).items():
            if key not in saved:
                saved[key] = os.environ.get(key)
            os.environ[key] = value

    def run_cell(self, code, filename):
        # Registered so tracebacks show the cell's lines (mtime None: never invalidated).
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        source = code
        try:
            tree = ast.parse(source, filename=filename)
        except SyntaxError as first:
            source = rewrite_magics(code)
            if source is None:
                raise
            try:
                tree = ast.parse(source, filename=filename)
            except SyntaxError:
                raise first from None
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr) and not quiet(source, tree.body[-1]):
            last = ast.Expression(tree.body.pop().value)
        if tree.body:
            self.run(compile(tree, filename, "exec", flags=COMPILE_FLAGS, dont_inherit=True))
        if last is not None:
            code_obj = compile(last, filename, "eval", flags=COMPILE_FLAGS, dont_inherit=True)
            value = self.run(code_obj)
            if value is not None:
                self.namespace["_"] = value
                show(value, is_main=True)

    def run(self, code_obj):
        result = eval(code_obj, self.namespace)
        if code_obj.co_flags & CO_COROUTINE:
            # Top-level await, as IPython's autoawait: on one loop kept for the context.
            if self.loop is None:
                import asyncio

                self.loop = asyncio.new_event_loop()
                asyncio.set_event_loop(self.loop)
            result = self.loop.run_until_complete(result)
        return result


# The IPython line magics known here (run_magic runs them).
MAGICS = ("pip", "cd", "matplotlib")


def rewrite_magics(code):
    """For a cell that is not Python: its `!cmd` lines (shell) and `%pip`, `%cd`,
    `%matplotlib` lines as calls, line for line; None when there are none. Valid Python
    is never rewritten. No `{var}` expansion, no `x = !cmd`, no cell magics."""
    lines = code.split("\n")
    changed = False
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("!"):
            lines[i] = f"{indent}_wrenn_magic_('!', {stripped[1:].strip()!r})"
            changed = True
        elif stripped.startswith("%") and not stripped.startswith("%%"):
            name, _, arg = stripped[1:].partition(" ")
            if name in MAGICS:
                lines[i] = f"{indent}_wrenn_magic_({name!r}, {arg.strip()!r})"
                changed = True
    return "\n".join(lines) if changed else None


def run_magic(name, arg):
    """What IPython does for the magic (see rewrite_magics)."""
    if name == "!":
        os.system(arg)
    elif name == "pip":
        import shlex

        os.system(f"{shlex.quote(sys.executable)} -m pip {arg}")
    elif name == "cd":
        os.chdir(os.path.expanduser(arg or "~"))
        print(os.getcwd())
    # %matplotlib: figures are always shown inline here.


def quiet(code, node):
    """A trailing `;` hides the cell's value, as in IPython."""
    lines = code.splitlines()
    line = lines[node.end_lineno - 1].encode("utf-8")
    rest = line[node.end_col_offset:].decode("utf-8", "replace")
    rest += "\n".join(lines[node.end_lineno:])
    return rest.lstrip().startswith(";")


def error_event(exc, filename):
    """name, value and traceback of exc, the traceback from the cell's frame on."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    try:
        te = traceback.TracebackException(type(exc), exc, tb)
        te.stack = traceback.StackSummary.from_list(
            [frame for frame in te.stack if frame.filename != DRIVER_FILE]
        )
        text = "".join(te.format())
    except Exception:
        text = "".join(traceback.format_exception_only(type(exc), exc))
    try:
        value = str(exc)
    except Exception:
        value = f"<unprintable {type(exc).__name__}>"
    return {"type": "error", "name": type(exc).__name__, "value": value, "traceback": text}


# ---------------------------------------------------------------------------------------
# Start.


def redirect():
    """Takes the server's pipes for ourselves and gives user code its own fds 0, 1, 2."""
    global DIAG_FD
    commands = os.dup(0)
    events = os.dup(1)
    DIAG_FD = os.dup(2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    pipes = {}
    for fd, name in ((1, "stdout"), (2, "stderr")):
        read, write = os.pipe()
        os.dup2(write, fd)
        os.close(write)
        pipes[read] = name
    return commands, events, pipes


DIAG_FD = 2
commands_fd, events_fd, capture_pipes = redirect()
INTERRUPTS = Interrupts()
CHANNEL = Channel(events_fd)
HUB = Hub(CHANNEL, capture_pipes)


def main():
    signal.signal(signal.SIGINT, INTERRUPTS.handler)
    sys.stdin = open(os.devnull)
    sys.stdout = Stream("stdout", 1)
    sys.stderr = Stream("stderr", 2)
    # Plots render off-screen; subprocesses inherit it too (a module:// backend would not
    # import there).
    os.environ.setdefault("MPLBACKEND", "Agg")
    builtins.display = display
    builtins._wrenn_magic_ = run_magic
    sys.meta_path.insert(0, ImportHook())
    worker = Worker()
    worker.setup_namespace()
    HUB.start()
    HUB.send({"type": "ready", "pid": os.getpid()})
    with open(commands_fd, "rb") as commands:
        for line in commands:
            try:
                request = json.loads(line)
            except ValueError as exc:
                diag(f"bad command: {exc}")
                continue
            worker.execute(request)
    # The server closed our stdin: it is gone, and so are we.


main()
