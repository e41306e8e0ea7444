r"""Identities in plain SymPy syntax and in LaTeX, checked against math-verify itself.

Each row is one pair written twice: plain (``sin(x)**2``, as SymPy and Python print it) and
LaTeX (``\sin^2 x``). The verifier must give the row's verdict for the plain pair, the LaTeX
pair and a mixed one (plain prediction, LaTeX gold); math-verify alone, on the LaTeX pair, must
agree with every EQUIVALENT / DIFFERENT row, since the LaTeX forms are what it reads. Before
plain syntax was read as such, ``sin`` was the product s·i·n and the plain rows below were
judged DIFFERENT.
"""

import pytest

from verifiers.math import Verdict, judge

E, D, U = Verdict.EQUIVALENT, Verdict.DIFFERENT, Verdict.CANNOT_JUDGE
IDENTITIES = [  # plain pred, plain gold, LaTeX pred, LaTeX gold, verdict
    ("sin(x)**2 + cos(x)**2", "1", r"\sin^2 x + \cos^2 x", "1", E),
    ("sin(2*x)", "2*sin(x)*cos(x)", r"\sin(2x)", r"2\sin x\cos x", E),
    ("cos(2*x)", "cos(x)**2 - sin(x)**2", r"\cos(2x)", r"\cos^2 x - \sin^2 x", E),
    ("cos(2*x)", "1 - 2*sin(x)**2", r"\cos(2x)", r"1 - 2\sin^2 x", E),
    ("tan(x)", "sin(x)/cos(x)", r"\tan x", r"\frac{\sin x}{\cos x}", E),
    ("1 + tan(x)**2", "1/cos(x)**2", r"1 + \tan^2 x", r"\frac{1}{\cos^2 x}", E),
    ("sin(x + y)", "sin(x)*cos(y) + cos(x)*sin(y)", r"\sin(x+y)", r"\sin x\cos y + \cos x\sin y", E),
    ("sin(pi/6)", "1/2", r"\sin\frac{\pi}{6}", r"\frac{1}{2}", E),
    ("cos(pi)", "-1", r"\cos\pi", "-1", E),
    ("tan(pi/4)", "1", r"\tan\frac{\pi}{4}", "1", E),
    ("exp(0)", "1", "e^{0}", "1", E),
    ("exp(1)", "E", "e^{1}", "e", E),
    ("exp(2*x)", "exp(x)**2", "e^{2x}", "(e^{x})^2", E),
    ("exp(log(x))", "x", r"e^{\ln x}", "x", E),
    ("log(exp(2))", "2", r"\ln(e^{2})", "2", E),
    ("log(8)/log(2)", "3", r"\frac{\ln 8}{\ln 2}", "3", E),
    ("sqrt(8)", "2*sqrt(2)", r"\sqrt{8}", r"2\sqrt{2}", E),
    ("sqrt(x**2)", "Abs(x)", r"\sqrt{x^2}", "|x|", E),
    ("sqrt(2)*sqrt(3)", "sqrt(6)", r"\sqrt{2}\sqrt{3}", r"\sqrt{6}", E),
    ("sinh(x)", "(exp(x) - exp(-x))/2", r"\sinh x", r"\frac{e^{x}-e^{-x}}{2}", E),
    ("cosh(x)**2 - sinh(x)**2", "1", r"\cosh^2 x - \sinh^2 x", "1", E),
    ("atan(1)", "pi/4", r"\arctan 1", r"\frac{\pi}{4}", E),
    ("asin(1/2)", "pi/6", r"\arcsin\frac{1}{2}", r"\frac{\pi}{6}", E),
    ("(x**2 - 1)/(x - 1)", "x + 1", r"\frac{x^2-1}{x-1}", "x+1", E),
    ("x**2 + 2*x + 1", "(x + 1)**2", "x^2+2x+1", "(x+1)^2", E),
    ("sin(x)", "cos(x)", r"\sin x", r"\cos x", D),
    ("sin(2*x)", "2*sin(x)", r"\sin(2x)", r"2\sin x", D),
    ("exp(0)", "0", "e^{0}", "0", D),
    ("sqrt(8)", "3", r"\sqrt{8}", "3", D),
    ("cos(pi)", "1", r"\cos\pi", "1", D),
    ("sqrt(x**2)", "x", r"\sqrt{x^2}", "x", D),
    ("log(x) + log(2)", "log(x + 2)", r"\ln x + \ln 2", r"\ln(x+2)", D),
    ("tan(x)", "cos(x)/sin(x)", r"\tan x", r"\frac{\cos x}{\sin x}", D),
    # identities SymPy cannot prove: math-verify says "not equal"; the verifier cannot judge
    ("cos(pi/7)*cos(2*pi/7)*cos(4*pi/7)", "-1/8", r"\cos\frac{\pi}{7}\cos\frac{2\pi}{7}\cos\frac{4\pi}{7}",
     r"-\frac{1}{8}", U),
    ("asin(x) + acos(x)", "pi/2", r"\arcsin x + \arccos x", r"\frac{\pi}{2}", U),
]


@pytest.mark.parametrize("plain_pred, plain_gold, latex_pred, latex_gold, verdict", IDENTITIES)
def test_plain_latex_and_mixed_forms_get_the_same_verdict(plain_pred, plain_gold, latex_pred, latex_gold, verdict):
    for pred, gold in ((plain_pred, plain_gold), (latex_pred, latex_gold), (plain_pred, latex_gold)):
        judgement = judge(pred, gold, timeout_s=5.0)
        assert judgement.verdict is verdict, (pred, gold, judgement)


@pytest.mark.parametrize("plain_pred, plain_gold, latex_pred, latex_gold, verdict", IDENTITIES)
def test_math_verify_alone_agrees_on_the_latex_forms(plain_pred, plain_gold, latex_pred, latex_gold, verdict):
    from math_verify import parse, verify

    said = verify(parse(f"${latex_gold}$"), parse(f"${latex_pred}$"))
    assert said is (verdict is E)  # on the U rows it says "not equal": confident and wrong


def test_plain_function_names_are_not_read_as_products():
    assert judge("sin(x)", "s*i*n*x").verdict is D
    assert judge("exp(0)", "e*x*p*0").verdict is D
