"""The numpy model: artifacts round-trip exactly, mismatched features are refused, training
recovers a known signal, and the ranking metrics agree with hand computation."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ModelFileError
from shared.scoring.metrics import average_precision, log_loss, roc_auc
from shared.scoring.model import (
    MODEL_FORMAT,
    ModelArtifact,
    ModelError,
    ReloadingModel,
    TrainingError,
    contributions,
    decision_function,
    fit_logistic_regression,
    load_model,
    predict_proba,
    save_model,
    sigmoid,
)
from shared.scoring.reloading import ReloadStatus

NAMES = ("amount", "count_1m", "terminal_risk_7d")


def artifact(version: str = "m1", names: tuple[str, ...] = NAMES) -> ModelArtifact:
    d = len(names)
    return ModelArtifact(
        version=version,
        feature_names=names,
        mean=np.linspace(1.0, 2.0, d),
        scale=np.linspace(0.5, 3.0, d),
        weights=np.array([0.1 * (i + 1) * (-1) ** i for i in range(d)]) / 3,
        bias=-2.25,
        trained_at="2026-11-25T10:00:00+00:00",
        training_metrics={"auc_roc": 0.9, "n_samples": 1000.0},
        metadata={"source": "unit test", "params": {"l2": 0.001}},
    )


# --- scoring ----------------------------------------------------------------------------------


def test_predict_proba_is_the_sigmoid_of_standardised_log_odds() -> None:
    m = artifact()
    X = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    z = ((X - m.mean) / m.scale) @ m.weights + m.bias
    np.testing.assert_allclose(decision_function(m, X), z)
    np.testing.assert_allclose(predict_proba(m, X), 1 / (1 + np.exp(-z)))
    # Contributions are the per-feature log-odds terms: they add up to the log-odds.
    c = contributions(m, X)
    assert c.shape == (2, 3)
    np.testing.assert_allclose(c.sum(axis=1) + m.bias, z)
    np.testing.assert_allclose(c[0], m.weights * (X[0] - m.mean) / m.scale)


def test_sigmoid_is_stable_at_extreme_log_odds() -> None:
    # filterwarnings=error: an overflow in exp would fail the test.
    p = sigmoid(np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0]))
    assert p[0] == 0.0
    assert p[2] == 0.5
    assert p[4] == 1.0
    assert 0 < p[1] < 1e-17
    assert 1 - 1e-15 < p[3] <= 1


def test_wrong_width_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        predict_proba(artifact(), np.zeros((2, 4)))


def test_artifact_validates_itself() -> None:
    with pytest.raises(ValueError, match="weights has shape"):
        ModelArtifact("v", NAMES, np.zeros(3), np.ones(3), np.zeros(2), 0.0, "2026-01-01")
    with pytest.raises(ValueError, match="scale must be positive"):
        ModelArtifact("v", NAMES, np.zeros(3), np.zeros(3), np.zeros(3), 0.0, "2026-01-01")
    with pytest.raises(ValueError, match="duplicate feature names"):
        ModelArtifact("v", ("a", "a"), np.zeros(2), np.ones(2), np.zeros(2), 0.0, "2026-01-01")
    with pytest.raises(ValueError, match="not an ISO 8601"):
        ModelArtifact("v", NAMES, np.zeros(3), np.ones(3), np.zeros(3), 0.0, "yesterday")
    m = artifact()
    with pytest.raises(ValueError, match="read-only"):
        m.weights[0] = 5.0


# --- files ------------------------------------------------------------------------------------


def test_save_and_load_round_trip_exactly(tmp_path: Path) -> None:
    m = artifact()
    path = tmp_path / "model.json"
    save_model(m, path)
    loaded = load_model(path, NAMES)
    assert loaded.version == m.version
    assert loaded.feature_names == NAMES
    for key in ("mean", "scale", "weights"):
        assert np.array_equal(getattr(loaded, key), getattr(m, key))
    assert loaded.bias == m.bias
    assert loaded.trained_at == m.trained_at
    assert loaded.training_metrics == m.training_metrics
    assert loaded.metadata == m.metadata
    doc = json.loads(path.read_text())
    assert doc["format"] == MODEL_FORMAT
    assert doc["feature_names"] == list(NAMES)
    assert os.listdir(tmp_path) == ["model.json"]  # the temp file was renamed, not left over


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    save_model(artifact("m1"), path)
    save_model(artifact("m2"), path)
    assert load_model(path, NAMES).version == "m2"
    assert os.listdir(tmp_path) == ["model.json"]


@pytest.mark.parametrize(
    ("expected", "fragments"),
    [
        (("amount", "count_1m"), ["extra ['terminal_risk_7d']"]),
        ((*NAMES, "travel_speed_kmh"), ["missing ['travel_speed_kmh']"]),
        (
            ("amount", "count_1h", "terminal_risk_7d"),
            ["missing ['count_1h']", "extra ['count_1m']"],
        ),
        (
            ("count_1m", "amount", "terminal_risk_7d"),
            ["reordered: position 0 is 'amount' in the model but 'count_1m'"],
        ),
    ],
)
def test_feature_mismatch_is_refused_naming_the_features(
    tmp_path: Path, expected: tuple[str, ...], fragments: list[str]
) -> None:
    path = tmp_path / "model.json"
    save_model(artifact(), path)
    with pytest.raises(ModelError) as caught:
        load_model(path, expected)
    message = str(caught.value)
    assert message.startswith(f"{path}: model features do not match the scoring features: ")
    for fragment in fragments:
        assert fragment in message
    assert caught.value.path == str(path)
    assert isinstance(caught.value, ModelFileError)


def _corrupt(tmp_path: Path, change: dict[str, object] | None = None, text: str = "") -> Path:
    path = tmp_path / "model.json"
    save_model(artifact(), path)
    if change is not None:
        doc = json.loads(path.read_text())
        doc.update(change)
        text = json.dumps(doc)
    if text:
        path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "text", "fragment"),
    [
        ({"format": "sklearn.pickle"}, "", "format is 'sklearn.pickle'"),
        ({"weights": [1.0, 2.0]}, "", "weights has shape (2,), expected (3,)"),
        ({"mean": [1.0, True, 2.0]}, "", "mean must be a list of numbers"),
        ({"scale": [1.0, 0.0, 1.0]}, "", "scale must be positive"),
        ({"bias": "0.5"}, "", "bias must be a number"),
        ({"extra": 1}, "", "unknown field(s) ['extra']"),
        ({"trained_at": "soon"}, "", "not an ISO 8601"),
        ({"training_metrics": {"auc": "high"}}, "", "training metric 'auc'"),
        (None, "{not json", "not valid JSON: "),
        (None, "[1, 2]", "must be a JSON object"),
        (None, '{"format": "fraudstream.logreg.v1", "bias": NaN}', "non-finite number NaN"),
    ],
)
def test_bad_artifacts_are_refused(
    tmp_path: Path, change: dict[str, object] | None, text: str, fragment: str
) -> None:
    path = _corrupt(tmp_path, change, text)
    with pytest.raises(ModelError) as caught:
        load_model(path, NAMES)
    assert str(caught.value).startswith(f"{path}: ")
    assert fragment in str(caught.value)


def test_overflowing_numbers_are_refused(tmp_path: Path) -> None:
    path = _corrupt(tmp_path)
    path.write_text(path.read_text().replace('"bias": -2.25', '"bias": 1e999'))
    with pytest.raises(ModelError, match="bias must be finite"):
        load_model(path, NAMES)


def test_missing_fields_and_files_are_refused(tmp_path: Path) -> None:
    path = _corrupt(tmp_path, text=json.dumps({"format": MODEL_FORMAT, "version": "x"}))
    with pytest.raises(ModelError, match=r"missing field\(s\) \['trained_at'"):
        load_model(path, NAMES)
    with pytest.raises(ModelError, match="cannot read model file"):
        load_model(tmp_path / "absent.json", NAMES)


def test_reloading_model_keeps_the_old_model_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    save_model(artifact("m1"), path)
    reloading = ReloadingModel(path, NAMES)
    assert reloading.model.version == "m1"
    assert reloading.maybe_reload().status is ReloadStatus.UNCHANGED

    save_model(artifact("m2", names=("amount", "count_1m")), path)  # wrong features
    result = reloading.maybe_reload()
    assert result.status is ReloadStatus.FAILED
    assert "extra ['terminal_risk_7d']" not in str(result.error)
    assert "missing ['terminal_risk_7d']" in str(result.error)
    assert reloading.model.version == "m1"
    assert reloading.failed_reloads == 1
    assert reloading.maybe_reload().status is ReloadStatus.UNCHANGED
    assert reloading.failed_reloads == 1

    save_model(artifact("m3"), path)
    result = reloading.maybe_reload()
    assert result.status is ReloadStatus.RELOADED
    assert result.version == "m3"
    assert reloading.model.version == "m3"

    path.unlink()
    assert reloading.maybe_reload().status is ReloadStatus.FAILED
    assert reloading.model.version == "m3"
    assert reloading.failed_reloads == 2


# --- training ---------------------------------------------------------------------------------


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fraud log-odds rise with amount (in hundreds) and terminal risk; count_1m is noise."""
    rng = np.random.default_rng(seed)
    X = np.column_stack(
        [rng.gamma(2.0, 50.0, n), rng.poisson(1.0, n).astype(float), rng.uniform(0, 1, n)]
    )
    z = -10.0 + 4.0 * X[:, 0] / 100.0 + 10.0 * X[:, 2]
    y = rng.uniform(0, 1, n) < 1.0 / (1.0 + np.exp(-z))
    return X, y


