"""lme4 formula syntax -> a parsed :class:`Formula` (no data involved).

Supported: ``y ~ 1 + x + f + a:b + a*b + factor(x) - 1`` for the fixed effects, and random
terms ``(1|g)``, ``(x|g)`` (intercept and slope, correlated), ``(0 + x|g)``, ``(x||g)``
(uncorrelated: one term per column, as lme4), crossed terms, nested ``(1|a/b)`` (= ``(1|a) +
(1|a:b)``) and interaction grouping factors ``(1|a:b)``. The response is a column name, or
``cbind(k, n - k)`` / ``cbind(k, f)`` (binomial successes and failures, as lme4).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(r"^[A-Za-z_.][A-Za-z0-9_.]*$")
_FACTOR = re.compile(r"^factor\(\s*([A-Za-z_.][A-Za-z0-9_.]*)\s*\)$")


class FormulaError(ValueError):
    """The formula cannot be parsed; the message says what is wrong and where."""


@dataclass(frozen=True)
class Term:
    """One fixed-effect (or random-effect) model term: the variables it multiplies.

    ``variables`` holds column names; a name written ``factor(x)`` is in ``forced_factors``.
    The intercept is the empty term ``()``.
    """

    variables: tuple[str, ...]

    @property
    def label(self) -> str:
        return ":".join(self.variables) if self.variables else "(Intercept)"


@dataclass(frozen=True)
class TermsSpec:
    """The right-hand side of a model part: whether it has an intercept, and its terms."""

    intercept: bool
    terms: tuple[Term, ...]
    forced_factors: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RandomSpec:
    """A random-effects term ``(expr | group)``; ``group`` is a tuple of columns (``a:b``)."""

    expr: TermsSpec
    group: tuple[str, ...]

    @property
    def group_label(self) -> str:
        return ":".join(self.group)


@dataclass(frozen=True)
class Formula:
    """A parsed lme4 formula.

    ``response`` is one column; for ``cbind(k, n - k)`` it is ``k`` and ``trials`` is ``n``
    (``failures`` is set instead for ``cbind(k, f)``).
    """

    text: str
    response: str
    fixed: TermsSpec
    random: tuple[RandomSpec, ...]
    trials: str | None = None
    failures: str | None = None
    variables: tuple[str, ...] = field(default=())


def split_top(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` characters not inside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced ')' in {text!r}")
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise FormulaError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return parts


def _signed_parts(text: str) -> list[tuple[str, str]]:
    """``"a + b - 1"`` -> ``[("+", "a"), ("+", "b"), ("-", "1")]`` (top level only)."""
    out, depth, sign, start = [], 0, "+", 0
    for i, ch in enumerate(text + "+"):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch in "+-" and depth == 0:
            piece = text[start:i].strip()
            if piece:
                out.append((sign, piece))
            sign, start = ch, i + 1
    return out


def _variable(token: str, forced: set[str]) -> str:
    token = token.strip()
    match = _FACTOR.match(token)
    if match:
        forced.add(match.group(1))
        return match.group(1)
    if not _NAME.match(token):
        raise FormulaError(f"cannot read term {token!r}: expected a column name")
    return token


def parse_terms(text: str) -> TermsSpec:
    """The right-hand side ``text`` of a model part as a :class:`TermsSpec`."""
    intercept = True
    terms: list[Term] = []
    forced: set[str] = set()
    if not text.strip():
        raise FormulaError("empty right-hand side")
    for sign, piece in _signed_parts(text):
        if piece in ("0", "1"):
            if sign == "-" or piece == "0":
                intercept = piece == "1" and sign == "+"
            continue
        if piece.startswith("(") and piece.endswith(")") and "|" not in piece:
            inner = parse_terms(piece[1:-1])
            new = list(inner.terms)
            forced |= inner.forced_factors
        elif "*" in piece:
            names = [_variable(v, forced) for v in split_top(piece, "*")]
            new = []
            for size in range(1, len(names) + 1):
                new += [Term(tuple(c)) for c in _combinations(names, size)]
        else:
            new = [Term(tuple(_variable(v, forced) for v in split_top(piece, ":")))]
        for term in new:
            if sign == "-":
                terms = [t for t in terms if t != term]
            elif term not in terms:
                terms.append(term)
    return TermsSpec(intercept, tuple(terms), frozenset(forced))


def _combinations(names: list[str], size: int) -> list[tuple[str, ...]]:
    from itertools import combinations

    return list(combinations(names, size))


def _random(piece: str) -> list[RandomSpec]:
    inner = piece.strip()[1:-1]
    double = "||" in inner
    parts = inner.split("||") if double else split_top(inner, "|")
    if len(parts) != 2:
        raise FormulaError(f"cannot read random term {piece!r}: expected (expr | group)")
    expr = parse_terms(parts[0])
    group_text = parts[1].strip()
    groups: list[tuple[str, ...]] = []
    if "/" in group_text:
        names = [g.strip() for g in group_text.split("/")]
        groups = [tuple(names[: i + 1]) for i in range(len(names))]
    else:
        groups = [tuple(g.strip() for g in group_text.split(":"))]
    for group in groups:
        for name in group:
            if not _NAME.match(name):
                raise FormulaError(f"cannot read grouping factor {name!r} in {piece!r}")
    specs = []
    for group in groups:
        if double:
            parts_ = ([TermsSpec(True, ())] if expr.intercept else []) + [
                TermsSpec(False, (t,), expr.forced_factors) for t in expr.terms
            ]
            specs += [RandomSpec(p, group) for p in parts_]
        else:
            specs.append(RandomSpec(expr, group))
    return specs


def parse_formula(text: str) -> Formula:
    """Parse an lme4 formula; raises :class:`FormulaError` with a one-line reason."""
    text = " ".join(str(text).split())
    if text.count("~") != 1:
        raise FormulaError(f"formula {text!r} needs exactly one '~' (response ~ terms)")
    split_top(text, "~")  # raises on unbalanced parentheses
    lhs, rhs = (s.strip() for s in text.split("~"))
    trials = failures = None
    match = re.match(r"^cbind\((.*)\)$", lhs)
    if match:
        args = [a.strip() for a in split_top(match.group(1), ",")]
        if len(args) != 2:
            raise FormulaError(f"cbind needs two arguments (successes, failures): {lhs!r}")
        response = _variable(args[0], set())
        diff = re.match(r"^([A-Za-z_.][A-Za-z0-9_.]*)\s*-\s*([A-Za-z_.][A-Za-z0-9_.]*)$", args[1])
        if diff:
            if diff.group(2) != response:
                raise FormulaError(f"cbind(k, n - k): the second argument must subtract {response}")
            trials = diff.group(1)
        else:
            failures = _variable(args[1], set())
    else:
        if not _NAME.match(lhs):
            raise FormulaError(f"cannot read the response {lhs!r}: expected a column name")
        response = lhs
    fixed_parts, random = [], []
    for sign, piece in _signed_parts(rhs):
        if piece.startswith("(") and "|" in piece and piece.endswith(")"):
            if sign == "-":
                raise FormulaError(f"cannot subtract a random term: {piece!r}")
            random += _random(piece)
        else:
            fixed_parts.append(("" if sign == "+" else "- ") + piece)
    fixed = parse_terms(" + ".join(fixed_parts).replace("+ -", "-") or "1")
    variables: list[str] = [response] + [v for v in (trials, failures) if v]
    for spec in [fixed] + [r.expr for r in random]:
        variables += [v for t in spec.terms for v in t.variables]
    variables += [g for r in random for g in r.group]
    return Formula(
        text, response, fixed, tuple(random), trials, failures, tuple(dict.fromkeys(variables))
    )
