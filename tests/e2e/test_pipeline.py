"""End to end: the four services as real processes on the real broker and Redis.

A seeded simulation with injected fraud (card testing, impossible travel, compromised
terminals and customers) is published to `transactions.raw`; then every transaction must be
scored exactly once, the injected card-testing and impossible-travel bursts must raise alerts,
and the gRPC query service must agree with what was scored.
"""

from __future__ import annotations

import socket
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from protos.fraud.v1 import risk_service_pb2, risk_service_pb2_grpc, scoring_pb2
from shared.config import Settings, load_settings
from shared.kafka import ensure_topics
from shared.run import SERVICES, ServiceProcess, start_service, stop_service
from shared.simulation.generator import FraudScenario, SimulationConfig, generate
from shared.simulation.publisher import publish_simulation, replay_start
from tests.conftest import Infra
from tests.kafka_helpers import consume_committed

REPO = Path(__file__).parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(infra: Infra, suffix: str, query_port: int) -> dict[str, str]:
    topics = {
        "TOPIC_TRANSACTIONS_RAW": "transactions.raw",
        "TOPIC_TRANSACTIONS_VALID": "transactions.valid",
        "TOPIC_TRANSACTIONS_DLQ": "transactions.dlq",
        "TOPIC_RISK_SCORES": "risk.scores",
        "TOPIC_RISK_ALERTS": "risk.alerts",
        "TOPIC_RISK_LABELS": "risk.labels",
    }
    return {
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap,
        "REDIS_URL": infra.redis_url,
        "KAFKA_TOPIC_PARTITIONS": "3",
        "REDIS_KEY_PREFIX": f"e2e{suffix}",
        "FRAUDSTREAM_INSTANCE_ID": f"e2e-{suffix}",
        "INGEST_GROUP_ID": f"ingest-{suffix}",
        "SCORING_GROUP_ID": f"scoring-{suffix}",
        "ALERTING_GROUP_ID": f"alerting-{suffix}",
        "QUERY_LISTEN": f"127.0.0.1:{query_port}",
        "SCORING_MODEL_PATH": str(REPO / "models/default.json"),
        "SCORING_RULES_PATH": str(REPO / "rules/default.toml"),
        "LOG_LEVEL": "INFO",
        **{name: f"{topic}.{suffix}" for name, topic in topics.items()},
    }


class Pipeline:
    def __init__(self, settings: Settings, env: dict[str, str], query_port: int) -> None:
        self.settings = settings
        self.env = env
        self.query_port = query_port
        self.services: list[ServiceProcess] = []


@pytest.fixture
async def pipeline(infra: Infra, tmp_path: Path) -> AsyncIterator[Pipeline]:
    import os

    suffix = uuid.uuid4().hex[:8]
    query_port = _free_port()
    env = {**os.environ, **_environment(infra, suffix, query_port)}
    settings = load_settings(env)
    await ensure_topics(settings)
    running = Pipeline(settings, env, query_port)
    try:
        for name in SERVICES:
            running.services.append(
                await start_service(name, env, tmp_path / "logs", _free_port(), ready_timeout=90)
            )
        yield running
    finally:
        codes = {s.name: await stop_service(s) for s in running.services}
        # SIGTERM is a graceful stop: every service must exit 0 after finishing its batch.
        assert all(code == 0 for code in codes.values()), (
            codes,
            {s.name: s.log_tail() for s in running.services},
        )


