"""SymPy tools that a resolver model calls through an API's tool-calling: schemas, a safe
parser, and a killable worker that runs each call under a time and memory budget.

Parsing: a model's expression string is never given to ``eval``, ``sympify`` or
``parse_expr`` (all three ``eval``). :func:`parse` walks Python's ``ast`` of the string and
builds SymPy objects itself from a whitelist: numbers, names (as symbols, or the constants
``pi``, ``E``, ``I``, ``oo``), ``+ - * / ** %``, unary minus, parentheses and calls of
:data:`FUNCTIONS` with positional arguments. Anything else (attributes, subscripts, lambdas,
keywords, strings, ``__import__``...) is a :class:`ToolInputError` naming what was refused.
Size caps: :data:`MAX_CHARS` characters, integer literals of :data:`MAX_DIGITS` digits,
numeric powers whose exponent exceeds :data:`MAX_EXPONENT`.

Running: :class:`ToolRunner` keeps one server process (``python -I sympy_tools.py``) that
imports SymPy once and forks a fresh worker per call, under an address-space cap (the pipes
and the cap are :mod:`verifiers._sandbox`'s). A worker that overruns its budget is killed,
so ``factorint(10**200 + 1)`` ends as an error result, not a hang. Every failure -- bad
input, SymPy error, timeout, memory -- is a :class:`ToolResult` with ``is_error=True``,
which goes back to the model as a ``tool_result`` with ``is_error``; nothing raises.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

if not __package__:  # started as the server script: make `verifiers` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from verifiers._sandbox import _cap_memory, _read_line, _write_all, _write_line  # noqa: E402

MAX_CHARS = 500
MAX_DIGITS = 60
MAX_EXPONENT = 10_000
MAX_RESULT_CHARS = 4000
FUNCTIONS = ("sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "exp", "log",
             "sqrt", "Abs", "floor", "ceiling", "factorial", "binomial", "gcd", "lcm", "Rational",
             "Min", "Max")
CONSTANTS = {"pi": "pi", "E": "E", "I": "I", "oo": "oo"}
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,15}")


class ToolInputError(ValueError):
    """An argument the tools refuse; the message says what and where."""


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


# ----------------------------------------------------------------------------- parsing


def parse(text: str):
    """A SymPy expression from ``text``, built over ``ast`` without ``eval``.

    >>> parse("2*x**2 + sin(pi/2)")
    2*x**2 + 1
    >>> parse("__import__('os')")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    verifiers.sympy_tools.ToolInputError: function '__import__' is not allowed; allowed: sin, ...
    """
    import sympy

    if not isinstance(text, str):
        raise ToolInputError(f"expected an expression string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ToolInputError(f"expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(text.strip().replace("^", "**"), mode="eval")
    except SyntaxError as error:
        raise ToolInputError(f"not an expression: {error.msg} at column {error.offset}") from None
    try:
        return _build(tree.body, sympy)
    except RecursionError:
        raise ToolInputError("expression nests too deeply") from None


def _build(node: ast.AST, sympy):
    if isinstance(node, ast.Constant):
        return _number(node.value, sympy)
    if isinstance(node, ast.Name):
        return _name(node.id, sympy)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _build(node.operand, sympy)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return _binop(node, sympy)
    if isinstance(node, ast.Call):
        return _call(node, sympy)
    raise ToolInputError(f"{type(node).__name__} is not allowed (only numbers, names, "
                         f"+ - * / ** %, and calls of {', '.join(FUNCTIONS)})")


def _number(value, sympy):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolInputError(f"literal {value!r} is not allowed: only numbers")
    if isinstance(value, int):
        if len(str(abs(value))) > MAX_DIGITS:
            raise ToolInputError(f"integer literals are capped at {MAX_DIGITS} digits")
        return sympy.Integer(value)
    return sympy.Rational(repr(value))  # exact: 0.1 is 1/10, as written


def _name(name: str, sympy):
    if "_" in name and (name.startswith("_") or "__" in name):
        raise ToolInputError(f"names with underscores are not allowed: {name!r}")
    if name in CONSTANTS:
        return getattr(sympy, CONSTANTS[name])
    if not _NAME.fullmatch(name):
        raise ToolInputError(f"variable names are letters and digits, at most 16: {name!r}")
    return sympy.Symbol(name)


def _binop(node: ast.BinOp, sympy):
    left, right = _build(node.left, sympy), _build(node.right, sympy)
    if isinstance(node.op, ast.Add):
        return left + right
    if isinstance(node.op, ast.Sub):
        return left - right
    if isinstance(node.op, ast.Mult):
        return left * right
    if isinstance(node.op, ast.Div):
        return left / right
    if isinstance(node.op, ast.Mod):
        return sympy.Mod(left, right)
    if isinstance(node.op, ast.Pow):
        if right.is_Number and abs(right) > MAX_EXPONENT:
            raise ToolInputError(f"exponents are capped at {MAX_EXPONENT} (got {right})")
        return sympy.Pow(left, right)
    raise ToolInputError(f"operator {type(node.op).__name__} is not allowed")


def _call(node: ast.Call, sympy):
    if not isinstance(node.func, ast.Name):
        raise ToolInputError(f"only plain function names can be called, not {type(node.func).__name__}")
    if node.func.id not in FUNCTIONS:
        raise ToolInputError(f"function {node.func.id!r} is not allowed; allowed: {', '.join(FUNCTIONS)}")
    if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
        raise ToolInputError(f"{node.func.id}: positional arguments only")
    return getattr(sympy, node.func.id)(*(_build(a, sympy) for a in node.args))


def _equation(text: str, sympy):
    """``lhs = rhs`` (or ``==``) as ``lhs - rhs``; a bare expression means ``= 0``."""
    if not isinstance(text, str):
        raise ToolInputError(f"expected an equation string, got {type(text).__name__}")
    sides = re.split(r"==?", text)
    if len(sides) > 2:
        raise ToolInputError(f"an equation has at most one '=': {text[:80]!r}")
    return parse(sides[0]) - parse(sides[1]) if len(sides) == 2 else parse(text)


def _integer(value, sympy):
    result = parse(str(value)) if not isinstance(value, int) or isinstance(value, bool) else _number(value, sympy)
    if not result.is_Integer:
        raise ToolInputError(f"expected an integer, got {value!r}")
    return result


# ----------------------------------------------------------------------------- the tools


def _schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"name": name, "description": description,
            "input_schema": {"type": "object", "properties": properties, "required": required}}


_EXPR = {"type": "string", "description": "a SymPy-style expression, e.g. 'x**2 - 2*x + 1', 'sqrt(2)*pi'"}
_VAR = {"type": "string", "description": "a variable name, e.g. 'x'"}
_INT = {"type": "string", "description": "an integer expression, e.g. '2**61 - 1'"}
TOOL_SCHEMAS = [
    _schema("simplify", "Simplify an expression.", {"expression": _EXPR}, ["expression"]),
    _schema("expand", "Expand products and powers.", {"expression": _EXPR}, ["expression"]),
    _schema("factor", "Factor a polynomial over the rationals.", {"expression": _EXPR}, ["expression"]),
    _schema("solve", "Solve equations ('x**2 = 4', or an expression meaning '= 0') for variables.",
            {"equations": {"type": "array", "items": {"type": "string"}},
             "variables": {"type": "array", "items": _VAR}}, ["equations", "variables"]),
    _schema("integrate", "Integrate; give lower and upper for a definite integral.",
            {"expression": _EXPR, "variable": _VAR, "lower": _EXPR, "upper": _EXPR},
            ["expression", "variable"]),
    _schema("differentiate", "Differentiate `order` times (default 1).",
            {"expression": _EXPR, "variable": _VAR, "order": {"type": "integer"}},
            ["expression", "variable"]),
    _schema("evaluate", "Exact value of a closed expression and its decimal value.",
            {"expression": _EXPR, "digits": {"type": "integer"}}, ["expression"]),
    _schema("factorint", "Prime factorization of an integer as {prime: exponent}.", {"n": _INT}, ["n"]),
    _schema("is_prime", "Whether an integer is prime.", {"n": _INT}, ["n"]),
    _schema("gcd", "Greatest common divisor of integers.", {"numbers": {"type": "array", "items": _INT}}, ["numbers"]),
    _schema("lcm", "Least common multiple of integers.", {"numbers": {"type": "array", "items": _INT}}, ["numbers"]),
    _schema("mod_pow", "base**exponent mod modulus.", {"base": _INT, "exponent": _INT, "modulus": _INT},
            ["base", "exponent", "modulus"]),
    _schema("binomial", "n choose k.", {"n": _INT, "k": _INT}, ["n", "k"]),
    _schema("factorial", "n!.", {"n": _INT}, ["n"]),
    _schema("permutations", "Ordered selections of k from n: n!/(n-k)!.", {"n": _INT, "k": _INT}, ["n", "k"]),
]
TOOL_NAMES = tuple(schema["name"] for schema in TOOL_SCHEMAS)


def call_tool(name: str, arguments: dict) -> str:
    """Run one tool in this process (the worker calls it); raises on bad input."""
    import sympy

    if name not in TOOL_NAMES:
        raise ToolInputError(f"unknown tool {name!r}; tools: {', '.join(TOOL_NAMES)}")
    if not isinstance(arguments, dict):
        raise ToolInputError("arguments must be an object")
    a = arguments
    required = next(s for s in TOOL_SCHEMAS if s["name"] == name)["input_schema"]["required"]
    missing = [key for key in required if key not in a]
    if missing:
        raise ToolInputError(f"{name}: missing argument(s) {', '.join(missing)}")
    if name in ("simplify", "expand", "factor"):
        return str(getattr(sympy, name)(parse(a["expression"])))
    if name == "solve":
        equations = [_equation(e, sympy) for e in _list(a["equations"], "equations")]
        variables = [_name(v, sympy) for v in _list(a["variables"], "variables")]
        return str(sympy.solve(equations, variables, dict=True))
    if name == "integrate":
        x, f = _name(a["variable"], sympy), parse(a["expression"])
        if ("lower" in a) != ("upper" in a):
            raise ToolInputError("integrate: give both lower and upper, or neither")
        limits = (x, parse(str(a["lower"])), parse(str(a["upper"]))) if "lower" in a else x
        return str(sympy.integrate(f, limits))
    if name == "differentiate":
        order = int(a.get("order", 1))
        if not 1 <= order <= 20:
            raise ToolInputError("differentiate: order must be 1..20")
        return str(sympy.diff(parse(a["expression"]), _name(a["variable"], sympy), order))
    if name == "evaluate":
        value, digits = sympy.nsimplify(parse(a["expression"])), int(a.get("digits", 15))
        if not 1 <= digits <= 100:
            raise ToolInputError("evaluate: digits must be 1..100")
        return json.dumps({"exact": str(sympy.simplify(value)), "decimal": str(sympy.N(value, digits))})
    ints = {k: _integer(v, sympy) for k, v in a.items() if k in ("n", "k", "base", "exponent", "modulus")}
    if name == "factorint":
        return str(sympy.factorint(ints["n"]))
    if name == "is_prime":
        return str(bool(sympy.isprime(ints["n"])))
    if name in ("gcd", "lcm"):
        numbers = [_integer(v, sympy) for v in _list(a["numbers"], "numbers")]
        return str(getattr(sympy, f"{name}_list")(numbers))
    if name == "mod_pow":
        return str(pow(int(ints["base"]), int(ints["exponent"]), int(ints["modulus"])))
    if name == "binomial":
        return str(sympy.binomial(ints["n"], ints["k"]))
    if name == "factorial":
        return str(sympy.factorial(ints["n"]))
    return str(sympy.ff(ints["n"], ints["k"]))  # permutations


def _list(value, key: str) -> list:
    if not isinstance(value, list) or not value or len(value) > 10:
        raise ToolInputError(f"{key} must be a list of 1 to 10 strings")
    return value


def run_tool_here(name: str, arguments: dict) -> ToolResult:
    """:func:`call_tool` with every failure as an error result (the worker's body)."""
    try:
        text = call_tool(name, arguments)
    except ToolInputError as error:
        return ToolResult(str(error), is_error=True)
    except MemoryError:
        return ToolResult("SymPy hit the memory cap", is_error=True)
    except RecursionError:
        return ToolResult("SymPy hit the recursion limit", is_error=True)
    except Exception as error:  # a SymPy failure goes back to the model; str() can be huge
        return ToolResult(f"{name} failed: {type(error).__name__}: {str(error)[:200]}", is_error=True)
    if len(text) > MAX_RESULT_CHARS:
        return ToolResult(f"the result has more than {MAX_RESULT_CHARS} characters", is_error=True)
    return ToolResult(text)


# ----------------------------------------------------------------------------- the worker


class ToolRunner:
    """The caller's handle on one tool server; thread-safe, started on first use.

    :meth:`run` returns within ``budget_s`` + slack (+ the server's one-time start, which is
    not charged to the call). The server forks one worker per call, so no state (SymPy's
    caches, a half-done computation) leaks from one call to the next.
    """

    def __init__(self, budget_s: float = 5.0, memory_mb: int = 1024, slack_s: float = 1.0,
                 start_timeout_s: float = 60.0):
        if not budget_s > 0:
            raise ValueError(f"budget_s must be positive, got {budget_s}")
        self.budget_s, self._memory_mb = budget_s, memory_mb
        self._slack_s, self._start_timeout_s = slack_s, start_timeout_s
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def run(self, name: str, arguments: dict) -> ToolResult:
        with self._lock:
            self._ensure_server()
            deadline = time.monotonic() + self.budget_s + self._slack_s
            try:
                _write_line(self._proc.stdin.fileno(), {"name": name, "arguments": arguments,
                                                        "budget_s": self.budget_s})
                line = _read_line(self._proc.stdout.fileno(), deadline)
            except (OSError, TypeError, ValueError):
                line = None
            if line is None:
                self.close()
                return ToolResult("the SymPy tool server stopped answering", is_error=True)
            reply = json.loads(line)
            return ToolResult(reply["content"], reply["is_error"])

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    def _ensure_server(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self.close()
        self._proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), str(self._memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        if _read_line(self._proc.stdout.fileno(), time.monotonic() + self._start_timeout_s) != b'{"ready": true}':
            self.close()
            raise RuntimeError("the SymPy tool server did not start; its error, if any, is on stderr")

    def __enter__(self) -> "ToolRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_in_fork(request: dict, memory_mb: int) -> dict:
    """Fork a worker for one call; kill it when it overruns the request's budget."""
    replies_r, replies_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(replies_r)
            _cap_memory(memory_mb)
            result = run_tool_here(request["name"], request["arguments"])
            _write_line(replies_w, {"content": result.content, "is_error": result.is_error})
        finally:
            os._exit(0)
    os.close(replies_w)
    try:
        line = _read_line(replies_r, time.monotonic() + request["budget_s"])
    finally:
        os.kill(pid, signal.SIGKILL)  # done or overrun: either way it goes
        os.waitpid(pid, 0)
        os.close(replies_r)
    if line is not None:
        return json.loads(line)
    return {"content": f"{request['name']} did not finish within {request['budget_s']:g}s "
                       "(or ran out of memory)", "is_error": True}


def serve(memory_mb: int) -> None:
    """The server loop: warm SymPy up once, then one forked worker per request."""
    sys.setrecursionlimit(5000)
    run_tool_here("solve", {"equations": ["x**2 = 4"], "variables": ["x"]})
    run_tool_here("integrate", {"expression": "sin(x)", "variable": "x"})
    _write_all(1, b'{"ready": true}\n')
    while (line := _read_line(0, None)) is not None:
        _write_line(1, _run_in_fork(json.loads(line), memory_mb))


if __name__ == "__main__":
    serve(int(sys.argv[1]))
