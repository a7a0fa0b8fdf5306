"""Rules as data: a TOML file of named conditions over the feature vector.

A rule file looks like::

    version = "2026-11-25.1"

    [[rule]]
    name = "card_testing_burst"
    expression = "count_1m >= 5 and amount < 5"
    action = "review"            # "decline" | "review" | "score_floor"
    score_floor = 0.7            # only with action = "score_floor" (and required there)
    reason_code = "CARD_TESTING"
    reason_text = "5+ small transactions within a minute"
    mode = "active"              # "active" | "shadow"

Expressions are never evaluated as Python. They are parsed with `ast.parse` and checked against
a whitelist (and/or/not, comparisons, + - * / %, unary + -, numbers, True/False, feature
names); anything else is refused with a `RulesError` naming the rule, the construct and its
position. The checked tree is then compiled into numpy closures that evaluate a whole batch at
once.

Semantics (where they differ from Python, on purpose, so a batch evaluates without branches):

* `and`, `or` and `not` always yield True/False (element-wise `&`, `|`, `~`), never one of
  their operands. True/False used in arithmetic count as 1/0, as in Python.
* A number used as a condition (a bare feature, `amount % 2`) means `!= 0`.
* Arithmetic follows IEEE 754: `x / 0` is ±inf or nan and never raises or warns.
* Every comparison with an operand that is not finite (nan, ±inf) is False, `!=` included, and
  so is a non-finite number used as a condition. A division by zero therefore never makes a
  rule fire by itself (only through `not`). Features are expected to be finite; a non-finite
  feature silently disables every comparison that reads it.
"""

from __future__ import annotations

import ast
import difflib
import enum
import io
import math
import operator
import os
import re
import tokenize
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from numpy.typing import NDArray

from shared.errors import RulesFileError
from shared.scoring.reloading import ReloadingFile, ReloadResult

__all__ = [
    "ReloadResult",
    "ReloadingRules",
    "Rule",
    "RuleAction",
    "RuleHits",
    "RuleMode",
    "RuleSet",
    "RulesError",
    "load_rules",
    "parse_rules",
]

# Bounds that keep the (recursive) checker and compiler far from Python's recursion limit and
# a rule's cost per batch predictable. Real rules are a handful of nodes.
MAX_EXPRESSION_CHARS = 2000
MAX_DEPTH = 50

_REASON_CODE = re.compile(r"[A-Z][A-Z0-9_]*")

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
# A compiled rule: features of shape (n, d) in, booleans of shape (n,) out.
Predicate = Callable[[FloatArray], BoolArray]


