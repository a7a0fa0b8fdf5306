"""`fraudstream train`: fit the fraud model by replaying labeled transactions through the live
feature code.

    fraudstream train --simulate-days 60 --customers 2000 --terminals 4000 --seed 7 \\
        --output models/default.json
    fraudstream train --input history.jsonl --output models/candidate.json

Training and serving must compute the same numbers, so nothing here recomputes a feature. The
transactions (a simulator JSON-lines file, or generated on the fly) are replayed in event-time
order through the path a live transaction takes:

  * `transaction_to_proto` -> ingest's `validate_transaction` (the same normalization; a record
    ingest would reject is skipped and counted) -> `engine.transaction_records` (protobuf ->
    TxRecord, amounts in major units by the currency's exponent);
  * `VelocityStore.apply_batch` against the configured Redis, under a namespace of its own
    (`<REDIS_KEY_PREFIX>:train-<run id>`), cleared when the run ends, whatever the outcome, so
    live state is never read or touched;
  * `engine.compute_features`, the function `ScoringEngine.evaluate` calls.

Labels reach the store the way the live service receives them: a transaction's label is
reported `label delay` after its event time (the simulator's `label_for`, 7 days by default,
SCORING_LABEL_DELAY_S), so it is applied just before the first transaction at or after that
moment, booked on the labeled transaction's day. Only fraud labels are sent: a genuine label of
a transaction never labeled fraud changes no count, in the live service or here. The terminal
risk features then count a label only once it is older than the delay, by the store's own rule.

Split by time (the handbook's protocol, in days from the first transaction): a burn-in (the
label delay plus a day, while the delayed terminal windows are still empty: replayed, not fitted
on), then the training days, then a gap as long as the label delay (the model could only be
deployed once the last training labels are known), then the validation days. The model is
fitted with `fit_logistic_regression` (numpy IRLS) on the training days; validation AUC ROC and
average precision are measured on the validation days and stored beside the training metrics.
The artifact's metadata holds the exact command line, the data source (the file and its SHA-256,
or the simulation config with its seed), the split and the counts.

Bounded: `--max-transactions` (the replay stops there) and `--max-seconds` (the run fails with
an error rather than hanging); progress goes to stderr every few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import math
import shlex
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TextIO

import numpy as np
import numpy.typing as npt
from redis.exceptions import RedisError

from shared.config import Settings, load_settings
from shared.errors import ConfigError, FraudstreamError, InputError
from shared.redis_client import make_redis
from shared.scoring.engine import compute_features, transaction_records
from shared.scoring.features import DAY_MS, FEATURE_NAMES, LabelRecord, TxRecord
from shared.scoring.metrics import average_precision, roc_auc
from shared.scoring.model import JSONValue, ModelArtifact, TrainingError, fit_logistic_regression
from shared.scoring.model import save_model as _save_model
from shared.scoring.velocity import VelocityStore
from shared.simulation.generator import SimTransaction, SimulationConfig, generate, read_jsonl
from shared.simulation.publisher import transaction_to_proto
from shared.validation import ValidationLimits, validate_transaction

__all__ = [
    "ReplayResult",
    "SplitPlan",
    "TrainingRun",
    "build_parser",
    "register",
    "replay",
    "train",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_MAX_TRANSACTIONS: Final = 2_000_000
DEFAULT_MAX_SECONDS: Final = 1800.0
DEFAULT_BATCH: Final = 2000
DEFAULT_START: Final = datetime(2018, 4, 1, tzinfo=UTC)  # the handbook's first day
PROGRESS_EVERY_S: Final = 5.0


class TrainingTimeout(FraudstreamError):
    """The replay ran past `--max-seconds`."""


# --- the replay -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ReplayResult:
    """Every replayed transaction's features (in replay order) and ground truth."""

    features: FloatArray  # (n, len(FEATURE_NAMES))
    is_fraud: BoolArray
    event_ms: IntArray
    transaction_ids: list[str]
    fraud_labels_applied: int
    skipped: dict[str, int]  # records ingest would have rejected, by error code
    truncated: bool  # stopped at max_transactions

    def __len__(self) -> int:
        return len(self.transaction_ids)


