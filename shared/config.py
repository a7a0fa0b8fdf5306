"""One frozen settings object for every fraudstream process, built from environment variables.

Every variable has a local default, so `python -m services.scoring` on a laptop with
`fraudstream infra up` running needs no configuration at all. A malformed value fails at start
with a `ConfigError` naming the variable, the value and what was expected: a service never runs
on a half-understood configuration.

`ENV_VARS` documents every variable (the README's table is checked against it by a test).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from shared.errors import ConfigError

__all__ = [
    "ENV_VARS",
    "AlertingSettings",
    "IngestSettings",
    "KafkaSettings",
    "QuerySettings",
    "ScoringSettings",
    "Settings",
    "TopicSettings",
    "load_settings",
]

T = TypeVar("T")

# name -> (default, description). The single source for defaults and for the README table.
ENV_VARS: dict[str, tuple[str, str]] = {
    # Kafka connection
    "KAFKA_BOOTSTRAP_SERVERS": ("127.0.0.1:19092", "Kafka bootstrap servers, comma separated"),
    "KAFKA_SECURITY_PROTOCOL": (
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    ),
    "KAFKA_SASL_MECHANISM": ("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*)"),
    "KAFKA_SASL_USERNAME": ("", "SASL user name"),
    "KAFKA_SASL_PASSWORD": ("", "SASL password"),
    "KAFKA_SSL_CAFILE": ("", "CA bundle to verify the brokers (with SSL / SASL_SSL)"),
    "KAFKA_SSL_CERTFILE": ("", "client certificate for mutual TLS"),
    "KAFKA_SSL_KEYFILE": ("", "client private key for mutual TLS"),
    "KAFKA_TOPIC_PARTITIONS": ("6", "partitions of every topic created by the topic bootstrap"),
    "KAFKA_TOPIC_REPLICATION": ("1", "replication factor of created topics (3 in production)"),
    "FRAUDSTREAM_INSTANCE_ID": (
        "<hostname>",
        "stable per-instance id; part of transactional ids so a restart fences its predecessor",
    ),
    # Topics
    "TOPIC_TRANSACTIONS_RAW": ("transactions.raw", "producers publish here"),
    "TOPIC_TRANSACTIONS_VALID": ("transactions.valid", "validated, deduplicated transactions"),
    "TOPIC_TRANSACTIONS_DLQ": ("transactions.dlq", "rejected input, original bytes + error"),
    "TOPIC_RISK_SCORES": ("risk.scores", "ScoredTransaction per transaction"),
    "TOPIC_RISK_ALERTS": ("risk.alerts", "Alerts for case management"),
    "TOPIC_RISK_LABELS": ("risk.labels", "fraud labels (chargebacks, analyst verdicts)"),
    # Redis
    "REDIS_URL": ("redis://127.0.0.1:16379/0", "Redis URL (redis:// or rediss://)"),
    "REDIS_KEY_PREFIX": ("fs", "prefix of every Redis key (isolates tests and training)"),
    # Logging and metrics
    "LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING or ERROR"),
    "LOG_FORMAT": ("auto", "json, console, or auto (console on a terminal, JSON otherwise)"),
    "METRICS_PORT": (
        "<per service>",
        "Prometheus port; 0 disables (ingest 9101, scoring 9102, alerting 9103, query 9104)",
    ),
    # Ingest
    "INGEST_GROUP_ID": ("fraudstream-ingest", "consumer group of the ingest service"),
    "INGEST_MAX_AMOUNT_MINOR": ("100000000", "largest accepted amount in minor units"),
    "INGEST_MAX_FUTURE_SKEW_S": ("300", "event_time may be at most this far in the future"),
    "INGEST_MAX_AGE_S": ("2592000", "event_time may be at most this old (retention, 30 d)"),
    "INGEST_DEDUP_WINDOW_S": ("86400", "producer retries with the same transaction_id dropped"),
    "INGEST_BATCH_MAX": ("500", "records per batch (one Redis pipeline, one Kafka transaction)"),
    # Scoring
    "SCORING_GROUP_ID": ("fraudstream-scoring", "consumer group of the scoring service"),
    "SCORING_RULES_PATH": ("rules/default.toml", "rules file, reloaded on change"),
    "SCORING_MODEL_PATH": ("models/default.json", "model artifact, reloaded on change"),
    "SCORING_REVIEW_THRESHOLD": ("0.5", "score at or above which a transaction is REVIEW"),
    "SCORING_DECLINE_THRESHOLD": ("0.85", "score at or above which a transaction is DECLINE"),
    "SCORING_LABEL_DELAY_S": ("604800", "labels count for terminal risk only after this delay"),
    "SCORING_BATCH_MAX": ("1000", "records per batch"),
    "SCORING_PIPELINE_DEPTH": (
        "2",
        "batches scored and committed while the next is read and its velocity applied (0-8)",
    ),
    # Alerting
    "ALERTING_GROUP_ID": ("fraudstream-alerting", "consumer group of the alerting service"),
    "ALERT_POLICY": (
        "DECLINE=HIGH,REVIEW=MEDIUM,score>=0.3=LOW",
        "which decisions and score bands alert, at what severity",
    ),
    "ALERT_SUPPRESSION_WINDOW_S": ("600", "one alert per (account, reason) per window"),
    "ALERT_RECENT_PER_ACCOUNT": ("100", "recent alerts kept per account"),
    "ALERT_STREAM_MAXLEN": ("100000", "alerts kept in the global alert stream"),
    "ALERT_WEBHOOK_URL": ("", "POST each alert as JSON here (empty: no webhook)"),
    "ALERT_WEBHOOK_TIMEOUT_S": ("2.0", "webhook request timeout"),
    "ALERT_WEBHOOK_QUEUE_MAX": ("10000", "alerts queued for the webhook before dropping"),
    # Query
    "QUERY_LISTEN": ("127.0.0.1:50051", "gRPC listen address (host:port)"),
    "QUERY_FAILURE_POLICY": (
        "fail_open",
        "fail_open (APPROVE) or fail_closed_review / "
        "fail_closed_decline when Redis is slow or down",
    ),
    "QUERY_REDIS_TIMEOUT_MS": ("50", "Redis budget of one check when the caller sets no deadline"),
    "QUERY_TLS_CERT": ("", "server certificate (PEM); TLS is on when cert and key are set"),
    "QUERY_TLS_KEY": ("", "server private key (PEM)"),
    "QUERY_AUTH_TOKENS": ("", "comma separated bearer tokens; empty: no auth"),
}


class _Env:
    """Reads typed values from an environment mapping, naming the variable on any error."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, name: str, default: str | None = None) -> str:
        if default is None:
            default = ENV_VARS[name][0]
        return str(self._environ.get(name, default)).strip()

    def _parse(self, name: str, kind: str, parse: Callable[[str], T], default: str | None) -> T:
        raw = self.text(name, default)
        try:
            return parse(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a valid {kind}") from None

    def integer(self, name: str, *, minimum: int | None = None, default: str | None = None) -> int:
        value = self._parse(name, "integer", int, default)
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}={value} must be at least {minimum}")
        return value

    def number(self, name: str, *, low: float | None = None, high: float | None = None) -> float:
        value = self._parse(name, "number", float, None)
        too_low = low is not None and value < low
        too_high = high is not None and value > high
        if value != value or too_low or too_high:
            raise ConfigError(f"{name}={value} must be within [{low}, {high}]")
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.text(name)
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
        return value


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    topic_partitions: int = 6
    topic_replication: int = 1


