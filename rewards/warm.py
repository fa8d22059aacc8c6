"""Imported once by the worker pool's fork server, so that every worker forked from it (the first ones and
each replacement of a killed one) starts warm: one check of each kind runs here, doing the lazy set-up of
sympy and of the LaTeX parser that otherwise makes a new worker's first checks about three times slower."""

from rewards.math import is_correct

for _completion, _reference in [
    ("\\boxed{\\frac{3}{6}}", "0.5"),
    ("\\boxed{2\\sqrt{3}\\pi + i}", "i + 2\\pi\\sqrt{3}"),
    ("\\boxed{(0, 1] \\cup \\{4\\}}", "(0,1]\\cup\\{4\\}"),
    ("\\boxed{\\begin{pmatrix}1 & 0\\end{pmatrix}}", "\\begin{pmatrix}1&0\\end{pmatrix}"),
    ("\\boxed{y = x^2 - 1}", "y=(x-1)(x+1)"),
    ("\\boxed{45^\\circ}", "45"),
    ("\\boxed{20\\%}", "0.2"),
    ("\\boxed{\\sin x}", "\\cos x"),
]:
    try:
        is_correct(_completion, _reference)
    except Exception:  # noqa: BLE001 - only a warm-up: a failure here must not take the fork server down
        pass