@dataclass
class _Progress:
    out: TextIO | None
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)

    def maybe(self, done: int, event_ms: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.out is None or (not force and now - self.last < PROGRESS_EVERY_S):
            return
        self.last = now
        elapsed = now - self.started
        day = datetime.fromtimestamp(event_ms / 1000, UTC).date().isoformat() if done else "-"
        rate = done / elapsed if elapsed > 0 else 0.0
        print(
            f"train: replayed {done:,} transactions (up to {day}) in {elapsed:.0f} s, "
            f"{rate:,.0f} tx/s",
            file=self.out,
            flush=True,
        )


async def replay(
    transactions: Iterable[SimTransaction],
    store: VelocityStore,
    *,
    label_delay: timedelta,
    limits: ValidationLimits | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_transactions: int = DEFAULT_MAX_TRANSACTIONS,
    deadline: float | None = None,
    progress: TextIO | None = None,
) -> ReplayResult:
    """Replay `transactions` (event-time order) through the live velocity and feature code.

    Raises InputError when the stream goes back in time (a file that is not in event-time
    order would give the model features no live service ever computes), TrainingTimeout past
    `deadline` (time.monotonic())."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    checks = limits or ValidationLimits()
    delay_ms = int(label_delay.total_seconds() * 1000)
    pending: deque[tuple[int, LabelRecord]] = deque()  # (due ms, label), due ms non-decreasing
    # Labels that are due but not yet sent, by terminal. A label must reach the store after
    # every transaction before its due time and before every transaction after it, but only
    # transactions at its own terminal can tell: so a due label waits (the batch keeps
    # growing) until a transaction at its terminal arrives, and the batch is cut there.
    held: dict[str, list[LabelRecord]] = {}
    batch: list[TxRecord] = []
    batch_fraud: list[bool] = []
    features: list[FloatArray] = []
    fraud: list[bool] = []
    event_ms: list[int] = []
    ids: list[str] = []
    skipped: dict[str, int] = {}
    labels_applied = 0
    last_ms = -1
    seen = 0
    truncated = False
    tracker = _Progress(progress)

    async def flush() -> None:
        nonlocal labels_applied
        if batch:
            velocity = await store.apply_batch(batch)
            features.append(compute_features(batch, velocity))
            fraud.extend(batch_fraud)
            event_ms.extend(r.event_ms for r in batch)
            ids.extend(r.transaction_id for r in batch)
            batch.clear()
            batch_fraud.clear()
        if held:
            due = [label for labels in held.values() for label in labels]
            held.clear()
            await store.apply_labels(due)
            labels_applied += len(due)

    for sim in transactions:
        if seen >= max_transactions:
            truncated = True
            break
        if deadline is not None and time.monotonic() > deadline:
            raise TrainingTimeout(f"the replay ran out of time after {seen:,} transactions")
        seen += 1
        message = transaction_to_proto(sim)
        t_ms = int(message.event_time.seconds) * 1000 + message.event_time.nanos // 1_000_000
        if t_ms < last_ms:
            raise InputError(
                "NOT_IN_EVENT_TIME_ORDER",
                f"transaction {sim.transaction_id} at {sim.event_time.isoformat()} comes after a "
                "later one: the input must be in event-time order (simulator files are)",
                "event_time",
            )
        last_ms = t_ms
        try:
            # Ingest's normalization, with "now" at the event (the history is replayed as if
            # live); a record ingest would reject never reaches scoring, so it is skipped.
            valid = validate_transaction(message, checks, t_ms / 1000 + 1.0, in_place=True)
        except InputError as e:
            skipped[e.code] = skipped.get(e.code, 0) + 1
            continue
        # A label due at the same instant as a transaction comes first (interleave_labels).
        while pending and pending[0][0] <= t_ms:
            label = pending.popleft()[1]
            held.setdefault(label.terminal_id, []).append(label)
        (record,) = transaction_records([valid])
        if record.terminal_id in held:
            await flush()
        batch.append(record)
        batch_fraud.append(sim.is_fraud)
        if sim.is_fraud and record.terminal_id:
            pending.append(
                (
                    t_ms + delay_ms,
                    LabelRecord(record.transaction_id, record.terminal_id, True, t_ms),
                )
            )
        if len(batch) >= batch_size:
            await flush()
        tracker.maybe(seen, t_ms)
    await flush()
    tracker.maybe(seen, last_ms, force=True)
    matrix = (
        np.vstack(features) if features else np.empty((0, len(FEATURE_NAMES)), dtype=np.float64)
    )
    return ReplayResult(
        features=matrix,
        is_fraud=np.asarray(fraud, dtype=np.bool_),
        event_ms=np.asarray(event_ms, dtype=np.int64),
        transaction_ids=ids,
        fraud_labels_applied=labels_applied,
        skipped=skipped,
        truncated=truncated,
    )


# --- the split and the fit --------------------------------------------------------------------


@dataclass(frozen=True)
class SplitPlan:
    """Days from the first transaction's UTC day: [0, burn_in) replayed only, then `train`
    days fitted on, `gap` days skipped, `validation` days measured."""

    burn_in: int
    train: int
    gap: int
    validation: int

    @classmethod
    def for_span(
        cls,
        days: int,
        *,
        label_delay_days: int,
        validation_days: int = 7,
        burn_in_days: int | None = None,
        gap_days: int | None = None,
    ) -> SplitPlan:
        burn_in = label_delay_days + 1 if burn_in_days is None else burn_in_days
        gap = label_delay_days if gap_days is None else gap_days
        train = days - burn_in - gap - validation_days
        if min(burn_in, gap, validation_days) < 0 or train < 1:
            raise TrainingError(
                f"{days} days of history cannot hold a burn-in of {burn_in}, a gap of {gap} "
                f"and {validation_days} validation days with at least one training day: "
                "give more days or shorten the split"
            )
        return cls(burn_in, train, gap, validation_days)

    def masks(self, day_index: IntArray) -> tuple[BoolArray, BoolArray]:
        train_end = self.burn_in + self.train
        val_start = train_end + self.gap
        train = (day_index >= self.burn_in) & (day_index < train_end)
        validation = (day_index >= val_start) & (day_index < val_start + self.validation)
        return train, validation

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "burn_in_days": self.burn_in,
            "train_days": self.train,
            "gap_days": self.gap,
            "validation_days": self.validation,
        }


@dataclass(frozen=True)
class TrainingRun:
    artifact: ModelArtifact
    replay: ReplayResult
    split: SplitPlan
    namespace: str
    keys_cleared: int


def _metrics_on(y: BoolArray, log_odds: FloatArray, prefix: str) -> dict[str, float]:
    n_pos = int(y.sum())
    out = {f"{prefix}_n_samples": float(y.size), f"{prefix}_n_positive": float(n_pos)}
    if 0 < n_pos < y.size:
        out[f"{prefix}_auc_roc"] = roc_auc(y, log_odds)
        out[f"{prefix}_average_precision"] = average_precision(y, log_odds)
    return out


def fit_from_replay(
    result: ReplayResult,
    split: SplitPlan,
    *,
    version: str,
    l2: float,
    metadata: dict[str, JSONValue],
) -> ModelArtifact:
    """Fit on the training days; add validation AUC ROC and AP to the training metrics."""
    if len(result) == 0:
        raise TrainingError("the replay produced no transactions")
    first_day = int(result.event_ms.min()) // DAY_MS
    day_index = result.event_ms // DAY_MS - first_day
    train_mask, val_mask = split.masks(day_index)
    if not train_mask.any():
        raise TrainingError("no transactions fall on the training days")
    artifact = fit_logistic_regression(
        result.features[train_mask],
        result.is_fraud[train_mask],
        FEATURE_NAMES,
        version=version,
        l2=l2,
        metadata=metadata,
    )
    metrics = dict(artifact.training_metrics)
    if val_mask.any():
        standardised = (result.features[val_mask] - artifact.mean) / artifact.scale
        log_odds = standardised @ artifact.weights + artifact.bias
        metrics.update(_metrics_on(result.is_fraud[val_mask], log_odds, "validation"))
    return dataclasses.replace(artifact, training_metrics=metrics)


# --- inputs -----------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _span_days(first: datetime, last: datetime) -> int:
    return (last.date() - first.date()).days + 1


def _file_span(path: Path, max_transactions: int) -> tuple[int, int]:
    """(days covered, transactions) of the first `max_transactions` records of a file."""
    first = last = None
    count = 0
    for tx in read_jsonl(path):
        if count >= max_transactions:
            break
        first = first or tx.event_time
        last = tx.event_time
        count += 1
    if first is None or last is None:
        raise TrainingError(f"{path}: no transactions")
    return _span_days(first, last), count


# --- the command ------------------------------------------------------------------------------


async def train(
    args: argparse.Namespace,
    settings: Settings,
    *,
    command_line: str,
    progress: TextIO | None = sys.stderr,
) -> TrainingRun:
    """The whole `fraudstream train` run (without the printing); see the module docstring."""
    delay_days = args.label_delay_days
    if delay_days is None:
        delay_days = settings.scoring.label_delay_s / 86400
    label_delay = timedelta(days=delay_days)
    source: dict[str, JSONValue]
    stream: Callable[[], Iterator[SimTransaction]]
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise ConfigError(f"--input {path}: no such file")
        days, _ = _file_span(path, args.max_transactions)
        source = {"kind": "jsonl", "path": str(path), "sha256": _file_sha256(path)}

        def stream() -> Iterator[SimTransaction]:
            return read_jsonl(path)

    else:
        config = SimulationConfig(
            seed=args.seed,
            n_customers=args.customers,
            n_terminals=args.terminals,
            n_days=args.simulate_days,
            start=args.start,
            label_delay=label_delay,
        )
        days = config.n_days
        source = {
            "kind": "simulation",
            "seed": config.seed,
            "customers": config.n_customers,
            "terminals": config.n_terminals,
            "days": config.n_days,
            "start": config.start.isoformat(),
        }

        def stream() -> Iterator[SimTransaction]:
            return generate(config)

    split = SplitPlan.for_span(
        days,
        label_delay_days=math.ceil(delay_days),
        validation_days=args.validation_days,
        burn_in_days=args.burn_in_days,
        gap_days=args.gap_days,
    )
    run_id = uuid.uuid4().hex[:12]
    namespace = f"train-{run_id}"
    deadline = time.monotonic() + args.max_seconds
    redis = make_redis(settings)
    store = VelocityStore.from_settings(redis, settings, namespace=namespace)
    cleared = 0
    try:
        await store.load_scripts()
        if progress is not None:
            print(
                f"train: replaying {days} days into Redis namespace {store.prefix} "
                f"(label delay {delay_days:g} d; split {split.to_json()})",
                file=progress,
                flush=True,
            )
        result = await replay(
            stream(),
            store,
            label_delay=label_delay,
            limits=ValidationLimits.from_settings(settings.ingest),
            batch_size=args.batch,
            max_transactions=args.max_transactions,
            deadline=deadline,
            progress=progress,
        )
    finally:
        # Whatever happened: the namespace must not outlive the run.
        try:
            cleared = await store.clear()
        finally:
            await redis.aclose()
    digest = hashlib.sha256(
        json.dumps({"source": source, "split": split.to_json(), "l2": args.l2}).encode()
    ).hexdigest()[:10]
    version = args.version or f"logreg-{digest}"
    metadata: dict[str, JSONValue] = {
        "command": command_line,
        "source": source,
        "seed": source.get("seed"),
        "label_delay_days": delay_days,
        "split": split.to_json(),
        "transactions_replayed": len(result),
        "fraud_labels_applied": result.fraud_labels_applied,
        "skipped_as_invalid": dict(result.skipped),
        "truncated_at_max_transactions": result.truncated,
        "feature_code": "shared.scoring.engine.compute_features over VelocityStore.apply_batch",
    }
    artifact = fit_from_replay(result, split, version=version, l2=args.l2, metadata=metadata)
    return TrainingRun(artifact, result, split, store.prefix, cleared)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _start(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data (one of)")
    data.add_argument(
        "--input", metavar="FILE.jsonl", help="a simulator file (`fraudstream simulate --output`)"
    )
    data.add_argument(
        "--simulate-days",
        type=_positive_int,
        metavar="N",
        help="generate N days of history on the fly instead of reading a file",
    )
    data.add_argument("--customers", type=_positive_int, default=5000, help="(default: 5000)")
    data.add_argument("--terminals", type=_positive_int, default=10000, help="(default: 10000)")
    data.add_argument("--seed", type=int, default=0, help="simulation seed (default: 0)")
    data.add_argument(
        "--start",
        type=_start,
        default=DEFAULT_START,
        metavar="ISO_DATE",
        help="first simulated day (default: 2018-04-01, the handbook's)",
    )
    split = parser.add_argument_group("split by time (days from the first transaction)")
    split.add_argument(
        "--label-delay-days",
        type=float,
        metavar="DAYS",
        help="labels are known this long after their transaction (default: "
        "SCORING_LABEL_DELAY_S, 7 days)",
    )
    split.add_argument(
        "--burn-in-days",
        type=_non_negative_int,
        metavar="N",
        help="first days replayed but not fitted on (default: label delay + 1)",
    )
    split.add_argument(
        "--gap-days",
        type=_non_negative_int,
        metavar="N",
        help="days between training and validation (default: the label delay)",
    )
    split.add_argument("--validation-days", type=_non_negative_int, default=7, help="(default: 7)")
    fit = parser.add_argument_group("model")
    # 1e-4 gave the best validation AUC and AP on simulated histories (1e-5 to 1e-2 tried).
    fit.add_argument("--l2", type=float, default=1e-4, help="L2 penalty (default: 0.0001)")
    fit.add_argument("--version", help="model version (default: logreg-<hash of data + split>)")
    fit.add_argument(
        "--output",
        metavar="FILE.json",
        help="where to write the artifact (default: SCORING_MODEL_PATH, models/default.json)",
    )
    bounds = parser.add_argument_group("bounds")
    bounds.add_argument(
        "--max-transactions",
        type=_positive_int,
        default=DEFAULT_MAX_TRANSACTIONS,
        help="replay at most N transactions (default: %(default)s)",
    )
    bounds.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help="fail when the replay takes longer (default: %(default)s)",
    )
    bounds.add_argument(
        "--batch",
        type=_positive_int,
        default=DEFAULT_BATCH,
        help="transactions per velocity call (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fraudstream train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    return parser


def _summary(run: TrainingRun, output: Path) -> str:
    m = run.artifact.training_metrics
    lines = [
        f"train: wrote {output} (version {run.artifact.version})",
        f"  replayed {len(run.replay):,} transactions, {run.replay.fraud_labels_applied:,} "
        f"fraud labels; namespace {run.namespace} cleared ({run.keys_cleared:,} keys)",
    ]
    for name in (
        "n_samples",
        "n_positive",
        "auc_roc",
        "average_precision",
        "validation_n_samples",
        "validation_n_positive",
        "validation_auc_roc",
        "validation_average_precision",
    ):
        if name in m:
            lines.append(f"  {name:30} {m[name]:.6g}")
    return "\n".join(lines)


async def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if bool(args.input) == bool(args.simulate_days):
        print("train: give exactly one of --input FILE or --simulate-days N", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"train: configuration error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output or settings.scoring.model_path)
    command_line = "fraudstream train " + shlex.join(_train_words(argv))
    try:
        run = await train(args, settings, command_line=command_line)
    except (FraudstreamError, ValueError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 1
    except (OSError, RedisError) as e:
        print(f"train: Redis at {settings.redis_url} failed: {e}", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    _save_model(run.artifact, output)
    print(_summary(run, output), file=sys.stderr, flush=True)
    return 0


def _train_words(argv: Sequence[str] | None) -> list[str]:
    """The arguments after `train` as typed (for the artifact's metadata)."""
    words = list(argv) if argv is not None else list(sys.argv[1:])
    if "train" in words:
        words = words[words.index("train") + 1 :]
    return words


def _handle(args: argparse.Namespace) -> Any:
    return _run(args, getattr(args, "argv", None))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fit the model by replaying labeled transactions through the live feature code",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(parser)
    parser.set_defaults(handler=_handle)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return asyncio.run(_run(args, args.argv))


if __name__ == "__main__":
    sys.exit(main())