class RulesError(RulesFileError):
    """A rules file or expression was rejected.

    `source` is the file (or "<string>"), `rule` the rule's name when the problem is inside a
    rule, `line`/`column` (1-based, within the expression) when the problem has a position.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str,
        rule: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.rule = rule
        self.line = line
        self.column = column


class RuleAction(enum.StrEnum):
    DECLINE = "decline"  # forces DECLINE
    REVIEW = "review"  # forces at least REVIEW
    SCORE_FLOOR = "score_floor"  # raises the score to at least `score_floor`


class RuleMode(enum.StrEnum):
    ACTIVE = "active"  # acts on score and decision
    SHADOW = "shadow"  # evaluated and reported as a reason, never acts


@dataclass(frozen=True)
class Rule:
    name: str
    expression: str
    action: RuleAction
    score_floor: float | None  # set exactly when action is SCORE_FLOOR
    reason_code: str
    reason_text: str
    mode: RuleMode
    # Compiled from `expression`; takes the features transposed to (d, n), see RuleSet.evaluate.
    _columns_predicate: Callable[[FloatArray], NDArray[Any]] = field(compare=False, repr=False)

    def evaluate(self, features: FloatArray) -> BoolArray:
        """This rule over a batch (n, d) -> (n,) booleans."""
        with np.errstate(all="ignore"):
            return _as_row_mask(self._columns_predicate(_columns(features)), features.shape[0])


@dataclass(frozen=True, eq=False)
class RuleHits:
    """Which rules fired for which rows: `matrix[i, j]` is rule i on row j."""

    rules: tuple[Rule, ...]
    matrix: BoolArray  # shape (len(rules), n)

    def of(self, name: str) -> BoolArray:
        for i, rule in enumerate(self.rules):
            if rule.name == name:
                row: BoolArray = self.matrix[i]
                return row
        raise KeyError(name)


@dataclass(frozen=True)
class RuleSet:
    version: str
    rules: tuple[Rule, ...]
    feature_names: tuple[str, ...]
    source: str = "<string>"

    def evaluate(self, features: FloatArray) -> RuleHits:
        """Every rule over a batch of shape (n, len(feature_names)) in one pass per rule."""
        features = _check_batch(features, len(self.feature_names))
        n = features.shape[0]
        matrix = np.zeros((len(self.rules), n), dtype=np.bool_)
        if self.rules and n:
            # Contiguous columns make every feature read a contiguous (n,) vector.
            columns = _columns(features)
            with np.errstate(all="ignore"):
                for i, rule in enumerate(self.rules):
                    matrix[i] = rule._columns_predicate(columns)
        return RuleHits(self.rules, matrix)


def parse_rules(text: str, feature_names: Sequence[str], source: str = "<string>") -> RuleSet:
    """Parse and compile a rules file's text; raise `RulesError` on anything doubtful."""
    names = tuple(feature_names)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RulesError(f"{source}: not valid TOML: {e}", source=source) from e

    unknown = sorted(set(doc) - {"version", "rule"})
    if unknown:
        raise RulesError(
            f"{source}: unknown top-level key(s) {unknown}; expected 'version' and [[rule]]",
            source=source,
        )
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        raise RulesError(f"{source}: 'version' must be a non-empty string", source=source)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
        raise RulesError(f"{source}: 'rule' must be an array of tables ([[rule]])", source=source)

    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules, start=1):
        rule = _parse_rule(raw, index, names, source)
        if rule.name in seen:
            raise RulesError(
                f"{source}: rule {rule.name!r}: duplicate rule name (rule #{index})",
                source=source,
                rule=rule.name,
            )
        seen.add(rule.name)
        rules.append(rule)
    return RuleSet(version=version, rules=tuple(rules), feature_names=names, source=source)


def load_rules(path: str | os.PathLike[str], feature_names: Sequence[str]) -> RuleSet:
    """Read and parse a rules file; an unreadable file is a `RulesError` too."""
    source = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RulesError(f"{source}: cannot read rules file: {e}", source=source) from e
    return parse_rules(text, feature_names, source)


class ReloadingRules(ReloadingFile[RuleSet]):
    """The rules in force, swapped when the file changes; a broken file keeps the old rules.

    Raises `RulesError` from the constructor if the first load fails.
    """

    def __init__(self, path: str | os.PathLike[str], feature_names: Sequence[str]) -> None:
        names = tuple(feature_names)
        super().__init__(path, lambda p: load_rules(p, names), lambda rs: rs.version)

    @property
    def rules(self) -> RuleSet:
        return self.current


# --- parsing of one [[rule]] table ------------------------------------------------------------

_REQUIRED = ("name", "expression", "action", "reason_code", "reason_text", "mode")
_ALLOWED = {*_REQUIRED, "score_floor"}


