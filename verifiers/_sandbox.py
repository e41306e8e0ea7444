"""Run math-verify (SymPy) in a separate process that can be killed: the hard bound behind
:func:`verifiers.math.judge`.

Why a process: SymPy can spin for hours or allocate gigabytes on a ten-character input
(``9^9^9^9``), and math-verify's own timeout uses ``SIGALRM``, which works only in the main
thread and reports a timeout as "not equal". Killing a process is the only bound that holds.

Three processes, one pipe between each pair::

    caller (Sandbox) ──JSON lines──► server ──JSON lines──► worker (forked from the server)

- The **server** (``python -I _sandbox.py``) imports math-verify once, warms it up and forks
  workers. It never runs SymPy itself, so it always answers, and it enforces each request's
  budget: a worker that overruns is killed and the next request gets a fresh fork (about 3 ms,
  already warm), not a fresh interpreter (about 1 s).
- A **worker** answers requests one at a time under an address-space cap, so a huge power
  ends in ``MemoryError`` instead of swapping the machine. It is replaced after any "cannot
  judge" and after ``recycle_after`` requests, which bounds what its caches can grow to.
  Known limit: math-verify catches exceptions inside its comparison strategies, MemoryError
  included, and moves on, so a comparison that runs out of memory there can end "not equal"
  rather than "cannot judge". In practice that needs a gold answer too large to compute.
- The **caller** waits ``budget + slack`` for each reply; if the server itself is silent, the
  caller kills the server's process group (server and worker) and starts a new one next time.

Request ``{"pred", "gold", "budget_s"}``; reply ``{"verdict", "reason"}`` with verdict one of
``EQUIVALENT``, ``DIFFERENT``, ``CANNOT_JUDGE``. Stdlib only on the caller's side.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

EQUIVALENT, DIFFERENT, CANNOT_JUDGE = "EQUIVALENT", "DIFFERENT", "CANNOT_JUDGE"
_READY = b'{"ready": true}'


# ----------------------------------------------------------------------------- pipes


def _write_line(fd: int, message: dict) -> None:
    # ensure_ascii: NUL bytes, control characters and lone surrogates travel as escapes.
    _write_all(fd, json.dumps(message, ensure_ascii=True).encode() + b"\n")


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _read_line(fd: int, deadline: float | None) -> bytes | None:
    """One line from ``fd``, or None at EOF or when ``deadline`` (monotonic) passes.

    The protocol is strictly request-reply, so nothing follows the newline in one read.
    """
    poller = select.poll()  # poll, not select: select fails on descriptors above 1023
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    while not chunks or not chunks[-1].endswith(b"\n"):
        if deadline is not None:
            left_ms = (deadline - time.monotonic()) * 1000
            if left_ms <= 0 or not poller.poll(left_ms):
                return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        chunks.append(chunk)
    return b"".join(chunks).rstrip(b"\n")


# ----------------------------------------------------------------------------- caller side


class Sandbox:
    """The caller's handle on one server process; thread-safe, started on first use.

    One request runs at a time; a call waiting for the lock spends its own budget doing so.
    Starting the server (once per process, and again only if the server itself died) is not
    charged to the request that triggers it, so a cold start never turns into "cannot judge".
    """

    def __init__(self, memory_mb: int = 1024, recycle_after: int = 2000,
                 start_timeout_s: float = 60.0, slack_s: float = 0.5):
        self._args = [str(memory_mb), str(recycle_after)]
        self._start_timeout_s, self._slack_s = start_timeout_s, slack_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        atexit.register(self.close)
        # A forked child must not share this process's pipes: it starts its own server.
        os.register_at_fork(after_in_child=self._forget)

    @property
    def pid(self) -> int | None:
        """The server's process id, or None when none is running."""
        return None if self._proc is None else self._proc.pid

    def compare(self, pred: str, gold: str, deadline: float) -> tuple[str, str]:
        """``(verdict, reason)`` for one pair; returns by ``deadline`` + slack (+ a cold start)."""
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return CANNOT_JUDGE, "timed out waiting for another thread's check"
        try:
            deadline += self._ensure_server()
            budget = deadline - time.monotonic()
            if budget <= 0:
                return CANNOT_JUDGE, "timed out before SymPy started"
            return self._ask({"pred": pred, "gold": gold, "budget_s": budget}, deadline)
        finally:
            self._lock.release()

    def close(self) -> None:
        """Kill the server and its worker (registered with atexit)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the server leads its own process group
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    def _ask(self, request: dict, deadline: float) -> tuple[str, str]:
        try:
            _write_line(self._proc.stdin.fileno(), request)
            line = _read_line(self._proc.stdout.fileno(), deadline + self._slack_s)
        except OSError:
            line = None
        if line is None:
            self.close()
            return CANNOT_JUDGE, "the math sandbox stopped answering; it will be restarted"
        reply = json.loads(line)
        return reply["verdict"], reply["reason"]

    def _ensure_server(self) -> float:
        """Start the server if needed; returns the seconds spent starting it."""
        if self._proc is not None and self._proc.poll() is None:
            return 0.0
        self.close()
        start = time.monotonic()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), *self._args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True,
        )
        if _read_line(self._proc.stdout.fileno(), start + self._start_timeout_s) != _READY:
            self.close()
            raise RuntimeError("the math sandbox did not start; its error, if any, is on stderr")
        return time.monotonic() - start

    def _forget(self) -> None:
        self._lock, self._proc = threading.Lock(), None


# ----------------------------------------------------------------------------- server side

_SCIENTIFIC = re.compile(r"(?<![\w.\\])([0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE]([+-]?[0-9]+)(?![\w.])")
_PI = re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])")
_UNICODE = str.maketrans({"−": "-", "×": r"\times ", "÷": r"\div ", "·": r"\cdot "})


def to_latex(text: str) -> str:
    r"""Plain-text math to what math-verify's LaTeX reader takes (``2*sqrt(2)`` parses as is).

    Only the LaTeX reader is used: it is an ANTLR grammar, whereas math-verify's plain
    expression reader calls SymPy's ``parse_expr``, which ``eval``s its input.
    """
    text = text.strip().translate(_UNICODE).replace("**", "^")
    text = _PI.sub(r"\\pi", _SCIENTIFIC.sub(r"\1\\times 10^{\2}", text))
    if "\\boxed" in text:
        return text  # math-verify reads the last box itself
    return "$" + text.replace("$", "") + "$"


def compare_with_sympy(pred: str, gold: str) -> tuple[str, str]:
    """Read both (:func:`read_answer`) and compare with math-verify; gold that does not parse
    cannot be judged, and a "not equal" that SymPy did not show is not a verdict
    (:func:`verifiers.plain_syntax.vanishes_everywhere_tried`)."""
    from math_verify import verify

    from verifiers.plain_syntax import vanishes_everywhere_tried

    golds = read_answer(gold)
    if not golds:
        return CANNOT_JUDGE, "the gold answer is not math that math-verify can parse"
    preds = read_answer(pred)
    if not preds:
        return DIFFERENT, "the prediction is not math that math-verify can parse"
    # Timeouts off: they rely on SIGALRM and report a timeout as "not equal"; the server
    # enforces the budget by killing this process instead.
    if verify(golds, preds, timeout_seconds=None, raise_on_error=True):
        return EQUIVALENT, "equal according to math-verify"
    if vanishes_everywhere_tried(preds[0], golds[0]):
        return CANNOT_JUDGE, "SymPy did not show them equal, yet they agree at every test point"
    return DIFFERENT, "not equal according to math-verify"


def read_answer(text: str) -> list:
    """The parsed forms of one answer (SymPy objects first), [] when it does not parse: plain
    SymPy syntax (``sin(x)**2``) by :func:`verifiers.plain_syntax.read_plain`, everything else
    by math-verify's LaTeX reader."""
    from math_verify import LatexExtractionConfig, parse

    from verifiers.plain_syntax import is_plain_call, read_plain

    if is_plain_call(text) and (expr := read_plain(text)) is not None:
        return [expr, text]
    return [p for p in parse(to_latex(text), [LatexExtractionConfig()], parsing_timeout=None)
            if not isinstance(p, str)]


