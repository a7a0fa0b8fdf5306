"""Config: defaults work with no environment; every bad value names its variable."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.config import ENV_VARS, load_settings
from shared.errors import ConfigError


def test_defaults_need_no_environment() -> None:
    settings = load_settings({})
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.redis_url == "redis://127.0.0.1:16379/0"
    assert settings.topics.all() == (
        "transactions.raw",
        "transactions.valid",
        "transactions.dlq",
        "risk.scores",
        "risk.alerts",
        "risk.labels",
    )
    assert settings.metrics_port is None
    assert settings.query.auth_tokens == ()


def test_values_are_read_and_typed() -> None:
    settings = load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9093",
            "KAFKA_TOPIC_PARTITIONS": "12",
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_PASSWORD": "secret",
            "TOPIC_RISK_ALERTS": "alerts.v2",
            "METRICS_PORT": "0",
            "SCORING_REVIEW_THRESHOLD": "0.4",
            "SCORING_PIPELINE_DEPTH": "0",
            "QUERY_AUTH_TOKENS": "a, b",
        }
    )
    assert settings.kafka.topic_partitions == 12
    assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert "secret" not in repr(settings.kafka)  # passwords never reach logs
    assert settings.topics.alerts == "alerts.v2"
    assert settings.metrics_port == 0
    assert settings.scoring.review_threshold == 0.4
    assert settings.scoring.pipeline_depth == 0
    assert settings.query.auth_tokens == ("a", "b")


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"KAFKA_TOPIC_PARTITIONS": "six"}, "KAFKA_TOPIC_PARTITIONS"),
        ({"KAFKA_TOPIC_PARTITIONS": "0"}, "KAFKA_TOPIC_PARTITIONS"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "nohostport"}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_BOOTSTRAP_SERVERS": ""}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"METRICS_PORT": "-1"}, "METRICS_PORT"),
        ({"SCORING_REVIEW_THRESHOLD": "1.5"}, "SCORING_REVIEW_THRESHOLD"),
        ({"SCORING_REVIEW_THRESHOLD": "nan"}, "SCORING_REVIEW_THRESHOLD"),
        ({"SCORING_REVIEW_THRESHOLD": "0.9", "SCORING_DECLINE_THRESHOLD": "0.8"}, "SCORING_"),
        ({"TOPIC_RISK_ALERTS": "risk.scores"}, "topic names"),
        ({"QUERY_LISTEN": "localhost"}, "QUERY_LISTEN"),
        ({"QUERY_TLS_CERT": "/tmp/cert.pem"}, "QUERY_TLS_KEY"),
        ({"QUERY_FAILURE_POLICY": "maybe"}, "QUERY_FAILURE_POLICY"),
        ({"SCORING_PIPELINE_DEPTH": "-1"}, "SCORING_PIPELINE_DEPTH"),
        ({"SCORING_PIPELINE_DEPTH": "9"}, "SCORING_PIPELINE_DEPTH=9 must be at most 8"),
        ({"SCORING_PIPELINE_DEPTH": "two"}, "SCORING_PIPELINE_DEPTH"),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], names: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(names)):
        load_settings(environ)


def test_readme_documents_every_variable() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [name for name in ENV_VARS if f"`{name}`" not in readme]
    assert missing == []