def _parse_rule(raw: Mapping[str, object], index: int, names: tuple[str, ...], source: str) -> Rule:
    name_value = raw.get("name")
    label = f"rule {name_value!r}" if isinstance(name_value, str) else f"rule #{index}"
    rule_name = name_value if isinstance(name_value, str) else None

    def fail(message: str) -> RulesError:
        return RulesError(f"{source}: {label}: {message}", source=source, rule=rule_name)

    unknown = sorted(set(raw) - _ALLOWED)
    if unknown:
        raise fail(f"unknown key(s) {unknown}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise fail(f"missing required field(s) {missing}")
    for key in _REQUIRED:
        value = raw[key]
        if not isinstance(value, str) or not value.strip():
            raise fail(f"{key!r} must be a non-empty string")
    name = str(raw["name"])
    expression = str(raw["expression"])
    reason_code = str(raw["reason_code"])
    if not _REASON_CODE.fullmatch(reason_code):
        raise fail(f"reason_code {reason_code!r} must look like UPPER_SNAKE_CASE")
    try:
        action = RuleAction(str(raw["action"]))
    except ValueError:
        raise fail(
            f"unknown action {raw['action']!r}; expected one of {[a.value for a in RuleAction]}"
        ) from None
    try:
        mode = RuleMode(str(raw["mode"]))
    except ValueError:
        raise fail(
            f"unknown mode {raw['mode']!r}; expected one of {[m.value for m in RuleMode]}"
        ) from None

    floor: float | None = None
    if action is RuleAction.SCORE_FLOOR:
        value = raw.get("score_floor")
        if value is None:
            raise fail("action 'score_floor' needs a 'score_floor' between 0 and 1")
        # bool is an int in Python; `score_floor = true` is a mistake, not 1.0.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise fail(f"score_floor must be a number, got {value!r}")
        floor = float(value)
        if not 0.0 <= floor <= 1.0:  # also refuses nan
            raise fail(f"score_floor {value!r} is outside [0, 1]")
    elif "score_floor" in raw:
        raise fail(f"score_floor is only allowed with action 'score_floor', not {action.value!r}")

    predicate = compile_expression(expression, names, rule=name, source=source)
    return Rule(
        name=name,
        expression=expression,
        action=action,
        score_floor=floor,
        reason_code=reason_code,
        reason_text=str(raw["reason_text"]),
        mode=mode,
        _columns_predicate=predicate,
    )


# --- expressions: whitelist check and compilation to numpy closures --------------------------

# A compiled node reads the feature columns (d, n) and returns an array that broadcasts to (n,):
# either (n,) or 0-d for constants (cheaper than materialising a full array).
_Node = Callable[[FloatArray], NDArray[Any]]

_BINOPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: np.true_divide,
    ast.Mod: np.remainder,  # same sign convention as Python's float %
}
_CMPOPS: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}

# Error messages for refused constructs.
_REFUSED: dict[type[ast.AST], str] = {
    ast.Call: "calls are not allowed",
    ast.Attribute: "attribute access is not allowed",
    ast.Subscript: "subscripts are not allowed",
    ast.Lambda: "lambdas are not allowed",
    ast.NamedExpr: "assignment expressions (:=) are not allowed",
    ast.IfExp: "conditional expressions (x if c else y) are not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.List: "lists are not allowed",
    ast.Tuple: "tuples are not allowed",
    ast.Set: "sets are not allowed",
    ast.Dict: "dicts are not allowed",
    ast.Starred: "starred expressions are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
    ast.Slice: "slices are not allowed",
}
_REFUSED_OPERATORS: dict[type[ast.AST], str] = {
    ast.Pow: "the ** operator is not allowed",
    ast.FloorDiv: "the // operator is not allowed",
    ast.MatMult: "the @ operator is not allowed",
    ast.LShift: "the << operator is not allowed",
    ast.RShift: "the >> operator is not allowed",
    ast.BitAnd: "the & operator is not allowed (use 'and')",
    ast.BitOr: "the | operator is not allowed (use 'or')",
    ast.BitXor: "the ^ operator is not allowed",
    ast.Invert: "the ~ operator is not allowed (use 'not')",
    ast.Is: "'is' comparisons are not allowed",
    ast.IsNot: "'is not' comparisons are not allowed",
    ast.In: "'in' comparisons are not allowed",
    ast.NotIn: "'not in' comparisons are not allowed",
}


@dataclass(frozen=True)
class _Compiled:
    fn: _Node
    is_bool: bool  # yields booleans (a condition) rather than numbers
    always_finite: bool  # known at compile time never to be nan/inf (booleans, constants)