def _compare_safely(pred: str, gold: str) -> tuple[str, str]:
    try:
        return compare_with_sympy(pred, gold)
    except MemoryError:
        return CANNOT_JUDGE, "SymPy hit the memory cap"
    except RecursionError:
        return CANNOT_JUDGE, "SymPy hit the recursion limit"
    except Exception as error:  # a SymPy failure is "cannot judge", never "not equal"
        # str(error) can itself be huge or slow on SymPy objects; the type name is enough.
        return CANNOT_JUDGE, f"math-verify raised {type(error).__name__}"


def _cap_memory(extra_mb: int) -> None:
    """Allow the worker ``extra_mb`` of address space beyond what it has at fork time."""
    import resource

    try:  # only Linux reports the current size; elsewhere the time budget must do
        with open("/proc/self/statm") as statm:
            used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return
    limit = used + extra_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _worker_main(requests: int, replies: int, memory_mb: int) -> None:
    """The forked worker's loop; it never returns into the server's code."""
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)  # only the server talks to the caller
        os.dup2(devnull, 1)
        _cap_memory(memory_mb)
        while (line := _read_line(requests, None)) is not None:
            request = json.loads(line)
            verdict, reason = _compare_safely(request["pred"], request["gold"])
            _write_line(replies, {"verdict": verdict, "reason": reason})
    finally:
        os._exit(0)


