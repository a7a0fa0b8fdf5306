"""Where `fraudstream evaluate` gets its input: Kafka topics or JSON-lines files.

Kafka (`load_from_kafka`): the scores topic (ScoredTransaction) and the labels topic (Label) are
read side by side, each as a read_committed consumer with no consumer group: it assigns every
partition itself, never joins a group and never commits, so it moves nobody's offsets and
needs no cleanup. Each topic is read from its beginning up to the end offsets taken when the
read starts (for a read_committed consumer the last stable offset: an open transaction is
not waited for), so the evaluation sees one consistent moment however fast the pipeline
keeps writing. Bounded twice: `max_records` per topic and `timeout_s` for the whole read; a
read cut short says so (`SourceStats.complete`), and the report repeats it.

Files (`load_from_files`, `write_jsonl`): one message per line in the protobuf JSON mapping
with the .proto's field names (camelCase names are accepted too), which is what `--dump`
writes: `DIR/scores.jsonl` and `DIR/labels.jsonl`. A later run on the files reproduces the
evaluation without Kafka.

A record that is not a valid message (undecodable bytes or JSON, no transaction_id, no event
or report time, a score that is not a finite number) is counted and skipped, never fatal: the
first problem is quoted in the report.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, Literal, TextIO, TypeVar, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from shared.config import Settings
from shared.errors import ConfigError
from shared.evaluation import LabelTable, LabelTableBuilder, ScoreTable, ScoreTableBuilder
from shared.kafka import make_admin, make_consumer
from shared.scoring.features import FEATURE_NAMES

__all__ = [
    "LABELS_FILE",
    "SCORES_FILE",
    "LoadedData",
    "SourceStats",
    "TopicRead",
    "load_from_files",
    "load_from_kafka",
    "read_topic",
    "write_jsonl",
]

SCORES_FILE: Final = "scores.jsonl"
LABELS_FILE: Final = "labels.jsonl"

Kind = Literal["scores", "labels"]
M = TypeVar("M", scoring_pb2.ScoredTransaction, transaction_pb2.Label)
T = TypeVar("T")

_POLL_MS: Final = 500
_BATCH: Final = 5000
_PROGRESS_EVERY_S: Final = 5.0


@dataclass(frozen=True)
class SourceStats:
    """What was read from one topic or file."""

    kind: Kind
    name: str  # topic or file path
    read: int  # records or non-blank lines read
    rejected: int  # of which not a valid message (skipped)
    complete: bool  # everything up to the end was read
    stopped_by: str  # "end", "max_records" or "timeout"
    available: int | None = None  # Kafka: offsets up to the end (markers included)
    first_problem: str = ""

    def describe(self) -> str:
        what = "scored transactions" if self.kind == "scores" else "labels"
        text = f"{what}: {self.read - self.rejected:,} from `{self.name}`"
        if self.complete:
            text += " (read to the end)"
        else:
            reason = {"max_records": "--max-records reached", "timeout": "--timeout reached"}
            text += f" (PARTIAL: {reason.get(self.stopped_by, self.stopped_by)}"
            if self.available is not None:
                text += f", {self.read:,} of about {self.available:,} records"
            text += ")"
        if self.rejected:
            text += f"; {self.rejected:,} invalid records skipped, first: {self.first_problem}"
        return text


@dataclass(frozen=True)
class TopicRead:
    read: int  # records handed to the callback
    complete: bool  # every partition reached the end offset taken at the start
    stopped_by: str  # "end", "max_records", "timeout" or "stopped"
    available: int  # offsets between the beginning and that end (markers included)


@dataclass(frozen=True, eq=False)
class LoadedData:
    scores: ScoreTable
    labels: LabelTable
    sources: tuple[SourceStats, ...]


class _Collector(Generic[M]):
    """Decodes one source's records into a table builder, optionally copying them to a file."""

    def __init__(
        self,
        kind: Kind,
        message_type: type[M],
        add: Callable[[M], None],
        dump: TextIO | None = None,
    ) -> None:
        self.kind = kind
        self._type: type[M] = message_type
        self._add: Callable[[M], None] = add
        self._dump = dump
        self.read = 0
        self.rejected = 0
        self.first_problem = ""

    def _reject(self, where: str, problem: str) -> None:
        self.rejected += 1
        if not self.first_problem:
            self.first_problem = f"{where}: {problem}"

    def _accept(self, message: M, where: str) -> None:
        problem = _invalid(message)
        if problem:
            self._reject(where, problem)
            return
        self._add(message)
        if self._dump is not None:
            self._dump.write(_json_line(message))

    def from_bytes(self, value: bytes | None, where: str) -> None:
        self.read += 1
        try:
            message = self._type.FromString(value or b"")
        except (ProtobufDecodeError, RuntimeError, ValueError) as e:
            self._reject(where, f"not a protobuf {self._type.__name__}: {e}")
            return
        self._accept(message, where)

    def from_json(self, line: str, where: str) -> None:
        self.read += 1
        message = self._type()
        try:
            _parse_json(line, message)
        except json_format.ParseError as e:
            self._reject(where, f"not a JSON {self._type.__name__}: {e}")
            return
        self._accept(message, where)