def compile_expression(
    expression: str, feature_names: Sequence[str], *, rule: str = "<expression>", source: str = ""
) -> Callable[[FloatArray], NDArray[Any]]:
    """Check `expression` against the whitelist and compile it.

    The result takes feature COLUMNS, shape (d, n) (the batch transposed), and returns an array
    broadcastable to (n,) of booleans; `Rule.evaluate` and `RuleSet.evaluate` wrap it.
    Raises `RulesError` with the rule's name and the position of the refused construct.
    """
    prefix = f"{source}: " if source else ""
    names = {name: i for i, name in enumerate(feature_names)}

    def fail(
        message: str, node: ast.AST | None = None, pos: tuple[int, int] | None = None
    ) -> NoReturn:
        line: int | None = None
        col: int | None = None
        if isinstance(node, ast.expr):
            line, col = _position(expression, node.lineno, node.col_offset)
        elif pos is not None:
            line, col = pos
        where = ""
        if line is not None and col is not None:
            where = f" at column {col}" if line == 1 else f" at line {line}, column {col}"
        raise RulesError(
            f"{prefix}rule {rule!r}: {message}{where}",
            source=source or "<string>",
            rule=rule,
            line=line,
            column=col,
        )

    if len(expression) > MAX_EXPRESSION_CHARS:
        fail(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    # Wrapping in parentheses lets an expression span lines (TOML multi-line strings) and start
    # with indentation; the newline keeps a trailing comment from eating the ')'.
    wrapped = f"({expression}\n)"
    try:
        tree = ast.parse(wrapped, mode="eval")
    except SyntaxError as e:
        line = e.lineno or 1
        if line > expression.count("\n") + 1:
            fail(f"syntax error: {e.msg} at end of expression")
        fail(f"syntax error: {e.msg}", pos=_position_chars(line, (e.offset or 1) - 1))
    except (RecursionError, MemoryError):
        fail("expression too deeply nested")
    tokens = list(tokenize.generate_tokens(io.StringIO(wrapped).readline))
    _check_balanced(tokens, fail)

    def operator_position(left: ast.expr) -> tuple[int, int] | None:
        """Where the operator after `left` starts (operators carry no position in the AST)."""
        if left.end_lineno is None or left.end_col_offset is None:  # pragma: no cover
            return None
        end = _position(expression, left.end_lineno, left.end_col_offset)
        for tok in tokens:
            at = _position_chars(tok.start[0], tok.start[1])
            if at >= end and tok.string != ")" and tok.type in (tokenize.OP, tokenize.NAME):
                return at
        return None  # pragma: no cover - a binary operator always follows its left operand

    def walk(node: ast.AST, depth: int) -> _Compiled:
        if depth > MAX_DEPTH:
            fail(f"expression nested deeper than {MAX_DEPTH} levels", node)
        if isinstance(node, ast.BoolOp):
            if not isinstance(node.op, ast.And | ast.Or):  # pragma: no cover - only And/Or exist
                fail("this boolean operator is not allowed", node)
            parts = [_truthy(walk(v, depth + 1)).fn for v in node.values]
            combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
            return _Compiled(_reduce(parts, combine), is_bool=True, always_finite=True)
        if isinstance(node, ast.UnaryOp):
            operand = walk(node.operand, depth + 1)
            if isinstance(node.op, ast.Not):
                inner = _truthy(operand).fn
                return _Compiled(lambda c: np.logical_not(inner(c)), True, True)
            if isinstance(node.op, ast.USub):
                num = _numeric(operand)
                return _Compiled(lambda c: np.negative(num.fn(c)), False, num.always_finite)
            if isinstance(node.op, ast.UAdd):
                return _numeric(operand)
            fail(_REFUSED_OPERATORS.get(type(node.op), "this unary operator is not allowed"), node)
        if isinstance(node, ast.BinOp):
            op = _BINOPS.get(type(node.op))
            if op is None:
                message = _REFUSED_OPERATORS.get(type(node.op), "this operator is not allowed")
                fail(message, pos=operator_position(node.left))
            left = _numeric(walk(node.left, depth + 1)).fn
            right = _numeric(walk(node.right, depth + 1)).fn
            # Division and % can produce inf/nan from finite inputs, so nothing is "finite".
            return _Compiled(_binop(op, left, right), is_bool=False, always_finite=False)
        if isinstance(node, ast.Compare):
            for cmp, left_operand in zip(node.ops, [node.left, *node.comparators], strict=False):
                if type(cmp) not in _CMPOPS:
                    message = _REFUSED_OPERATORS.get(type(cmp), "this comparison is not allowed")
                    fail(message, pos=operator_position(left_operand))
            operands = [_numeric(walk(v, depth + 1)) for v in [node.left, *node.comparators]]
            ops = [_CMPOPS[type(c)] for c in node.ops]
            return _Compiled(_compare(operands, ops), is_bool=True, always_finite=True)
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool):
                return _constant(np.asarray(value, dtype=np.bool_), is_bool=True)
            if isinstance(value, int | float):
                try:
                    number = float(value)
                except OverflowError:
                    number = math.inf
                if not math.isfinite(number):
                    fail("numbers must be finite", node)
                return _constant(np.asarray(number, dtype=np.float64), is_bool=False)
            if isinstance(value, str | bytes):
                fail("string constants are not allowed", node)
            fail(f"the constant {value!r} is not allowed", node)
        if isinstance(node, ast.Name):
            index = names.get(node.id)
            if index is None:
                close = difflib.get_close_matches(node.id, list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                fail(f"unknown feature {node.id!r}{hint}", node)
            i = int(index)  # bound for the closure
            return _Compiled(lambda c: c[i], is_bool=False, always_finite=False)
        fail(_REFUSED.get(type(node), f"{type(node).__name__} expressions are not allowed"), node)

    compiled = _truthy(walk(tree.body, 0))
    return compiled.fn


def _position(expression: str, lineno: int, col_offset: int) -> tuple[int, int]:
    """(line, 1-based character column) within `expression`, from a position in the wrapped
    text. AST column offsets count UTF-8 bytes; we report characters."""
    lines = f"({expression}\n)".split("\n")
    text = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    chars = len(text.encode("utf-8")[:col_offset].decode("utf-8", errors="replace"))
    return _position_chars(lineno, chars)


def _position_chars(lineno: int, chars: int) -> tuple[int, int]:
    # The opening '(' we added shifts the first line by one character.
    col = chars if lineno == 1 else chars + 1
    return lineno, max(col, 1)


def _check_balanced(tokens: list[tokenize.TokenInfo], fail: Callable[..., NoReturn]) -> None:
    """Refuse `a) or (b`: it parses once wrapped, but only thanks to our parentheses."""
    depth = 0
    brackets = [t for t in tokens if t.type == tokenize.OP and t.string in "()[]{}"]
    for k, tok in enumerate(brackets):
        depth += 1 if tok.string in "([{" else -1
        if depth == 0 and k != len(brackets) - 1:
            fail("unbalanced ')'", pos=_position_chars(tok.start[0], tok.start[1]))


def _constant(value: NDArray[Any], *, is_bool: bool) -> _Compiled:
    return _Compiled(lambda c: value, is_bool=is_bool, always_finite=True)


def _numeric(node: _Compiled) -> _Compiled:
    """Booleans used as numbers count as 1.0 / 0.0."""
    if not node.is_bool:
        return node
    fn = node.fn
    return _Compiled(lambda c: fn(c).astype(np.float64), is_bool=False, always_finite=True)


def _truthy(node: _Compiled) -> _Compiled:
    """A number used as a condition means `!= 0`, and is False when not finite."""
    if node.is_bool:
        return node
    fn = node.fn
    if node.always_finite:
        return _Compiled(lambda c: fn(c) != 0, is_bool=True, always_finite=True)

    def truthy(c: FloatArray) -> NDArray[Any]:
        v = fn(c)
        result: NDArray[Any] = (v != 0) & np.isfinite(v)
        return result

    return _Compiled(truthy, is_bool=True, always_finite=True)


def _binop(op: Callable[[Any, Any], Any], left: _Node, right: _Node) -> _Node:
    def fn(c: FloatArray) -> NDArray[Any]:
        result: NDArray[Any] = op(left(c), right(c))
        return result

    return fn


def _compare(operands: list[_Compiled], ops: list[Callable[[Any, Any], Any]]) -> _Node:
    fns = [o.fn for o in operands]
    check = [not o.always_finite for o in operands]

    def fn(c: FloatArray) -> NDArray[Any]:
        # Evaluate every operand once, as Python evaluates each middle operand of a chain once.
        values = [f(c) for f in fns]
        result: NDArray[Any] = ops[0](values[0], values[1])
        for k in range(1, len(ops)):
            result = result & ops[k](values[k], values[k + 1])
        for v, needs_check in zip(values, check, strict=True):
            if needs_check:
                result = result & np.isfinite(v)
        return result

    return fn


def _reduce(parts: list[_Node], combine: Callable[[Any, Any], Any]) -> _Node:
    def fn(c: FloatArray) -> NDArray[Any]:
        result: NDArray[Any] = parts[0](c)
        for part in parts[1:]:
            result = combine(result, part(c))
        return result

    return fn


# --- batches ----------------------------------------------------------------------------------


def _check_batch(features: FloatArray, d: int) -> FloatArray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != d:
        raise ValueError(f"features must have shape (n, {d}), got {array.shape}")
    return array


def _columns(features: FloatArray) -> FloatArray:
    return np.ascontiguousarray(np.asarray(features, dtype=np.float64).T)


def _as_row_mask(result: NDArray[Any], n: int) -> BoolArray:
    out = np.empty(n, dtype=np.bool_)
    out[...] = result  # broadcasts the 0-d result of a constant expression
    return out