@dataclass(frozen=True)
class TopicSettings:
    raw: str = "transactions.raw"
    valid: str = "transactions.valid"
    dlq: str = "transactions.dlq"
    scores: str = "risk.scores"
    alerts: str = "risk.alerts"
    labels: str = "risk.labels"

    def all(self) -> tuple[str, ...]:
        return (self.raw, self.valid, self.dlq, self.scores, self.alerts, self.labels)


@dataclass(frozen=True)
class IngestSettings:
    group_id: str = "fraudstream-ingest"
    max_amount_minor: int = 100_000_000
    max_future_skew_s: int = 300
    max_age_s: int = 30 * 86400
    dedup_window_s: int = 86400
    batch_max: int = 500


@dataclass(frozen=True)
class ScoringSettings:
    group_id: str = "fraudstream-scoring"
    rules_path: str = "rules/default.toml"
    model_path: str = "models/default.json"
    review_threshold: float = 0.5
    decline_threshold: float = 0.85
    label_delay_s: int = 7 * 86400
    batch_max: int = 1000
    pipeline_depth: int = 2


@dataclass(frozen=True)
class AlertingSettings:
    group_id: str = "fraudstream-alerting"
    policy: str = "DECLINE=HIGH,REVIEW=MEDIUM,score>=0.3=LOW"
    suppression_window_s: int = 600
    recent_per_account: int = 100
    stream_maxlen: int = 100_000
    webhook_url: str = ""
    webhook_timeout_s: float = 2.0
    webhook_queue_max: int = 10_000