def _parse_json(line: str, message: Message) -> None:
    """`json_format.Parse`, twice as fast for a ScoredTransaction: the features map is set
    directly (json_format converts a map entry by entry through reflection), and the reasons,
    which the evaluation never reads, are not converted at all."""
    try:
        doc = json.loads(line)
    except ValueError as e:
        raise json_format.ParseError(f"invalid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise json_format.ParseError("a line must hold one JSON object")
    if isinstance(message, scoring_pb2.ScoredTransaction):
        doc.pop("reasons", None)
        features = doc.pop("features", {})
        if not isinstance(features, dict):
            raise json_format.ParseError("features must be a JSON object")
        for name, value in features.items():
            # The JSON mapping writes doubles as numbers, or "NaN" / "Infinity" / "-Infinity".
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise json_format.ParseError(f"feature {name!r} is not a number: {value!r}")
            try:
                message.features[name] = float(value)
            except ValueError:
                raise json_format.ParseError(
                    f"feature {name!r} is not a number: {value!r}"
                ) from None
    json_format.ParseDict(doc, message)


def _invalid(message: Message) -> str:
    """Why the message cannot be evaluated, or ''."""
    if isinstance(message, scoring_pb2.ScoredTransaction):
        if not message.transaction.transaction_id:
            return "no transaction.transaction_id"
        if not message.transaction.HasField("event_time"):
            return "no transaction.event_time"
        if not math.isfinite(message.score):
            return f"score {message.score} is not a finite number"
        return ""
    if isinstance(message, transaction_pb2.Label):
        if not message.transaction_id:
            return "no transaction_id"
        if not message.HasField("reported_at"):
            return "no reported_at"
    return ""


def _json_line(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None) + "\n"


def write_jsonl(path: str | os.PathLike[str], messages: Iterable[Message]) -> int:
    """Write messages as JSON lines (the --scores-file/--labels-file format); return the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for message in messages:
            f.write(_json_line(message))
            count += 1
    return count


def _collectors(
    scores: ScoreTableBuilder,
    labels: LabelTableBuilder,
    dumps: tuple[TextIO | None, TextIO | None] = (None, None),
) -> tuple[_Collector[scoring_pb2.ScoredTransaction], _Collector[transaction_pb2.Label]]:
    return (
        _Collector("scores", scoring_pb2.ScoredTransaction, scores.add_proto, dumps[0]),
        _Collector("labels", transaction_pb2.Label, labels.add_proto, dumps[1]),
    )


# --- files ------------------------------------------------------------------------------------


def _read_file(
    path: str | os.PathLike[str],
    collector: _Collector[scoring_pb2.ScoredTransaction] | _Collector[transaction_pb2.Label],
    max_records: int | None,
) -> SourceStats:
    name = os.fspath(path)
    stopped_by = "end"
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if max_records is not None and collector.read >= max_records:
                stopped_by = "max_records"
                break
            collector.from_json(line, f"{name} line {number}")
    return SourceStats(
        kind=collector.kind,
        name=name,
        read=collector.read,
        rejected=collector.rejected,
        complete=stopped_by == "end",
        stopped_by=stopped_by,
        first_problem=collector.first_problem,
    )


def load_from_files(
    scores_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    *,
    max_records: int | None = None,
    feature_names: Sequence[str] = FEATURE_NAMES,
) -> LoadedData:
    """Read JSON-lines files of ScoredTransactions and Labels. OSError when one cannot be read;
    ValueError when a file holds no valid message at all (almost surely the wrong file)."""
    scores, labels = ScoreTableBuilder(feature_names), LabelTableBuilder()
    score_collector, label_collector = _collectors(scores, labels)
    sources = (
        _read_file(scores_path, score_collector, max_records),
        _read_file(labels_path, label_collector, max_records),
    )
    for stats in sources:
        if stats.read and stats.rejected == stats.read:
            message = "ScoredTransaction" if stats.kind == "scores" else "Label"
            raise ValueError(
                f"{stats.name}: no valid {message} in {stats.read:,} lines; first problem: "
                f"{stats.first_problem}"
            )
    return LoadedData(scores.build(), labels.build(), sources)


# --- Kafka ------------------------------------------------------------------------------------


async def _partitions(settings: Settings, topic: str, variable: str) -> list[TopicPartition]:
    """The topic's partitions, from the admin API; ConfigError naming the variable if absent."""
    admin = make_admin(settings, client_id="fraudstream-evaluate")
    # start() inside the try: a cancelled start (the other topic's read failed) still closes.
    try:
        await admin.start()
        [description] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    partitions = sorted(p["partition"] for p in description.get("partitions", []))
    if description.get("error_code") or not partitions:
        raise ConfigError(
            f"topic {topic!r} ({variable}) does not exist; `fraudstream topics` creates it"
        )
    return [TopicPartition(topic, p) for p in partitions]


async def read_topic(
    settings: Settings,
    topic: str,
    on_value: Callable[[bytes | None, str], None],
    *,
    max_records: int | None = None,
    timeout_s: float = 120.0,
    variable: str = "topic",
    progress: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> TopicRead:
    """Feed every committed record of `topic`, from the beginning to the end offsets of now,
    to `on_value(value, "topic:partition@offset")`. Stops early after `max_records` records,
    `timeout_s` seconds or when `stop` is set (then `complete` is False). ConfigError if the
    topic is missing."""
    deadline = time.monotonic() + timeout_s
    partitions = await _partitions(settings, topic, variable)
    consumer: AIOKafkaConsumer = make_consumer(
        settings, group_id=None, client_id="fraudstream-evaluate", max_poll_records=_BATCH
    )
    try:
        await consumer.start()
        consumer.assign(partitions)
        begin = await consumer.beginning_offsets(partitions)
        end = await consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, begin[tp])
        available = sum(end[tp] - begin[tp] for tp in partitions)
        remaining = {tp for tp in partitions if end[tp] > begin[tp]}
        read, stopped_by = 0, "end"
        last_progress = time.monotonic()
        while remaining:
            if stop is not None and stop.is_set():
                stopped_by = "stopped"
                break
            if max_records is not None and read >= max_records:
                stopped_by = "max_records"
                break
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                stopped_by = "timeout"
                break
            limit = _BATCH if max_records is None else min(_BATCH, max_records - read)
            batch = await consumer.getmany(
                *remaining, timeout_ms=max(1, int(min(_POLL_MS, left_s * 1000))), max_records=limit
            )
            for tp, records in batch.items():
                for record in records:
                    # Records written after the snapshot of the end offsets are not ours.
                    if record.offset < end[tp]:
                        on_value(record.value, f"{topic}:{tp.partition}@{record.offset}")
                        read += 1
            # Positions, not record offsets: a partition can end in transaction markers,
            # which are never returned as records but do move the position past them.
            for tp in list(remaining):
                if await consumer.position(tp) >= end[tp]:
                    remaining.discard(tp)
            if progress is not None and time.monotonic() - last_progress >= _PROGRESS_EVERY_S:
                last_progress = time.monotonic()
                progress(read)
        return TopicRead(read, stopped_by == "end", stopped_by, available)
    finally:
        await consumer.stop()


async def _read_into(
    settings: Settings,
    topic: str,
    variable: str,
    collector: _Collector[scoring_pb2.ScoredTransaction] | _Collector[transaction_pb2.Label],
    max_records: int | None,
    timeout_s: float,
    progress: Callable[[str], None] | None,
    stop: asyncio.Event,
) -> SourceStats:
    def report(count: int) -> None:
        if progress is not None:
            progress(f"{count:,} records read from {topic} so far")

    done = await read_topic(
        settings,
        topic,
        collector.from_bytes,
        max_records=max_records,
        timeout_s=timeout_s,
        variable=variable,
        progress=report,
        stop=stop,
    )
    return SourceStats(
        kind=collector.kind,
        name=topic,
        read=done.read,
        rejected=collector.rejected,
        complete=done.complete,
        stopped_by=done.stopped_by,
        available=done.available,
        first_problem=collector.first_problem,
    )


def _open_dumps(
    files: ExitStack, dump_dir: str | os.PathLike[str] | None
) -> tuple[TextIO | None, TextIO | None]:
    if dump_dir is None:
        return None, None
    directory = Path(dump_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return (
        files.enter_context(open(directory / SCORES_FILE, "w", encoding="utf-8")),
        files.enter_context(open(directory / LABELS_FILE, "w", encoding="utf-8")),
    )


async def load_from_kafka(
    settings: Settings,
    *,
    max_records: int | None = None,
    timeout_s: float = 120.0,
    dump_dir: str | os.PathLike[str] | None = None,
    feature_names: Sequence[str] = FEATURE_NAMES,
    progress: Callable[[str], None] | None = None,
) -> LoadedData:
    """Read the scores and labels topics (both at once) up to their current end; with
    `dump_dir`, copy every valid message to DIR/scores.jsonl and DIR/labels.jsonl."""
    scores, labels = ScoreTableBuilder(feature_names), LabelTableBuilder()
    with ExitStack() as files:
        dumps = _open_dumps(files, dump_dir)
        score_collector, label_collector = _collectors(scores, labels, dumps)
        topics = settings.topics
        sources = await _both(
            lambda stop: _read_into(
                settings,
                topics.scores,
                "TOPIC_RISK_SCORES",
                score_collector,
                max_records,
                timeout_s,
                progress,
                stop,
            ),
            lambda stop: _read_into(
                settings,
                topics.labels,
                "TOPIC_RISK_LABELS",
                label_collector,
                max_records,
                timeout_s,
                progress,
                stop,
            ),
        )
    return LoadedData(scores.build(), labels.build(), tuple(sources))


async def _both(
    first: Callable[[asyncio.Event], Coroutine[Any, Any, T]],
    second: Callable[[asyncio.Event], Coroutine[Any, Any, T]],
) -> list[T]:
    """Run both reads at once; when one fails, tell the other to stop at its next poll and
    raise the failure once it has. Cancelling it instead could interrupt its clean-up (the
    consumer's stop) and leak connections."""
    stop = asyncio.Event()

    async def run(read: Callable[[asyncio.Event], Coroutine[Any, Any, T]]) -> T:
        try:
            return await read(stop)
        except BaseException:
            stop.set()
            raise

    results = await asyncio.gather(run(first), run(second), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return cast(list[T], results)