def test_fit_recovers_a_known_signal() -> None:
    X, y = _synthetic(20_000, seed=7)
    m = fit_logistic_regression(
        X, y, NAMES, version="synthetic", trained_at="2026-11-25T00:00:00+00:00"
    )
    X_test, y_test = _synthetic(5_000, seed=8)
    assert roc_auc(y_test, predict_proba(m, X_test)) > 0.9
    # Back in original units the weights are close to the generating ones.
    per_unit = m.weights / m.scale
    assert per_unit[0] == pytest.approx(0.04, rel=0.15)
    assert abs(per_unit[1]) < 0.1
    assert per_unit[2] == pytest.approx(10.0, rel=0.15)
    metrics = m.training_metrics
    assert metrics["n_samples"] == 20_000
    assert metrics["n_positive"] == float(y.sum())
    assert metrics["auc_roc"] > 0.9
    assert 0 < metrics["average_precision"] <= 1
    assert metrics["log_loss"] < math.log(2)
    assert metrics["converged"] == 1.0
    assert m.trained_at == "2026-11-25T00:00:00+00:00"


def test_fit_handles_separable_data_and_constant_features() -> None:
    rng = np.random.default_rng(3)
    X = np.column_stack(
        [np.r_[rng.uniform(-5, -1, 200), rng.uniform(1, 5, 200)], np.full(400, 5.0)]
    )
    y = np.r_[np.zeros(200), np.ones(200)]
    m = fit_logistic_regression(X, y, ("a", "b"), version="sep")
    assert m.scale[1] == 1.0  # constant feature: std 0 replaced by 1
    assert m.weights[1] == 0.0
    assert m.training_metrics["auc_roc"] == 1.0
    assert np.all(np.isfinite(m.weights))


