"""Rules as data: the whitelist refuses anything but arithmetic over features, batches evaluate
exactly like a scalar reference, and a broken file never replaces working rules."""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import RulesFileError
from shared.scoring.features import FEATURE_NAMES
from shared.scoring.reloading import ReloadStatus
from shared.scoring.rules import (
    ReloadingRules,
    RuleAction,
    RuleMode,
    RulesError,
    load_rules,
    parse_rules,
)

# The service's own feature names: the default rules file must parse against exactly these.
FEATURES = FEATURE_NAMES
DEFAULT_RULES = Path(__file__).resolve().parents[2] / "rules" / "default.toml"


def batch(*rows: dict[str, float]) -> np.ndarray:
    """Feature rows given by name; unnamed features are 0."""
    out = np.zeros((len(rows), len(FEATURES)))
    for i, row in enumerate(rows):
        for name, value in row.items():
            out[i, FEATURES.index(name)] = value
    return out


def one_rule(expression: str, name: str = "r", **fields: object) -> str:
    values: dict[str, object] = {
        "name": name,
        "expression": expression,
        "action": "review",
        "reason_code": "TEST",
        "reason_text": "test rule",
        "mode": "active",
        **fields,
    }
    body = "\n".join(f"{k} = {_toml(v)}" for k, v in values.items())
    return f'version = "t1"\n\n[[rule]]\n{body}\n'


def _toml(value: object) -> str:
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def evaluate(expression: str, features: np.ndarray) -> list[bool]:
    rules = parse_rules(one_rule(expression), FEATURES)
    result: list[bool] = rules.evaluate(features).matrix[0].tolist()
    return result


# --- the whitelist ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "construct", "column"),
    [
        ("__import__('os')", "calls are not allowed", 1),
        ("amount.real > 1", "attribute access is not allowed", 1),
        ("count_1m > 1 and abs(amount) > 5", "calls are not allowed", 18),
        ("features[0] > 1", "subscripts are not allowed", 1),
        ('"x" == "x"', "string constants are not allowed", 1),
        ("amount > 1 and (lambda: 1)", "lambdas are not allowed", 17),
        ("amunt > 1", "unknown feature 'amunt' (did you mean 'amount'?)", 1),
        ("os > 1", "unknown feature 'os'", 1),
        ("(x := 1)", "assignment expressions (:=) are not allowed", 2),
        ("amount ** 2 > 1", "the ** operator is not allowed", 8),
        ("amount // 2 > 1", "the // operator is not allowed", 8),
        ("amount > 1 & count_1m > 2", "the & operator is not allowed (use 'and')", 12),
        ("amount in 1", "'in' comparisons are not allowed", 8),
        ("amount is 1", "'is' comparisons are not allowed", 8),
        ("[x for x in amount]", "comprehensions are not allowed", 1),
        ("amount if is_night else 0", "conditional expressions", 1),
        ("amount > None", "the constant None is not allowed", 10),
        ("amount > 1e999", "numbers must be finite", 10),
        ("is_night > (amount, 1)", "tuples are not allowed", 12),
        ("f'{amount}'", "f-strings are not allowed", 1),
        ("amount > 1) or (count_1m > 1", "unbalanced ')'", 11),
        ("amount > > 1", "syntax error", 10),
    ],
)
def test_refused_expressions_name_rule_construct_and_column(
    expression: str, construct: str, column: int
) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(one_rule(expression, name="sneaky"), FEATURES, source="rules.toml")
    message = str(caught.value)
    assert message.startswith("rules.toml: rule 'sneaky': ")
    assert construct in message
    assert f"at column {column}" in message
    assert caught.value.rule == "sneaky"
    assert caught.value.column == column
    assert isinstance(caught.value, RulesFileError)


def test_position_in_a_multi_line_expression() -> None:
    text = (
        'version = "t1"\n[[rule]]\nname = "multi"\nexpression = """\n'
        "  amount > 100 and\n  abs(count_1m) > 3\n"
        '"""\naction = "review"\nreason_code = "X"\nreason_text = "x"\nmode = "active"\n'
    )
    with pytest.raises(RulesError, match=r"rule 'multi': calls are not allowed at line 2, col"):
        parse_rules(text, FEATURES)


def test_syntax_error_at_the_end_of_an_expression() -> None:
    with pytest.raises(RulesError, match=r"rule 'r': syntax error: .* at end of expression"):
        parse_rules(one_rule("amount >"), FEATURES)


def test_very_deep_nesting_is_refused_not_crashing() -> None:
    with pytest.raises(RulesError, match="rule 'r'"):
        parse_rules(one_rule("not " * 200 + "amount"), FEATURES)


# --- evaluation -------------------------------------------------------------------------------


