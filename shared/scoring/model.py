"""The fraud model: logistic regression in numpy, stored as one readable JSON artifact.

An artifact holds everything scoring needs and nothing else: the feature names in order, the
standardisation (mean, scale), the weights and bias in standardised space, a version, when it
was trained and its training metrics. The file is JSON with one number per line, so two
versions diff cleanly in review::

    {"format": "fraudstream.logreg.v1", "version": "...", "trained_at": "...",
     "feature_names": [...], "mean": [...], "scale": [...], "weights": [...], "bias": 0.1,
     "training_metrics": {...}, "metadata": {...}}

`load_model` refuses an artifact whose feature names differ in any way (missing, extra,
reordered) from the features the service computes: a model silently reading the wrong columns
is the worst failure a scorer can have.

Errors::

    ModelFileError (shared.errors)
    └── ModelError       an artifact file that cannot be used; names the file and the problem
    TrainingError        (also a ValueError) training data that cannot make a model
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

from shared.errors import FraudstreamError, ModelFileError
from shared.scoring.metrics import average_precision, log_loss, roc_auc
from shared.scoring.reloading import ReloadingFile, ReloadResult

__all__ = [
    "MODEL_FORMAT",
    "JSONValue",
    "ModelArtifact",
    "ModelError",
    "ReloadResult",
    "ReloadingModel",
    "TrainingError",
    "artifact_to_json",
    "contributions",
    "decision_function",
    "fit_logistic_regression",
    "load_model",
    "predict_proba",
    "save_model",
    "sigmoid",
]

MODEL_FORMAT = "fraudstream.logreg.v1"

JSONValue: TypeAlias = str | int | float | bool | list["JSONValue"] | dict[str, "JSONValue"] | None
FloatArray = NDArray[np.float64]

_KEYS = (
    "format",
    "version",
    "trained_at",
    "feature_names",
    "mean",
    "scale",
    "weights",
    "bias",
    "training_metrics",
    "metadata",
)


class ModelError(ModelFileError):
    """A model artifact was rejected; `path` is the file."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class TrainingError(FraudstreamError, ValueError):
    """The training data cannot make a model (one class only, wrong shapes, non-finite)."""


@dataclass(frozen=True, eq=False)
class ModelArtifact:
    """A trained model. Arrays are float64, read-only, one entry per feature.

    Construction validates shapes and finiteness (ValueError); `load_model` turns that into a
    `ModelError` naming the file.
    """

    version: str
    feature_names: tuple[str, ...]
    mean: FloatArray
    scale: FloatArray  # standard deviation, zeros replaced by 1 (constant features)
    weights: FloatArray  # in standardised space: one unit = one standard deviation
    bias: float
    trained_at: str  # ISO 8601
    training_metrics: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, JSONValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.version, str) or not self.version.strip():
            raise ValueError("version must be a non-empty string")
        names = tuple(self.feature_names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError("feature_names must be non-empty strings")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate feature names {duplicates}")
        object.__setattr__(self, "feature_names", names)
        for key in ("mean", "scale", "weights"):
            array = np.array(getattr(self, key), dtype=np.float64)  # a private copy
            if array.shape != (len(names),):
                raise ValueError(
                    f"{key} has shape {array.shape}, expected ({len(names)},) like feature_names"
                )
            if not np.all(np.isfinite(array)):
                raise ValueError(f"{key} contains non-finite numbers")
            array.setflags(write=False)
            object.__setattr__(self, key, array)
        if np.any(self.scale <= 0):
            raise ValueError("scale must be positive")
        bias = float(self.bias)
        if not math.isfinite(bias):
            raise ValueError("bias must be finite")
        object.__setattr__(self, "bias", bias)
        try:
            datetime.fromisoformat(self.trained_at)
        except (TypeError, ValueError):
            raise ValueError(f"trained_at {self.trained_at!r} is not an ISO 8601 time") from None
        metrics: dict[str, float] = {}
        for k, v in dict(self.training_metrics).items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"training metric {k!r} must be a finite number, got {v!r}")
            metrics[str(k)] = float(v)
        object.__setattr__(self, "training_metrics", metrics)
        object.__setattr__(self, "metadata", dict(self.metadata))