async def test_simulated_fraud_flows_through_the_whole_suite(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    prefix = f"e{uuid.uuid4().hex[:6]}"
    config = SimulationConfig(
        seed=11,
        n_customers=250,
        n_terminals=500,
        n_days=6,
        card_testing_bursts_per_day=2.0,
        impossible_travel_per_day=2.0,
    )
    now = datetime.now(UTC)
    published = await publish_simulation(
        settings,
        config,
        rate=None,
        include_labels=True,
        id_prefix=prefix,
        now=now,
    )
    assert published.transactions > 1000

    # Ground truth, regenerated from the seed: which transactions are injected fraud.
    truth = list(generate(replace(config, start=replay_start(now, config.n_days))))
    assert len(truth) == published.transactions
    scenario_of = {f"{prefix}-{t.transaction_id}": t.fraud_scenario for t in truth}
    account_of = {f"{prefix}-{t.transaction_id}": f"{prefix}-{t.account_id}" for t in truth}

    scores = await consume_committed(
        settings, settings.topics.scores, expected=published.transactions, timeout_s=240
    )
    dlq = await consume_committed(settings, settings.topics.dlq, expected=0, timeout_s=5)
    assert dlq == [], [dict(r.headers) for r in dlq[:3]]

    scored: dict[str, scoring_pb2.ScoredTransaction] = {}
    counts: Counter[str] = Counter()
    for record in scores:
        message = scoring_pb2.ScoredTransaction.FromString(record.value)
        counts[message.transaction.transaction_id] += 1
        scored[message.transaction.transaction_id] = message
        assert record.key == message.transaction.account_id.encode()
    # Every transaction scored, exactly once.
    assert set(counts) == set(scenario_of)
    assert max(counts.values()) == 1

    # The injected velocity patterns raise alerts for their accounts.
    alerts = await consume_committed(settings, settings.topics.alerts, expected=1, timeout_s=60)
    alerted_accounts = {scoring_pb2.Alert.FromString(r.value).account_id for r in alerts}
    for scenario in (FraudScenario.CARD_TESTING, FraudScenario.IMPOSSIBLE_TRAVEL):
        injected = {account_of[t] for t, s in scenario_of.items() if s == scenario}
        assert injected, f"the simulation injected no {scenario.name}"
        caught = injected & alerted_accounts
        assert len(caught) >= 0.8 * len(injected), (scenario.name, len(caught), len(injected))

    # Flagged share: fraud is flagged far more often than genuine payments.
    flagged = {
        t
        for t, m in scored.items()
        if m.decision in (scoring_pb2.DECISION_REVIEW, scoring_pb2.DECISION_DECLINE)
    }
    fraud = {t for t, s in scenario_of.items() if s != FraudScenario.GENUINE}
    genuine = set(scenario_of) - fraud
    assert len(flagged & fraud) / len(fraud) > 3 * len(flagged & genuine) / len(genuine)

    # The query service agrees with what was scored.
    latest_by_account: dict[str, scoring_pb2.ScoredTransaction] = {}
    for message in scored.values():
        account = message.transaction.account_id
        current = latest_by_account.get(account)
        if current is None or (
            message.transaction.event_time.ToNanoseconds()
            > current.transaction.event_time.ToNanoseconds()
        ):
            latest_by_account[account] = message
    alerts_per_account: defaultdict[str, int] = defaultdict(int)
    for record in alerts:
        alerts_per_account[scoring_pb2.Alert.FromString(record.value).account_id] += 1

    async with grpc.aio.insecure_channel(f"127.0.0.1:{pipeline.query_port}") as channel:
        stub = risk_service_pb2_grpc.RiskServiceStub(channel)
        quiet_accounts = sorted(set(latest_by_account) - alerted_accounts)
        sample = sorted(alerted_accounts)[:5] + quiet_accounts[:5]
        for account in sample:
            risk = await stub.GetAccountRisk(
                risk_service_pb2.GetAccountRiskRequest(account_id=account), timeout=5
            )
            expected = latest_by_account[account]
            assert risk.latest.transaction_id == expected.transaction.transaction_id
            assert risk.latest.score == pytest.approx(expected.score)
            assert risk.velocity, account
        for account in sorted(alerted_accounts)[:5]:
            listed = await stub.ListAlerts(
                risk_service_pb2.ListAlertsRequest(account_id=account, page_size=100), timeout=5
            )
            assert len(listed.alerts) == alerts_per_account[account]
            assert all(a.account_id == account for a in listed.alerts)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetAccountRisk(
                risk_service_pb2.GetAccountRiskRequest(account_id=f"{prefix}-nobody"), timeout=5
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