def test_expressions_evaluate_over_a_whole_batch() -> None:
    features = batch(
        {"amount": 3, "count_1m": 6},
        {"amount": 3, "count_1m": 4},
        {"amount": 50, "count_1m": 9},
        {"amount": 0, "count_1m": 0},
    )
    assert evaluate("count_1m >= 5 and amount < 5", features) == [True, False, False, False]
    assert evaluate("count_1m >= 5 or amount == 0", features) == [True, False, True, True]
    assert evaluate("not count_1m >= 5", features) == [False, True, False, True]
    assert evaluate("1 < amount <= 3 < count_1m", features) == [True, True, False, False]
    assert evaluate("amount", features) == [True, True, True, False]  # a number means != 0
    assert evaluate("amount - 3", features) == [False, False, True, True]
    assert evaluate("-amount < -10", features) == [False, False, True, False]
    assert evaluate("amount % 2 == 1", features) == [True, True, False, False]
    assert evaluate("(amount > 1) + (count_1m > 5) == 2", features) == [True, False, True, False]
    assert evaluate("True", features) == [True] * 4
    assert evaluate("False or 0", features) == [False] * 4
    assert evaluate("amount * 2 + count_1m / 2 > 8", features) == [True, False, True, False]


def test_division_by_zero_neither_raises_nor_warns_and_compares_false() -> None:
    # pytest runs with filterwarnings=error: a numpy RuntimeWarning would fail this test.
    features = batch(
        {"amount": 10, "count_1m": 0}, {"amount": 0, "count_1m": 0}, {"amount": 10, "count_1m": 2}
    )
    assert evaluate("amount / count_1m > 1", features) == [False, False, True]  # inf, nan, 5
    assert evaluate("amount / count_1m <= 1", features) == [False, False, False]
    assert evaluate("amount / count_1m != 1", features) == [False, False, True]
    assert evaluate("not amount / count_1m > 1", features) == [True, True, False]
    assert evaluate("amount % count_1m == 0", features) == [False, False, True]
    assert evaluate("amount / count_1m", features) == [False, False, True]  # truthiness


def test_non_finite_features_make_comparisons_false() -> None:
    features = batch({"amount": 1.0}, {"amount": 1.0})
    features[0, 0] = np.nan
    features[1, 0] = np.inf
    assert evaluate("amount > 0", features) == [False, False]
    assert evaluate("amount != 5", features) == [False, False]


def test_empty_batch_and_empty_rule_set() -> None:
    rules = parse_rules(one_rule("amount > 1"), FEATURES)
    assert rules.evaluate(np.zeros((0, len(FEATURES)))).matrix.shape == (1, 0)
    empty = parse_rules('version = "none"\n', FEATURES)
    assert empty.rules == ()
    assert empty.evaluate(batch({}, {})).matrix.shape == (0, 2)


def test_batch_of_the_wrong_width_is_a_value_error() -> None:
    rules = parse_rules(one_rule("amount > 1"), FEATURES)
    with pytest.raises(ValueError, match=r"shape \(n, 29\)"):
        rules.evaluate(np.zeros((2, 3)))


def test_hits_by_rule_name_and_single_rule_evaluation() -> None:
    text = one_rule("amount > 5", name="a") + one_rule("amount > 50", name="b").split("\n", 2)[2]
    rules = parse_rules(text, FEATURES)
    features = batch({"amount": 10}, {"amount": 100})
    hits = rules.evaluate(features)
    assert hits.matrix.shape == (2, 2)
    assert hits.of("a").tolist() == [True, True]
    assert hits.of("b").tolist() == [False, True]
    assert rules.rules[1].evaluate(features).tolist() == [False, True]
    with pytest.raises(KeyError):
        hits.of("missing")


# --- property: the batch evaluator agrees with a scalar reference -----------------------------

PROPERTY_FEATURES = ("amount", "count_1m", "terminal_risk_7d")
VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, -3.0, 7.25, 1000.0, 1e-3])


def _numbers() -> st.SearchStrategy[str]:
    leaves = st.sampled_from([*PROPERTY_FEATURES, "0", "1", "2.5", "-3", "True"])
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "%"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            ),
            inner.map(lambda e: f"(-{e})"),
            inner.map(lambda e: f"(+{e})"),
        ),
        max_leaves=6,
    )


def _conditions() -> st.SearchStrategy[str]:
    comparison = st.tuples(
        _numbers(),
        st.lists(
            st.tuples(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), _numbers()),
            min_size=1,
            max_size=2,
        ),
    ).map(lambda t: "(" + t[0] + "".join(f" {op} {rhs}" for op, rhs in t[1]) + ")")
    base = st.one_of(comparison, _numbers())
    return st.recursive(
        base,
        lambda inner: st.one_of(
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + " and ".join(xs) + ")"),
            st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + " or ".join(xs) + ")"),
            inner.map(lambda e: f"(not {e})"),
        ),
        max_leaves=4,
    )


