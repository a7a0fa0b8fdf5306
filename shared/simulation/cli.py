"""`fraudstream simulate`: publish a simulated workload with known fraud to Kafka, or write it to
a JSON-lines file.

    fraudstream simulate                              28 days before today, 500 tx/s, with labels
    fraudstream simulate --rate 2000 --duration 60    one minute at 2,000 tx/s
    fraudstream simulate --max-transactions 10000 --json-share 0.1
    fraudstream simulate --output history.jsonl --days 183 --start 2018-04-01 --handbook

Time: the simulated days are the last --days complete UTC days before now (at most 28 with
ingest's 30-day retention), with event times spaced exactly as generated; --rate decides only
how fast that history is replayed. Labels go to the labels topic once the replay's simulated
clock has passed their report time (event time + --label-delay-days); the labels of the last
week are not due yet and are not published. Ctrl-C or SIGTERM stops cleanly: what was sent is
flushed and the totals are printed. Details: shared/simulation/publisher.py.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, TextIO

from aiokafka.errors import KafkaConnectionError

from shared.config import load_settings
from shared.errors import ConfigError
from shared.lifecycle import ServiceLifecycle
from shared.logging import configure_logging
from shared.simulation.generator import SimulationConfig, generate, write_jsonl
from shared.simulation.publisher import (
    DEFAULT_RATE,
    PublishStats,
    check_publishable,
    publish_simulation,
    replay_start,
)

__all__ = ["ProgressPrinter", "build_config", "register"]

DEFAULT_DAYS = 28


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


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within [0, 1], got {text}")
    return value


def _start(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO date (2018-04-01) or time (2018-04-01T00:00:00+00:00)"
        ) from None
    # A bare date means that day's UTC midnight, like the simulator's own days.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def build_config(args: argparse.Namespace, now: datetime) -> SimulationConfig:
    """The simulation the arguments ask for; without --start, the last --days days before now."""
    start: datetime = args.start if args.start is not None else replay_start(now, args.days)
    overrides: dict[str, Any] = {
        "seed": args.seed,
        "n_customers": args.customers,
        "n_terminals": args.terminals,
        "n_days": args.days,
        "start": start,
        "label_delay": timedelta(days=args.label_delay_days),
    }
    if args.handbook:
        return SimulationConfig.handbook(**overrides)
    return SimulationConfig(**overrides)


class ProgressPrinter:
    """Prints one progress line per report: totals, the rate over the last interval, and how
    far the simulated clock has come."""

    def __init__(self, out: TextIO = sys.stderr) -> None:
        self._out = out
        self._last = PublishStats()

    def __call__(self, stats: PublishStats) -> None:
        interval = stats.elapsed_s - self._last.elapsed_s
        sent = stats.transactions - self._last.transactions
        rate = sent / interval if interval > 0 else 0.0
        self._last = stats
        print(
            f"simulate: {stats.transactions:,} transactions ({rate:,.0f}/s), "
            f"{stats.labels:,} labels, simulated time {_when(stats.simulated_time)}",
            file=self._out,
            flush=True,
        )


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC") if moment is not None else "-"


_STOP_REASONS = {
    "end": "end of the simulation",
    "max_transactions": "--max-transactions reached",
    "duration": "--duration reached",
    "stopped": "stopped by signal",
}


def summary(stats: PublishStats) -> str:
    """The closing line of a run."""
    reason = _STOP_REASONS.get(stats.stopped_by, stats.stopped_by or "unknown")
    json_part = f" ({stats.json_transactions:,} as JSON)" if stats.json_transactions else ""
    text = (
        f"simulate: finished ({reason}): {stats.transactions:,} transactions{json_part} and "
        f"{stats.labels:,} labels in {stats.elapsed_s:,.1f} s ({stats.rate:,.0f} tx/s), "
        f"simulated up to {_when(stats.simulated_time)}"
    )
    if stats.labels_pending:
        text += f"; {stats.labels_pending:,} labels not yet due were not published"
    return text


def _write_file(args: argparse.Namespace, config: SimulationConfig) -> int:
    stream = generate(config)
    if args.max_transactions is not None:
        stream = islice(stream, args.max_transactions)
    try:
        count = write_jsonl(stream, args.output)
    except KeyboardInterrupt:
        print(f"simulate: interrupted; {args.output} is incomplete", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"simulate: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    last_day = config.start + timedelta(days=config.n_days - 1)
    print(
        f"simulate: wrote {count:,} transactions with ground truth to {args.output} "
        f"(simulated {config.start.date()} to {last_day.date()}, seed {config.seed})",
        file=sys.stderr,
    )
    return 0


async def _publish(args: argparse.Namespace, config: SimulationConfig, now: datetime) -> int:
    settings = load_settings()
    # Refused before anything starts (logging, signal handlers, the producer): a window that
    # ingest would reject wholesale is a mistake in the arguments.
    check_publishable(config.start, config.n_days, now, settings.ingest)
    configure_logging("simulate", settings.log_level, settings.log_format)
    run_id = args.run_id if args.run_id is not None else f"r{secrets.token_hex(3)}"
    rate = args.rate or None
    last_day = config.start + timedelta(days=config.n_days - 1)
    print(
        f"simulate: {config.start.date()} to {last_day.date()} ({config.n_days} days, "
        f"{config.n_customers:,} customers, {config.n_terminals:,} terminals, seed {config.seed})"
        f" at {f'{rate:,.0f} tx/s' if rate else 'full speed'} to {settings.topics.raw}"
        + ("" if args.no_labels else f" and {settings.topics.labels}")
        + (f", run id {run_id!r}" if run_id else ", generator ids (no run id)"),
        file=sys.stderr,
        flush=True,
    )
    async with ServiceLifecycle("simulate") as life:
        stats = await publish_simulation(
            settings,
            config,
            rate=rate,
            max_transactions=args.max_transactions,
            duration_s=args.duration,
            stop_event=life.stop_event,
            progress_callback=ProgressPrinter(sys.stderr),
            retime=False,  # build_config already placed the window; check it against `now`
            include_labels=not args.no_labels,
            json_share=args.json_share,
            id_prefix=run_id,
            now=now,
        )
    print(summary(stats), file=sys.stderr, flush=True)
    return 0


def _handle(args: argparse.Namespace) -> int | Coroutine[Any, Any, int]:
    now = datetime.now(UTC)
    try:
        config = build_config(args, now)
    except ConfigError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    if args.output is not None:
        if args.run_id is not None:
            print("simulate: --run-id applies to publishing, not to --output", file=sys.stderr)
            return 2
        return _write_file(args, config)
    return _guarded(_publish(args, config, now))


async def _guarded(run: Coroutine[Any, Any, int]) -> int:
    # A configuration problem found once settings are loaded (a window ingest would reject, a
    # bad environment variable) is the user's to fix: one line, not a traceback.
    try:
        return await run
    except ConfigError as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    except KafkaConnectionError as e:
        print(f"simulate: cannot reach Kafka: {e}", file=sys.stderr)
        return 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="publish a simulated workload with known fraud (or write it to a file)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pace = parser.add_argument_group("pace and length (Kafka)")
    pace.add_argument(
        "--rate",
        type=_non_negative_float,
        default=DEFAULT_RATE,
        metavar="TX_PER_S",
        help="transactions per second, paced in wall time; labels ride along uncounted; "
        "0 publishes as fast as the broker acknowledges (default: %(default)s)",
    )
    pace.add_argument(
        "--max-transactions",
        type=_non_negative_int,
        metavar="N",
        help="stop after N transactions (with --output: write at most N)",
    )
    pace.add_argument(
        "--duration",
        type=_positive_float,
        metavar="SECONDS",
        help="stop after this many seconds of publishing",
    )

    world = parser.add_argument_group("the simulated world")
    world.add_argument(
        "--days",
        type=_non_negative_int,
        default=DEFAULT_DAYS,
        help="simulated days; publishing to Kafka allows at most 28 with the default 30-day "
        "INGEST_MAX_AGE_S (default: %(default)s)",
    )
    world.add_argument(
        "--customers", type=_positive_int, default=5000, help="(default: %(default)s)"
    )
    world.add_argument(
        "--terminals", type=_positive_int, default=10000, help="(default: %(default)s)"
    )
    world.add_argument(
        "--seed", type=int, default=0, help="same seed, same world (default: %(default)s)"
    )
    world.add_argument(
        "--start",
        type=_start,
        metavar="ISO_DATE",
        help="first simulated day instead of --days days before today; to Kafka the whole "
        "window must be within ingest's accepted event-time range",
    )
    world.add_argument(
        "--handbook",
        action="store_true",
        help="the handbook's scenarios only (high amounts, compromised terminals and "
        "customers, all card-present): no card testing, impossible travel or e-commerce",
    )

    labels = parser.add_argument_group("labels")
    labels.add_argument(
        "--no-labels", action="store_true", help="publish transactions only, no labels"
    )
    labels.add_argument(
        "--label-delay-days",
        type=_non_negative_float,
        default=7.0,
        metavar="DAYS",
        help="a label is reported this long after its transaction (default: %(default)s)",
    )

    wire = parser.add_argument_group("output")
    wire.add_argument(
        "--output",
        metavar="FILE.jsonl",
        help="write the transactions, with ground truth, to a JSON-lines file instead of "
        "publishing (no labels: they derive from is_fraud; rate and duration do not apply)",
    )
    json_choice = wire.add_mutually_exclusive_group()
    json_choice.add_argument(
        "--json",
        dest="json_share",
        action="store_const",
        const=1.0,
        default=0.0,
        help="publish transactions as JSON (content-type: application/json) instead of "
        "protobuf, to exercise ingest's JSON path",
    )
    json_choice.add_argument(
        "--json-share",
        dest="json_share",
        type=_share,
        metavar="SHARE",
        help="publish this share of transactions (0-1, drawn from --seed) as JSON",
    )
    wire.add_argument(
        "--run-id",
        metavar="ID",
        help="prefix of every published id (transaction, account, card, terminal, merchant, "
        "device), so that runs against the same Kafka and Redis stay separate worlds; default: "
        "a fresh random id per run; '' publishes the generator's ids, which makes a rerun a "
        "replay that ingest drops as duplicates",
    )
    parser.set_defaults(handler=_handle)
