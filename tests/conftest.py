"""Shared test fixtures: one real Kafka broker and one real Redis per test session.

Integration tests get a fresh `settings` each: their own topics, consumer groups and Redis key
prefix, so tests never see each other's data. When KAFKA_BOOTSTRAP_SERVERS / REDIS_URL point at
running servers those are used; otherwise the project's own local infrastructure is started
(`shared.infra`, the same code as `fraudstream infra up`).

Under CI (CI=true) a broker that cannot be started fails the run loudly; integration tests are
never skipped there. Locally, FRAUDSTREAM_SKIP_INTEGRATION=1 skips them on purpose.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from shared.config import Settings, TopicSettings, load_settings
from shared.kafka import ensure_topics, make_admin
from shared.redis_client import make_redis

TEST_PARTITIONS = 3


@dataclass(frozen=True)
class Infra:
    kafka_bootstrap: str
    redis_url: str


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if "/tests/e2e/" in path:
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    if os.environ.get("FRAUDSTREAM_SKIP_INTEGRATION") == "1":
        if _in_ci():
            pytest.fail("FRAUDSTREAM_SKIP_INTEGRATION=1 is not allowed under CI")
        pytest.skip("FRAUDSTREAM_SKIP_INTEGRATION=1")
    from shared.infra import ensure_infra

    try:
        handle = ensure_infra(
            kafka_bootstrap=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
            redis_url=os.environ.get("REDIS_URL"),
        )
    except Exception as e:
        # Never a silent skip: a missing broker is a failure, in CI and locally alike.
        pytest.fail(f"could not start or reach Kafka/Redis for the integration tests: {e}")
    try:
        yield Infra(kafka_bootstrap=handle.kafka_bootstrap, redis_url=handle.redis_url)
    finally:
        handle.stop_started()


def make_test_settings(infra: Infra, **environ: str) -> Settings:
    """Settings whose topics, groups and Redis prefix belong to one test alone."""
    suffix = uuid.uuid4().hex[:10]
    base = load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap,
            "REDIS_URL": infra.redis_url,
            "KAFKA_TOPIC_PARTITIONS": str(TEST_PARTITIONS),
            "METRICS_PORT": "0",
            "LOG_FORMAT": "console",
            "REDIS_KEY_PREFIX": f"t{suffix}",
            "FRAUDSTREAM_INSTANCE_ID": f"test-{suffix}",
            **environ,
        }
    )
    topics = TopicSettings(*(f"{name}.{suffix}" for name in TopicSettings().all()))
    return dataclasses.replace(
        base,
        topics=topics,
        ingest=dataclasses.replace(base.ingest, group_id=f"ingest-{suffix}"),
        scoring=dataclasses.replace(base.scoring, group_id=f"scoring-{suffix}"),
        alerting=dataclasses.replace(base.alerting, group_id=f"alerting-{suffix}"),
    )


@pytest.fixture
async def settings(infra: Infra) -> AsyncIterator[Settings]:
    """Fresh per-test settings with every topic already created (and deleted afterwards, so
    a long session does not leave the broker carrying thousands of partitions)."""
    test_settings = make_test_settings(infra)
    await ensure_topics(test_settings)
    yield test_settings
    admin = make_admin(test_settings)
    await admin.start()
    try:
        await admin.delete_topics(list(test_settings.topics.all()))
    except Exception:  # best effort: a test that deleted its own topics is fine too
        pass
    finally:
        await admin.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = make_redis(settings)
    try:
        yield client
    finally:
        await client.aclose()