def _reference(expression: str, row: dict[str, float]) -> bool:
    """Scalar evaluation of the documented semantics, by walking the AST (never eval)."""

    def num(node: ast.expr) -> float:
        value = walk(node)
        return float(value)

    def truthy(value: float | bool) -> bool:
        if isinstance(value, bool):
            return value
        return value != 0 and math.isfinite(value)

    def divide(a: float, b: float) -> float:
        if b == 0:
            if a == 0 or math.isnan(a):
                return math.nan
            return math.copysign(math.inf, a) * math.copysign(1.0, b)
        return a / b

    def modulo(a: float, b: float) -> float:
        return math.nan if b == 0 else a % b

    binops: dict[type[ast.operator], Callable[[float, float], float]] = {
        ast.Add: lambda a, b: a + b,
        ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b,
        ast.Div: divide,
        ast.Mod: modulo,
    }
    cmps: dict[type[ast.cmpop], Callable[[float, float], bool]] = {
        ast.Lt: lambda a, b: a < b,
        ast.LtE: lambda a, b: a <= b,
        ast.Gt: lambda a, b: a > b,
        ast.GtE: lambda a, b: a >= b,
        ast.Eq: lambda a, b: a == b,
        ast.NotEq: lambda a, b: a != b,
    }

    def walk(node: ast.expr) -> float | bool:
        if isinstance(node, ast.BoolOp):
            parts = [truthy(walk(v)) for v in node.values]
            return all(parts) if isinstance(node.op, ast.And) else any(parts)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return not truthy(walk(node.operand))
            return -num(node.operand) if isinstance(node.op, ast.USub) else num(node.operand)
        if isinstance(node, ast.BinOp):
            return binops[type(node.op)](num(node.left), num(node.right))
        if isinstance(node, ast.Compare):
            values = [num(v) for v in [node.left, *node.comparators]]
            if not all(math.isfinite(v) for v in values):
                return False
            return all(cmps[type(op)](values[i], values[i + 1]) for i, op in enumerate(node.ops))
        if isinstance(node, ast.Constant):
            assert isinstance(node.value, int | float)
            return node.value if isinstance(node.value, bool) else float(node.value)
        if isinstance(node, ast.Name):
            return row[node.id]
        raise AssertionError(f"unexpected node {ast.dump(node)}")

    return truthy(walk(ast.parse(expression, mode="eval").body))


@settings(max_examples=300, deadline=None)
@given(
    expression=_conditions(),
    rows=st.lists(st.tuples(VALUES, VALUES, VALUES), min_size=1, max_size=6),
)
def test_batch_evaluation_matches_scalar_reference(
    expression: str, rows: list[tuple[float, float, float]]
) -> None:
    dicts = [dict(zip(PROPERTY_FEATURES, r, strict=True)) for r in rows]
    expected = [_reference(expression, d) for d in dicts]
    assert evaluate(expression, batch(*dicts)) == expected, expression


# --- the file ---------------------------------------------------------------------------------