# --- scoring ----------------------------------------------------------------------------------


def sigmoid(z: ArrayLike) -> FloatArray:
    """1 / (1 + exp(-z)) without overflow: exp is only ever taken of -|z|."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    result: FloatArray = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return result


def _standardised(artifact: ModelArtifact, X: ArrayLike) -> FloatArray:
    array = np.asarray(X, dtype=np.float64)
    d = len(artifact.feature_names)
    if array.ndim != 2 or array.shape[1] != d:
        raise ValueError(f"X must have shape (n, {d}), got {array.shape}")
    result: FloatArray = (array - artifact.mean) / artifact.scale
    return result


def contributions(artifact: ModelArtifact, X: ArrayLike) -> FloatArray:
    """Per-feature log-odds contributions, shape (n, d): weights * (X - mean) / scale.

    A row's contributions plus the bias is its log-odds; positive entries pushed the score up.
    """
    result: FloatArray = _standardised(artifact, X) * artifact.weights
    return result


def decision_function(artifact: ModelArtifact, X: ArrayLike) -> FloatArray:
    """Log-odds per row, shape (n,)."""
    result: FloatArray = _standardised(artifact, X) @ artifact.weights + artifact.bias
    return result


def predict_proba(artifact: ModelArtifact, X: ArrayLike) -> FloatArray:
    """Fraud probability per row, shape (n,). A row with a non-finite feature yields nan."""
    return sigmoid(decision_function(artifact, X))


# --- training ---------------------------------------------------------------------------------


def fit_logistic_regression(
    X: ArrayLike,
    y: ArrayLike,
    feature_names: Sequence[str],
    *,
    version: str,
    l2: float = 1e-3,
    max_iter: int = 50,
    tol: float = 1e-10,
    class_weight: Literal["balanced"] | None = None,
    trained_at: str | None = None,
    metadata: Mapping[str, JSONValue] | None = None,
) -> ModelArtifact:
    """Fit an L2-regularised logistic regression by Newton's method (IRLS) on standardised X.

    Minimises  sum_i s_i * logloss_i / sum_i s_i  +  l2 / 2 * |weights|^2  (bias not
    penalised), with sample weights s_i = 1, or n / (2 n_class) for class_weight="balanced".
    With ~30 features each Newton step is one small (d+1)x(d+1) solve; a backtracking line
    search keeps every step a descent, and the loop stops when the Newton decrement is below
    `tol` or after `max_iter` steps (`training_metrics["converged"]` says which).

    "balanced" weighting raises every probability on rare-fraud data (scores are then no
    longer calibrated fraud rates); the default keeps probabilities honest.
    """
    names = tuple(feature_names)
    Xa = np.asarray(X, dtype=np.float64)
    ya = np.asarray(y)
    if Xa.ndim != 2 or Xa.shape[1] != len(names):
        raise TrainingError(f"X must have shape (n, {len(names)}), got {Xa.shape}")
    if ya.shape != (Xa.shape[0],):
        raise TrainingError(f"y must have shape ({Xa.shape[0]},), got {ya.shape}")
    if not np.all((ya == 0) | (ya == 1)):
        raise TrainingError("y must contain only 0 and 1 (or False and True)")
    if not np.all(np.isfinite(Xa)):
        bad = [names[j] for j in np.flatnonzero(~np.all(np.isfinite(Xa), axis=0))]
        raise TrainingError(f"X has non-finite values in feature(s) {bad}")
    if l2 < 0 or not math.isfinite(l2):
        raise TrainingError(f"l2 must be a finite number >= 0, got {l2}")
    if max_iter < 1:
        raise TrainingError(f"max_iter must be at least 1, got {max_iter}")
    if class_weight not in (None, "balanced"):
        raise TrainingError(f"class_weight must be None or 'balanced', got {class_weight!r}")
    yf = ya.astype(np.float64)
    n = yf.size
    n_pos = float(yf.sum())
    if n_pos == 0 or n_pos == n:
        only = "positive" if n_pos == n and n else "negative"
        raise TrainingError(
            f"y has only {only} labels ({n} samples): a classifier needs both classes"
        )

    mean = Xa.mean(axis=0)
    std = Xa.std(axis=0)
    scale = np.where(std > 0, std, 1.0)
    d = len(names)
    A = np.empty((n, d + 1))  # standardised features plus a column of ones for the bias
    A[:, :d] = (Xa - mean) / scale
    A[:, d] = 1.0

    if class_weight == "balanced":
        s = np.where(yf == 1, n / (2.0 * n_pos), n / (2.0 * (n - n_pos)))
    else:
        s = np.ones(n)
    s /= s.sum()  # the loss is a weighted mean
    penalty = np.full(d + 1, float(l2))
    penalty[d] = 0.0
    # A tiny ridge keeps the Hessian invertible for constant features when l2 = 0.
    jitter = 1e-12

    def objective(beta: FloatArray) -> float:
        z = A @ beta
        loss = float(s @ (np.logaddexp(0.0, z) - yf * z))
        return loss + 0.5 * float(penalty @ (beta * beta))

    beta = np.zeros(d + 1)
    prior = float(s @ yf)
    beta[d] = math.log(prior / (1.0 - prior))  # start from the base rate: fewer steps
    current = objective(beta)
    iterations = 0
    converged = False
    for iterations in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        p = sigmoid(A @ beta)
        grad = A.T @ (s * (p - yf)) + penalty * beta
        hessian = (A.T * (s * p * (1.0 - p))) @ A
        hessian[np.diag_indices_from(hessian)] += penalty + jitter
        try:
            step = np.linalg.solve(hessian, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(hessian, grad, rcond=None)[0]
        decrement = float(grad @ step)  # Newton decrement squared
        if decrement / 2.0 <= tol:
            converged = True
            break
        t = 1.0
        while True:
            candidate = beta - t * step
            value = objective(candidate)
            if value <= current - 0.25 * t * decrement or t < 1e-10:
                break
            t /= 2.0
        beta, current = candidate, value

    z = A @ beta
    probability = sigmoid(z)
    metrics = {
        "n_samples": float(n),
        "n_positive": n_pos,
        "auc_roc": roc_auc(yf, z),  # ranking metrics on log-odds: no ties from saturation
        "average_precision": average_precision(yf, z),
        "log_loss": log_loss(yf, probability),
        "iterations": float(iterations),
        "converged": 1.0 if converged else 0.0,
    }
    meta: dict[str, JSONValue] = {
        "training_params": {
            "l2": float(l2),
            "class_weight": class_weight,
            "max_iter": max_iter,
            "tol": tol,
        },
        **dict(metadata or {}),
    }
    return ModelArtifact(
        version=version,
        feature_names=names,
        mean=mean,
        scale=scale,
        weights=beta[:d],
        bias=float(beta[d]),
        trained_at=trained_at or datetime.now(UTC).replace(microsecond=0).isoformat(),
        training_metrics=metrics,
        metadata=meta,
    )


# --- files ------------------------------------------------------------------------------------


def artifact_to_json(artifact: ModelArtifact) -> str:
    doc = {
        "format": MODEL_FORMAT,
        "version": artifact.version,
        "trained_at": artifact.trained_at,
        "feature_names": list(artifact.feature_names),
        "mean": artifact.mean.tolist(),
        "scale": artifact.scale.tolist(),
        "weights": artifact.weights.tolist(),
        "bias": artifact.bias,
        "training_metrics": artifact.training_metrics,
        "metadata": artifact.metadata,
    }
    # repr-precision floats: a saved model loads back bit for bit.
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def save_model(artifact: ModelArtifact, path: str | os.PathLike[str]) -> None:
    """Write the artifact atomically: a reader (a reloading service) sees the old file or the
    new one, never half of one."""
    target = Path(path)
    text = artifact_to_json(artifact)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_model(path: str | os.PathLike[str], expected_features: Sequence[str]) -> ModelArtifact:
    """Read and check an artifact; raise `ModelError` naming the file and the problem."""
    source = os.fspath(path)

    def fail(message: str) -> ModelError:
        return ModelError(f"{source}: {message}", path=source)

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(f"cannot read model file: {e}") from e
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise fail(f"not valid JSON: {e}") from e
    except ValueError as e:  # NaN / Infinity from _refuse_constant
        raise fail(str(e)) from e
    if not isinstance(doc, dict):
        raise fail("a model artifact must be a JSON object")
    if doc.get("format") != MODEL_FORMAT:
        raise fail(f"format is {doc.get('format')!r}, expected {MODEL_FORMAT!r}")
    missing = [k for k in _KEYS if k not in doc]
    if missing:
        raise fail(f"missing field(s) {missing}")
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise fail(f"unknown field(s) {unknown}")

    names = doc["feature_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise fail("feature_names must be a list of strings")
    mismatch = _feature_mismatch(tuple(names), tuple(expected_features))
    if mismatch:
        raise fail(f"model features do not match the scoring features: {mismatch}")

    arrays = {key: _numbers(doc[key], key, fail) for key in ("mean", "scale", "weights")}
    bias = doc["bias"]
    if isinstance(bias, bool) or not isinstance(bias, int | float):
        raise fail(f"bias must be a number, got {bias!r}")
    for key, kind in (("version", str), ("trained_at", str), ("training_metrics", dict)):
        if not isinstance(doc[key], kind):
            raise fail(f"{key} must be a {'string' if kind is str else 'JSON object'}")
    if not isinstance(doc["metadata"], dict):
        raise fail("metadata must be a JSON object")
    try:
        return ModelArtifact(
            version=doc["version"],
            feature_names=tuple(names),
            mean=arrays["mean"],
            scale=arrays["scale"],
            weights=arrays["weights"],
            bias=float(bias),
            trained_at=doc["trained_at"],
            training_metrics=doc["training_metrics"],
            metadata=doc["metadata"],
        )
    except ValueError as e:  # shapes, non-finite (1e999 parses as inf), scale <= 0, ...
        raise fail(str(e)) from e


class ReloadingModel(ReloadingFile[ModelArtifact]):
    """The model in force, swapped when the file changes; a bad file keeps the old model.

    Raises `ModelError` from the constructor if the first load fails.
    """

    def __init__(self, path: str | os.PathLike[str], expected_features: Sequence[str]) -> None:
        names = tuple(expected_features)
        super().__init__(path, lambda p: load_model(p, names), lambda m: m.version)

    @property
    def model(self) -> ModelArtifact:
        return self.current


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in model file")


def _numbers(value: object, key: str, fail: Callable[[str], ModelError]) -> FloatArray:
    # np.asarray would quietly turn JSON true into 1.0 and "3" into 3.0.
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise fail(f"{key} must be a list of numbers")
    return np.asarray(value, dtype=np.float64)


def _feature_mismatch(model: tuple[str, ...], expected: tuple[str, ...]) -> str:
    """'' when equal, else which features are missing, extra or out of order."""
    if model == expected:
        return ""
    parts = []
    missing = [f for f in expected if f not in model]
    extra = [f for f in model if f not in expected]
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"extra {extra}")
    duplicates = sorted({f for f in model if model.count(f) > 1})
    if duplicates:
        parts.append(f"duplicated {duplicates}")
    if not parts:
        pairs = enumerate(zip(model, expected, strict=False))
        i = next((k for k, (a, b) in pairs if a != b), min(len(model), len(expected)) - 1)
        parts.append(
            f"reordered: position {i} is {model[i]!r} in the model but {expected[i]!r} "
            "in the scoring features"
        )
    return "; ".join(parts)
