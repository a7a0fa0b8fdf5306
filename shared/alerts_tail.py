"""`fraudstream alerts tail`: print alerts live from `risk.alerts`, one line per alert.

    2024-05-01T12:00:03Z  HIGH      acct-17     0.931  DECLINE  VELOCITY_1M  (+3 suppressed)  tx-9

For a person at a terminal: reads committed alerts only (read_committed, like any consumer),
joins no consumer group (it never moves anyone's offsets), starts at the end of the topic unless
--from-beginning, and stops on Ctrl-C, after --max alerts or after --duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import Any, TextIO

from aiokafka import TopicPartition
from google.protobuf.message import DecodeError as ProtobufDecodeError

from protos.fraud.v1 import scoring_pb2
from shared.config import Settings, load_settings
from shared.errors import ConfigError
from shared.kafka import make_admin, make_consumer

__all__ = ["format_alert", "register", "tail"]

_SEVERITIES = {"LOW": 1, "MEDIUM": 2, "HIGH": 3, "CRITICAL": 4}
_SEVERITY_NAMES = {v: k for k, v in _SEVERITIES.items()}
_DECISIONS = {1: "APPROVE", 2: "REVIEW", 3: "DECLINE"}
_COLORS = {1: "\x1b[36m", 2: "\x1b[33m", 3: "\x1b[31m", 4: "\x1b[1;35m"}
_RESET = "\x1b[0m"
_TOP_REASONS = 3


def format_alert(alert: scoring_pb2.Alert, *, color: bool = False) -> str:
    """One readable line: time (UTC), severity, account, score, decision, top reasons."""
    when = (
        alert.created_at.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
        if alert.HasField("created_at")
        else "-" * 20
    )
    severity = f"{_SEVERITY_NAMES.get(alert.severity, 'UNSPECIFIED'):<8}"
    if color:
        severity = f"{_COLORS.get(alert.severity, '')}{severity}{_RESET}"
    acted = [r for r in alert.reasons if r.source != scoring_pb2.Reason.SOURCE_SHADOW_RULE]
    codes = [r.code or "?" for r in acted[:_TOP_REASONS]]
    if len(acted) > _TOP_REASONS:
        codes.append(f"+{len(acted) - _TOP_REASONS}")
    parts = [
        when,
        severity,
        f"{alert.account_id:<10}",
        f"{alert.score:.3f}",
        f"{_DECISIONS.get(alert.decision, '-'):<7}",
        ", ".join(codes) or "(no reasons)",
    ]
    if alert.suppressed_count:
        parts.append(f"(+{alert.suppressed_count} suppressed)")
    parts.append(alert.transaction_id)
    return "  ".join(parts)


async def _partitions(settings: Settings, topic: str) -> list[TopicPartition]:
    """The topic's partitions, from the admin API (public, unlike forcing consumer metadata)."""
    admin = make_admin(settings, client_id="fraudstream-alerts-tail")
    await admin.start()
    try:
        [description] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = sorted(p["partition"] for p in description.get("partitions", []))
    if description.get("error_code") or not partitions:
        raise ConfigError(
            f"topic {topic!r} does not exist (TOPIC_RISK_ALERTS); run `fraudstream topics`"
        )
    return [TopicPartition(topic, p) for p in partitions]


async def tail(
    settings: Settings,
    *,
    from_beginning: bool = False,
    max_alerts: int | None = None,
    min_severity: int = 0,
    duration_s: float | None = None,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    color: bool = False,
    stop: asyncio.Event | None = None,
) -> int:
    """Print alerts until `stop`, `max_alerts` printed, or `duration_s` elapsed; return 0."""
    stop = stop or asyncio.Event()
    partitions = await _partitions(settings, settings.topics.alerts)
    consumer = make_consumer(settings, group_id=None, client_id="fraudstream-alerts-tail")
    await consumer.start()
    try:
        consumer.assign(partitions)
        if from_beginning:
            await consumer.seek_to_beginning(*partitions)
        else:
            await consumer.seek_to_end(*partitions)
        deadline = None if duration_s is None else time.monotonic() + duration_s
        printed = 0
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            batch = await consumer.getmany(timeout_ms=500, max_records=500)
            for tp in sorted(batch, key=lambda t: t.partition):
                for record in batch[tp]:
                    try:
                        if not record.value:
                            raise ProtobufDecodeError("empty value")
                        alert = scoring_pb2.Alert.FromString(record.value)
                    except ProtobufDecodeError:
                        print(
                            f"undecodable alert at partition {record.partition} "
                            f"offset {record.offset}",
                            file=err,
                        )
                        continue
                    if alert.severity < min_severity:
                        continue
                    print(format_alert(alert, color=color), file=out, flush=True)
                    printed += 1
                    if max_alerts is not None and printed >= max_alerts:
                        return 0
        return 0
    finally:
        await consumer.stop()


async def _run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"alerts tail: configuration error: {e}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    try:
        return await tail(
            settings,
            from_beginning=args.from_beginning,
            max_alerts=args.max,
            min_severity=_SEVERITIES[args.severity],
            duration_s=args.duration,
            color=color,
            stop=stop,
        )
    except ConfigError as e:
        print(f"alerts tail: {e}", file=sys.stderr)
        return 2
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def register(subparsers: Any) -> None:
    alerts = subparsers.add_parser(
        "alerts", help="work with alerts (tail)", description="Work with fraudstream alerts."
    )

    def usage(args: argparse.Namespace) -> int:
        alerts.print_help()
        return 2

    alerts.set_defaults(handler=usage)
    commands = alerts.add_subparsers(title="alert commands", metavar="COMMAND")
    parser = commands.add_parser(
        "tail",
        help="print alerts live from the alert topic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest alert still on the topic instead of the newest",
    )
    parser.add_argument(
        "--max", type=_positive_int, metavar="N", help="exit after printing N alerts"
    )
    parser.add_argument(
        "--severity",
        type=str.upper,
        choices=list(_SEVERITIES),
        default="LOW",
        metavar="MIN",
        help="print only alerts at least this severe: LOW, MEDIUM, HIGH, CRITICAL (default LOW)",
    )
    parser.add_argument(
        "--duration", type=float, metavar="S", help="exit after S seconds (default: run on)"
    )
    parser.set_defaults(handler=_run)