VALID = one_rule("amount > 100", name="big")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("version = \n", "not valid TOML: "),
        ('version = "1"\n[[rule]]\nname = "x"\nname = "y"\n', "not valid TOML: "),
        ('version = "1"\nrules = []\n', "unknown top-level key(s) ['rules']"),
        ("[[rule]]\n", "'version' must be a non-empty string"),
        ('version = "1"\nrule = 3\n', "'rule' must be an array of tables"),
        (VALID + VALID.split("\n", 2)[2], "rule 'big': duplicate rule name (rule #2)"),
        (one_rule("amount > 1", action="block"), "unknown action 'block'"),
        (one_rule("amount > 1", mode="dry_run"), "unknown mode 'dry_run'"),
        (one_rule("amount > 1", colour="red"), "unknown key(s) ['colour']"),
        (one_rule("amount > 1", reason_code="lower"), "UPPER_SNAKE_CASE"),
        (one_rule("amount > 1", name=""), "'name' must be a non-empty string"),
        (one_rule("amount > 1", action="score_floor"), "needs a 'score_floor'"),
        (one_rule("amount > 1", action="score_floor", score_floor=1.5), "outside [0, 1]"),
        (one_rule("amount > 1", action="score_floor", score_floor=True), "must be a number"),
        (one_rule("amount > 1", score_floor=0.5), "only allowed with action 'score_floor'"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(text: str, fragment: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text, FEATURES, source="bad.toml")
    assert str(caught.value).startswith("bad.toml: ")
    assert fragment in str(caught.value)


def test_toml_syntax_error_keeps_tomllib_position() -> None:
    with pytest.raises(RulesError, match=r"line 2"):
        parse_rules('version = "1"\n[[rule]\n', FEATURES)


def test_missing_fields_are_named() -> None:
    text = 'version = "1"\n[[rule]]\nname = "half"\nexpression = "amount > 1"\n'
    with pytest.raises(RulesError, match=r"rule 'half': missing required field\(s\) \['action'"):
        parse_rules(text, FEATURES)


def test_rules_parse_into_typed_fields() -> None:
    text = one_rule("amount > 1", action="score_floor", score_floor=0.7, mode="shadow")
    (rule,) = parse_rules(text, FEATURES).rules
    assert rule.action is RuleAction.SCORE_FLOOR
    assert rule.score_floor == 0.7
    assert rule.mode is RuleMode.SHADOW
    assert rule.reason_code == "TEST"


def test_default_rules_file_loads_and_fires_as_intended() -> None:
    rules = load_rules(DEFAULT_RULES, FEATURES)
    assert rules.version
    assert 5 <= len(rules.rules) <= 8
    assert any(r.mode is RuleMode.SHADOW for r in rules.rules)
    assert {r.action for r in rules.rules} == set(RuleAction)
    features = batch(
        {"amount": 2, "count_1m": 6},
        {"amount": 40, "travel_speed_kmh": 5000},
        {"amount": 900, "amount_ratio_30d": 15},
        {"amount": 40, "distinct_countries_24h": 4},
        {"amount": 40, "terminal_risk_7d": 0.6},
        {"amount": 25000, "amount_ratio_30d": 1},
        {"amount": 40, "distinct_devices_24h": 4, "first_time_merchant": 1},
        {"amount": 40, "count_1m": 1, "count_1h": 2, "terminal_risk_7d": 0.1},
    )
    fired = rules.evaluate(features).matrix.T
    names = [r.name for r in rules.rules]
    assert [[names[j] for j in np.flatnonzero(row)] for row in fired] == [
        ["card_testing_burst"],
        ["impossible_travel"],
        ["amount_spike"],
        ["many_countries_24h"],
        ["compromised_terminal"],
        ["extreme_amount"],
        ["device_hopping"],
        [],
    ]


def test_unreadable_file_is_a_rules_error(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read rules file"):
        load_rules(tmp_path / "absent.toml", FEATURES)


# --- hot reload -------------------------------------------------------------------------------


def _write(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(mtime_ns, mtime_ns))  # a distinct mtime even on coarse filesystems


def test_reload_swaps_good_files_and_keeps_old_rules_on_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    t0 = 1_700_000_000_000_000_000
    _write(path, one_rule("amount > 100").replace('"t1"', '"v1"'), t0)
    reloading = ReloadingRules(path, FEATURES)
    assert reloading.rules.version == "v1"
    assert reloading.maybe_reload().status is ReloadStatus.UNCHANGED

    _write(path, 'version = "v2"\n[[rule]\n', t0 + 10**9)  # broken TOML
    result = reloading.maybe_reload()
    assert result.status is ReloadStatus.FAILED
    assert isinstance(result.error, RulesError)
    assert "not valid TOML" in str(result.error)
    assert result.version == "v1"
    assert reloading.rules.version == "v1"
    assert reloading.failed_reloads == 1
    assert reloading.last_error is result.error
    # The same broken file is reported once, not on every call.
    assert reloading.maybe_reload().status is ReloadStatus.UNCHANGED
    assert reloading.failed_reloads == 1

    _write(path, one_rule("abs(amount) > 1").replace('"t1"', '"v2"'), t0 + 2 * 10**9)
    assert reloading.maybe_reload().status is ReloadStatus.FAILED
    assert reloading.failed_reloads == 2
    assert reloading.rules.version == "v1"

    _write(path, one_rule("amount > 5").replace('"t1"', '"v3"'), t0 + 3 * 10**9)
    result = reloading.maybe_reload()
    assert result.status is ReloadStatus.RELOADED
    assert result.version == "v3"
    assert reloading.rules.evaluate(batch({"amount": 10})).matrix.tolist() == [[True]]
    assert reloading.reloads == 1
    assert reloading.last_error is None

    path.unlink()
    result = reloading.maybe_reload()
    assert result.status is ReloadStatus.FAILED
    assert "cannot read rules file" in str(result.error)
    assert reloading.rules.version == "v3"
    assert reloading.failed_reloads == 3
    assert reloading.maybe_reload().status is ReloadStatus.UNCHANGED

    _write(path, one_rule("amount > 5").replace('"t1"', '"v4"'), t0 + 4 * 10**9)
    assert reloading.maybe_reload().status is ReloadStatus.RELOADED
    assert reloading.rules.version == "v4"


def test_first_load_failure_raises(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(one_rule("amount.real"), encoding="utf-8")
    with pytest.raises(RulesError, match="attribute access"):
        ReloadingRules(path, FEATURES)