@dataclass(frozen=True)
class QuerySettings:
    listen: str = "127.0.0.1:50051"
    failure_policy: str = "fail_open"
    redis_timeout_ms: int = 50
    tls_cert: str = ""
    tls_key: str = ""
    auth_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings
    topics: TopicSettings
    redis_url: str
    redis_key_prefix: str
    instance_id: str
    log_level: str
    log_format: str
    metrics_port: int | None  # None: the service's own default
    ingest: IngestSettings
    scoring: ScoringSettings
    alerting: AlertingSettings
    query: QuerySettings


# Each batch in flight holds its records and outputs in memory and is read again if an earlier
# one fails; past a few, nothing more overlaps (one Redis, one Python thread).
MAX_PIPELINE_DEPTH = 8


def _pipeline_depth(env: _Env, name: str) -> int:
    depth = env.integer(name, minimum=0)
    if depth > MAX_PIPELINE_DEPTH:
        raise ConfigError(f"{name}={depth} must be at most {MAX_PIPELINE_DEPTH}")
    return depth


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from `environ` (default: os.environ); raise ConfigError on bad values."""
    env = _Env(os.environ if environ is None else environ)
    kafka = KafkaSettings(
        bootstrap_servers=env.text("KAFKA_BOOTSTRAP_SERVERS"),
        security_protocol=env.choice(
            "KAFKA_SECURITY_PROTOCOL", ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        ),
        sasl_mechanism=env.text("KAFKA_SASL_MECHANISM"),
        sasl_username=env.text("KAFKA_SASL_USERNAME"),
        sasl_password=env.text("KAFKA_SASL_PASSWORD"),
        ssl_cafile=env.text("KAFKA_SSL_CAFILE"),
        ssl_certfile=env.text("KAFKA_SSL_CERTFILE"),
        ssl_keyfile=env.text("KAFKA_SSL_KEYFILE"),
        topic_partitions=env.integer("KAFKA_TOPIC_PARTITIONS", minimum=1),
        topic_replication=env.integer("KAFKA_TOPIC_REPLICATION", minimum=1),
    )
    if not kafka.bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS is empty: give host:port[,host:port...]")
    for server in kafka.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap_servers!r}: {server!r} is not host:port"
            )
    if kafka.security_protocol.startswith("SASL") and kafka.sasl_mechanism not in (
        "PLAIN",
        "SCRAM-SHA-256",
        "SCRAM-SHA-512",
    ):
        raise ConfigError(
            f"KAFKA_SASL_MECHANISM={kafka.sasl_mechanism!r} must be PLAIN, SCRAM-SHA-256 or "
            f"SCRAM-SHA-512 with KAFKA_SECURITY_PROTOCOL={kafka.security_protocol}"
        )
    topics = TopicSettings(
        raw=env.text("TOPIC_TRANSACTIONS_RAW"),
        valid=env.text("TOPIC_TRANSACTIONS_VALID"),
        dlq=env.text("TOPIC_TRANSACTIONS_DLQ"),
        scores=env.text("TOPIC_RISK_SCORES"),
        alerts=env.text("TOPIC_RISK_ALERTS"),
        labels=env.text("TOPIC_RISK_LABELS"),
    )
    if len(set(topics.all())) != len(topics.all()) or not all(topics.all()):
        raise ConfigError(f"topic names must be distinct and non-empty: {topics.all()}")

    redis_url = env.text("REDIS_URL")
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"REDIS_URL={redis_url!r} must start with redis://, rediss:// or unix://")

    metrics_raw = env.text("METRICS_PORT", "")
    metrics_port = None if metrics_raw == "" else env.integer("METRICS_PORT", minimum=0, default="")

    review = env.number("SCORING_REVIEW_THRESHOLD", low=0.0, high=1.0)
    decline = env.number("SCORING_DECLINE_THRESHOLD", low=0.0, high=1.0)
    if review > decline:
        raise ConfigError(
            f"SCORING_REVIEW_THRESHOLD={review} must not exceed SCORING_DECLINE_THRESHOLD={decline}"
        )
    listen = env.text("QUERY_LISTEN")
    if not listen.rpartition(":")[2].isdigit():
        raise ConfigError(f"QUERY_LISTEN={listen!r} must be host:port")
    tls_cert, tls_key = env.text("QUERY_TLS_CERT"), env.text("QUERY_TLS_KEY")
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("QUERY_TLS_CERT and QUERY_TLS_KEY must be set together")

    return Settings(
        kafka=kafka,
        topics=topics,
        redis_url=redis_url,
        redis_key_prefix=env.text("REDIS_KEY_PREFIX"),
        instance_id=env.text("FRAUDSTREAM_INSTANCE_ID", socket.gethostname()),
        log_level=env.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR")),
        log_format=env.choice("LOG_FORMAT", ("auto", "json", "console")),
        metrics_port=metrics_port,
        ingest=IngestSettings(
            group_id=env.text("INGEST_GROUP_ID"),
            max_amount_minor=env.integer("INGEST_MAX_AMOUNT_MINOR", minimum=1),
            max_future_skew_s=env.integer("INGEST_MAX_FUTURE_SKEW_S", minimum=0),
            max_age_s=env.integer("INGEST_MAX_AGE_S", minimum=1),
            dedup_window_s=env.integer("INGEST_DEDUP_WINDOW_S", minimum=1),
            batch_max=env.integer("INGEST_BATCH_MAX", minimum=1),
        ),
        scoring=ScoringSettings(
            group_id=env.text("SCORING_GROUP_ID"),
            rules_path=env.text("SCORING_RULES_PATH"),
            model_path=env.text("SCORING_MODEL_PATH"),
            review_threshold=review,
            decline_threshold=decline,
            label_delay_s=env.integer("SCORING_LABEL_DELAY_S", minimum=0),
            batch_max=env.integer("SCORING_BATCH_MAX", minimum=1),
            pipeline_depth=_pipeline_depth(env, "SCORING_PIPELINE_DEPTH"),
        ),
        alerting=AlertingSettings(
            group_id=env.text("ALERTING_GROUP_ID"),
            policy=env.text("ALERT_POLICY"),
            suppression_window_s=env.integer("ALERT_SUPPRESSION_WINDOW_S", minimum=1),
            recent_per_account=env.integer("ALERT_RECENT_PER_ACCOUNT", minimum=1),
            stream_maxlen=env.integer("ALERT_STREAM_MAXLEN", minimum=1),
            webhook_url=env.text("ALERT_WEBHOOK_URL"),
            webhook_timeout_s=env.number("ALERT_WEBHOOK_TIMEOUT_S", low=0.001, high=600.0),
            webhook_queue_max=env.integer("ALERT_WEBHOOK_QUEUE_MAX", minimum=1),
        ),
        query=QuerySettings(
            listen=listen,
            failure_policy=env.choice(
                "QUERY_FAILURE_POLICY", ("fail_open", "fail_closed_review", "fail_closed_decline")
            ),
            redis_timeout_ms=env.integer("QUERY_REDIS_TIMEOUT_MS", minimum=1),
            tls_cert=tls_cert,
            tls_key=tls_key,
            auth_tokens=tuple(t.strip() for t in env.text("QUERY_AUTH_TOKENS").split(",") if t),
        ),
    )
