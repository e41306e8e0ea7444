"""The SymPy tools: the ``ast`` parser refuses what is not math, the tools compute, and the
worker bounds time and memory (an overrun is an error result, never a hang)."""

from __future__ import annotations

import time

import pytest
import sympy

from verifiers.sympy_tools import (
    MAX_CHARS, TOOL_NAMES, TOOL_SCHEMAS, ToolInputError, ToolResult, ToolRunner, call_tool, parse, run_tool_here,
)

x = sympy.Symbol("x")


@pytest.fixture(scope="module")
def runner():
    with ToolRunner(budget_s=2.0, memory_mb=512) as running:
        yield running


@pytest.mark.parametrize("text, expected", [
    ("2*x**2 + sin(pi/2)", 2 * x**2 + 1),
    ("x^2 - 1", x**2 - 1),
    ("-(3 + 4)/2", sympy.Rational(-7, 2)),
    ("0.1 + Rational(1, 5)", sympy.Rational(3, 10)),
    ("sqrt(8)", 2 * sympy.sqrt(2)),
    ("exp(I*pi)", -1),
    ("17 % 5", 2),
    ("x_1 + 1", sympy.Symbol("x_1") + 1),
])
def test_parse_builds_sympy(text, expected):
    assert sympy.simplify(parse(text) - expected) == 0


@pytest.mark.parametrize("text, message", [
    ("__import__('os')", "function '__import__' is not allowed"),
    ("__import__", "underscores"),
    ("x.__class__", "Attribute is not allowed"),
    ("(1).real", "Attribute is not allowed"),
    ("lambda: 1", "Lambda is not allowed"),
    ("[c for c in ()]", "ListComp is not allowed"),
    ("x[0]", "Subscript is not allowed"),
    ("'rm -rf'", "literal 'rm -rf' is not allowed"),
    ("eval('1')", "function 'eval' is not allowed"),
    ("sin(x, evaluate=False)", "positional arguments only"),
    ("sin(*x)", "positional arguments only"),
    ("sympy.Integer(1)", "only plain function names"),
    ("x if x else 1", "IfExp is not allowed"),
    ("x < 1", "Compare is not allowed"),
    ("True + 1", "literal True is not allowed"),
    ("1j", "literal 1j is not allowed"),
    ("x = 1", "not an expression"),
    ("2**(10**10)", "exponents are capped"),
    ("9**9**9", "exponents are capped"),
    ("1" * 61, "capped at 60 digits"),
    ("x" * (MAX_CHARS + 1), "longer than"),
    ("-" * 400 + "1", None),  # deep but valid: either built or refused, never a crash
])
def test_parse_refuses(text, message):
    if message is None:
        try:
            parse(text)
        except ToolInputError:
            pass
        return
    with pytest.raises(ToolInputError, match=message.replace("(", r"\(").replace("*", r"\*")):
        parse(text)


def test_parse_never_evals(monkeypatch):
    import builtins

    def refuse(*args, **kwargs):
        raise AssertionError("eval was called")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(sympy, "sympify", refuse)
    monkeypatch.setattr(sympy, "parse_expr", refuse, raising=False)
    assert parse("x**2 + 2*x + 1") == x**2 + 2 * x + 1


@pytest.mark.parametrize("name, arguments, expected", [
    ("simplify", {"expression": "(x**2 - 1)/(x - 1)"}, "x + 1"),
    ("factor", {"expression": "x**2 - 5*x + 6"}, "(x - 3)*(x - 2)"),
    ("expand", {"expression": "(x + 1)**2"}, "x**2 + 2*x + 1"),
    ("solve", {"equations": ["x**2 = 4"], "variables": ["x"]}, "[{x: -2}, {x: 2}]"),
    ("solve", {"equations": ["x + y = 3", "x - y = 1"], "variables": ["x", "y"]}, "[{x: 2, y: 1}]"),
    ("integrate", {"expression": "x*exp(x)", "variable": "x", "lower": "0", "upper": "1"}, "1"),
    ("integrate", {"expression": "cos(x)", "variable": "x"}, "sin(x)"),
    ("differentiate", {"expression": "x**3", "variable": "x", "order": 2}, "6*x"),
    ("factorint", {"n": "360"}, "{2: 3, 3: 2, 5: 1}"),
    ("is_prime", {"n": "2**61 - 1"}, "True"),
    ("gcd", {"numbers": ["84", "126"]}, "42"),
    ("lcm", {"numbers": ["4", "6", "10"]}, "60"),
    ("mod_pow", {"base": "2", "exponent": "10", "modulus": "7"}, "2"),
    ("binomial", {"n": "10", "k": "3"}, "120"),
    ("factorial", {"n": "6"}, "720"),
    ("permutations", {"n": "5", "k": "2"}, "20"),
])
def test_tools_compute(name, arguments, expected):
    assert call_tool(name, arguments) == expected


def test_evaluate_gives_exact_and_decimal():
    assert call_tool("evaluate", {"expression": "sqrt(2)**2 + pi - pi"}) == '{"exact": "2", "decimal": "2.00000000000000"}'


def test_schemas_name_every_tool_with_a_json_schema():
    assert len(TOOL_NAMES) == len(set(TOOL_NAMES)) >= 12
    for schema in TOOL_SCHEMAS:
        assert schema["input_schema"]["type"] == "object" and schema["description"]
        assert set(schema["input_schema"]["required"]) <= set(schema["input_schema"]["properties"])


@pytest.mark.parametrize("name, arguments, message", [
    ("shell", {}, "unknown tool 'shell'"),
    ("factor", {}, "missing argument(s) expression"),
    ("factor", {"expression": "__import__('os').system('true')"}, "only plain function names"),
    ("factorint", {"n": "1/2"}, "expected an integer"),
    ("solve", {"equations": "x = 1", "variables": ["x"]}, "must be a list"),
    ("integrate", {"expression": "x", "variable": "x", "lower": "0"}, "both lower and upper"),
    ("simplify", {"expression": "1/0 + zoo*x"}, None),
])
def test_bad_input_is_an_error_result(name, arguments, message):
    result = run_tool_here(name, arguments)
    if message is None:  # whatever SymPy makes of it, no exception escapes
        assert isinstance(result, ToolResult)
        return
    assert result.is_error and message in result.content


def test_runner_answers_through_the_worker(runner):
    assert runner.run("solve", {"equations": ["x**2 - 9"], "variables": ["x"]}) == ToolResult("[{x: -3}, {x: 3}]")
    bad = runner.run("simplify", {"expression": "x.__class__"})
    assert bad.is_error and "Attribute is not allowed" in bad.content


@pytest.mark.parametrize("name, arguments", [
    ("factorint", {"n": "10**200 + 1"}),
    ("factorial", {"n": "10**7"}),
    ("evaluate", {"expression": "(9**9999)**9999"}),
])
def test_huge_computation_ends_within_the_budget(runner, name, arguments):
    start = time.monotonic()
    result = runner.run(name, arguments)
    assert time.monotonic() - start < runner.budget_s + 1.5
    assert result.is_error and ("did not finish" in result.content or "memory" in result.content)
    assert runner.run("gcd", {"numbers": ["12", "18"]}) == ToolResult("6")  # the server lives on


def test_refused_power_is_immediate(runner):
    start = time.monotonic()
    result = runner.run("evaluate", {"expression": "2**(10**10)"})
    assert result.is_error and "exponents are capped" in result.content
    assert time.monotonic() - start < 1.0