class _Worker:
    def __init__(self, memory_mb: int):
        requests_r, requests_w = os.pipe()
        replies_r, replies_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(requests_w)
            os.close(replies_r)
            _worker_main(requests_r, replies_w, memory_mb)
        os.close(requests_r)
        os.close(replies_w)
        self.requests, self.replies, self.served, self.reaped = requests_w, replies_r, 0, False

    def alive(self) -> bool:
        self.reaped = self.reaped or os.waitpid(self.pid, os.WNOHANG) != (0, 0)
        return not self.reaped

    def ask(self, line: bytes, budget_s: float) -> dict:
        """The worker's reply, or a "cannot judge" one when it overran or died."""
        self.served += 1
        deadline = time.monotonic() + budget_s
        try:
            _write_all(self.requests, line + b"\n")
            reply = _read_line(self.replies, deadline)
        except OSError:
            reply = None
        if reply is not None:
            return json.loads(reply)
        if time.monotonic() >= deadline:
            return {"verdict": CANNOT_JUDGE, "reason": f"SymPy did not finish within {budget_s:.2f}s"}
        return {"verdict": CANNOT_JUDGE, "reason": "the SymPy worker died (crash or memory)"}

    def stop(self) -> None:
        if not self.reaped:  # not reaped yet, so the pid cannot have been reused
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.reaped = True
        os.close(self.requests)
        os.close(self.replies)


def serve(memory_mb: int, recycle_after: int) -> None:
    """The server loop: read a request, relay it to a worker under its budget, reply."""
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" notes
    sys.setrecursionlimit(20_000)  # the ANTLR parser recurses per bracket level
    for pred, gold in [("(x-1)*(x+1)", "x^2-1"), (r"\frac{1}{2}", "0.5"), (r"\{1,2\}", "(1,2)")]:
        compare_with_sympy(pred, gold)  # imports and grammar set-up, inherited by every fork
    _write_all(1, _READY + b"\n")
    worker = None
    while (line := _read_line(0, None)) is not None:
        request = json.loads(line)
        if worker is not None and not worker.alive():  # e.g. killed by the kernel's OOM killer
            worker.stop()
            worker = None
        worker = worker or _Worker(memory_mb)
        reply = worker.ask(line, request["budget_s"])
        if reply["verdict"] == CANNOT_JUDGE or worker.served >= recycle_after:
            worker.stop()  # after a timeout or a failure its state is suspect
            worker = None
        _write_line(1, reply)
    if worker is not None:
        worker.stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