def test_balanced_class_weight_raises_probabilities_of_rare_positives() -> None:
    X, y = _synthetic(10_000, seed=11)
    plain = fit_logistic_regression(X, y, NAMES, version="p")
    balanced = fit_logistic_regression(X, y, NAMES, version="b", class_weight="balanced")
    assert predict_proba(balanced, X).mean() > predict_proba(plain, X).mean()
    assert balanced.metadata["training_params"] == {
        "l2": 1e-3,
        "class_weight": "balanced",
        "max_iter": 50,
        "tol": 1e-10,
    }


def test_fit_refuses_a_single_class() -> None:
    X = np.ones((10, 3))
    with pytest.raises(TrainingError, match="only negative labels") as caught:
        fit_logistic_regression(X, np.zeros(10), NAMES, version="x")
    assert isinstance(caught.value, ValueError)
    with pytest.raises(TrainingError, match="only positive labels"):
        fit_logistic_regression(X, np.ones(10), NAMES, version="x")


def test_fit_refuses_bad_inputs() -> None:
    X = np.ones((4, 3))
    y = np.array([0, 1, 0, 1])
    with pytest.raises(TrainingError, match=r"shape \(n, 3\)"):
        fit_logistic_regression(np.ones((4, 2)), y, NAMES, version="x")
    with pytest.raises(TrainingError, match="only 0 and 1"):
        fit_logistic_regression(X, np.array([0, 2, 0, 1]), NAMES, version="x")
    X[1, 2] = np.nan
    with pytest.raises(TrainingError, match=r"non-finite values in feature\(s\) \['terminal_risk"):
        fit_logistic_regression(X, y, NAMES, version="x")


def test_a_trained_model_saves_and_loads(tmp_path: Path) -> None:
    X, y = _synthetic(2_000, seed=5)
    m = fit_logistic_regression(X, y, NAMES, version="rt", metadata={"data": "synthetic"})
    save_model(m, tmp_path / "m.json")
    loaded = load_model(tmp_path / "m.json", NAMES)
    assert np.array_equal(predict_proba(loaded, X), predict_proba(m, X))
    assert loaded.metadata["data"] == "synthetic"


# --- metrics ----------------------------------------------------------------------------------


def test_roc_auc_hand_computed() -> None:
    # Pairs (pos, neg): 0.35 beats 0.1, loses to 0.4; 0.8 beats both -> 3 of 4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.2, 0.9]) == 0.0
    # Ties count one half: 0.9 beats both negatives (2), tied 0.5 vs two 0.5 negatives (1).
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.9]) == 0.75
    assert roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_average_precision_hand_computed() -> None:
    # Descending: 0.8 (+) P=1 R=.5; 0.4 (-); 0.35 (+) P=2/3 R=1; AP = .5*1 + .5*2/3.
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6)
    # A tied group is one threshold: 0.9 (+) P=1 R=.5; {0.5 x3} P=2/4 R=1 -> .5 + .25.
    assert average_precision([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.9]) == pytest.approx(0.75)
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == 1.0
    assert average_precision([0, 0, 1], [0.9, 0.8, 0.1]) == pytest.approx(1 / 3)


def test_log_loss_hand_computed() -> None:
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))
    assert log_loss([1, 0], [0.8, 0.1]) == pytest.approx(-(math.log(0.8) + math.log(0.9)) / 2)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))  # clipped, not inf


def test_metrics_refuse_undefined_cases() -> None:
    with pytest.raises(ValueError, match="needs both frauds and genuine"):
        roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least one fraud"):
        average_precision([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="only 0/1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"shape \(3,\) but y_true has \(2,\)"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="only 0 and 1"):
        log_loss([0, 2], [0.1, 0.2])
