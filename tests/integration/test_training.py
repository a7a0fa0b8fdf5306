"""`fraudstream train` against real Redis: an isolated, cleaned-up namespace, a loadable
artifact, and training features that are exactly the live service's for the same history.

The equality test replays one small simulated history twice: through `shared.training.replay`
(training) and through the live service's own transform and label processor (scoring), each in
its own Redis namespace, with the labels arriving at the same moments; the two feature matrices
must be equal to the bit."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord

from protos.fraud.v1 import scoring_pb2
from services.scoring.labels import LabelProcessor
from services.scoring.service import ScoringService
from shared.config import Settings
from shared.redis_client import make_redis
from shared.scoring.assessments import AssessmentStore
from shared.scoring.engine import ScoringEngine, transaction_records
from shared.scoring.features import FEATURE_NAMES
from shared.scoring.model import ModelArtifact, load_model, save_model
from shared.scoring.velocity import VelocityStore
from shared.simulation.generator import (
    SimLabel,
    SimTransaction,
    SimulationConfig,
    generate,
    interleave_labels,
    write_jsonl,
)
from shared.simulation.publisher import label_to_proto, transaction_to_proto
from shared.training import build_parser, replay, train
from shared.validation import ValidationLimits, validate_transaction

REPO = Path(__file__).resolve().parents[2]
DELAY = timedelta(days=2)  # short, so labels reach the terminal features within the history


def small_world(days: int = 12, seed: int = 5) -> SimulationConfig:
    # Few terminals, so each sees many payments and the compromised ones many frauds.
    return SimulationConfig(
        seed=seed,
        n_customers=60,
        n_terminals=40,
        n_days=days,
        start=datetime(2018, 4, 1, tzinfo=UTC),
        label_delay=DELAY,
    )


def with_delay(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        scoring=dataclasses.replace(
            settings.scoring,
            label_delay_s=int(DELAY.total_seconds()),
            rules_path=str(REPO / "rules" / "default.toml"),
        ),
    )


async def keys_under(redis: aioredis.Redis, prefix: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]


@pytest.fixture(autouse=True)
async def _clean_redis(settings: Settings) -> Any:
    yield
    client = make_redis(settings)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_key_prefix}*")]
        for start in range(0, len(keys), 500):
            await client.unlink(*keys[start : start + 500])
    finally:
        await client.aclose()


# --- the features are the live service's ------------------------------------------------------


def valid_bytes(sim: SimTransaction) -> bytes:
    """What ingest would put on transactions.valid for this payment."""
    message = transaction_to_proto(sim)
    event_s = message.event_time.seconds + message.event_time.nanos / 1e9
    validate_transaction(message, ValidationLimits(), event_s + 1.0, in_place=True)
    return message.SerializeToString(deterministic=True)


async def live_features(
    settings: Settings, redis: aioredis.Redis, txs: list[SimTransaction], tmp_path: Path
) -> dict[str, list[float]]:
    """The features the live service publishes for `txs`, with every label (fraud or not)
    delivered `DELAY` after its transaction, as the simulator publishes them."""
    model = tmp_path / "model.json"
    save_model(_zero_model(), model)
    live = dataclasses.replace(
        settings,
        redis_key_prefix=settings.redis_key_prefix + "live",
        scoring=dataclasses.replace(settings.scoring, model_path=str(model)),
    )
    velocity = VelocityStore.from_settings(redis, live)
    assessments = AssessmentStore.from_settings(redis, live)
    service = ScoringService(
        topics=live.topics,
        engine=ScoringEngine.from_settings(live.scoring),
        velocity=velocity,
        assessments=assessments,
    )
    labels = LabelProcessor(velocity=velocity, assessments=assessments)
    features: dict[str, list[float]] = {}
    pending: list[ConsumerRecord] = []
    kind = ""

    async def flush() -> None:
        nonlocal pending
        if kind == "tx" and pending:
            for output in await service.transform(pending):
                scored = scoring_pb2.ScoredTransaction.FromString(output.value)
                features[scored.transaction.transaction_id] = [
                    scored.features[name] for name in FEATURE_NAMES
                ]
        elif kind == "label" and pending:
            await labels.process(pending)
        pending = []

    for offset, (_, item) in enumerate(interleave_labels(txs, DELAY)):
        this = "label" if isinstance(item, SimLabel) else "tx"
        if this != kind or len(pending) >= 300:
            await flush()
            kind = this
        if isinstance(item, SimLabel):
            value = label_to_proto(item).SerializeToString()
        else:
            value = valid_bytes(item)
        pending.append(
            ConsumerRecord(live.topics.valid, 0, offset, 1, 0, b"", value, None, len(value), 0, [])
        )
    await flush()
    return features


def _zero_model() -> ModelArtifact:
    d = len(FEATURE_NAMES)
    return ModelArtifact(
        version="zero",
        feature_names=FEATURE_NAMES,
        mean=np.zeros(d),
        scale=np.ones(d),
        weights=np.zeros(d),
        bias=-3.0,
        trained_at="2026-11-25T00:00:00+00:00",
    )


async def test_training_replay_features_equal_the_live_services(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    settings = with_delay(settings)
    txs = list(generate(small_world()))
    assert sum(t.is_fraud for t in txs) > 20, "the world must have fraud for labels to matter"

    store = VelocityStore.from_settings(redis, settings, namespace="train-equality")
    try:
        trained = await replay(txs, store, label_delay=DELAY, batch_size=500)
    finally:
        await store.clear()
    assert trained.fraud_labels_applied > 0
    assert len(trained) == len(txs)

    live = await live_features(settings, redis, txs, tmp_path)
    assert len(live) == len(txs)
    live_matrix = np.array([live[tid] for tid in trained.transaction_ids])
    # Bit for bit: the same code computed both (NaN never occurs in these features).
    np.testing.assert_array_equal(trained.features, live_matrix)
    # And the labels did reach the terminal features on both sides.
    risk = FEATURE_NAMES.index("terminal_risk_7d")
    assert (trained.features[:, risk] > 0).sum() > 10


async def test_out_of_order_input_is_refused(settings: Settings, redis: aioredis.Redis) -> None:
    txs = list(generate(small_world(days=2)))
    shuffled = [txs[1], txs[0], *txs[2:]]
    store = VelocityStore.from_settings(redis, settings, namespace="train-order")
    try:
        with pytest.raises(Exception, match="event-time order"):
            await replay(shuffled, store, label_delay=DELAY)
    finally:
        await store.clear()


def test_records_of_the_replay_are_the_live_conversion() -> None:
    (sim,) = list(generate(small_world(days=1)))[:1]
    message = transaction_to_proto(sim)
    (record,) = transaction_records([message])
    assert record.amount == sim.amount_minor / 100
    assert record.event_ms == int(sim.event_time.timestamp() * 1000)


# --- the command: isolated namespace, cleaned, live state untouched ---------------------------


async def test_train_command_isolates_and_cleans_its_namespace(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    settings = with_delay(settings)
    prefix = settings.redis_key_prefix
    # Live state that must survive untouched: an account's velocity and a foreign key.
    live_store = VelocityStore.from_settings(redis, settings)
    (sample,) = transaction_records([transaction_to_proto(next(iter(generate(small_world()))))])
    await live_store.apply_batch([sample])
    await redis.set(f"{prefix}:sentinel", b"keep me")
    before = sorted(await keys_under(redis, prefix))
    snapshot = await live_store.snapshot(sample.account_id, sample.event_ms)

    output = tmp_path / "model.json"
    words = [
        "--simulate-days",
        "24",
        "--customers",
        "150",
        "--terminals",
        "200",
        "--seed",
        "3",
        "--label-delay-days",
        "2",
        "--validation-days",
        "5",
        "--output",
        str(output),
    ]
    args = build_parser().parse_args(words)
    run = await train(args, settings, command_line="fraudstream train " + " ".join(words))
    save_model(run.artifact, output)

    # The artifact loads with the live feature names and carries its provenance.
    model = load_model(output, FEATURE_NAMES)
    assert model.feature_names == FEATURE_NAMES
    metrics = model.training_metrics
    for name in ("auc_roc", "average_precision", "validation_auc_roc"):
        assert 0.5 < metrics[name] <= 1.0, name
    assert "validation_average_precision" in metrics
    meta = cast(dict[str, Any], model.metadata)
    assert meta["command"] == "fraudstream train " + " ".join(words)
    assert meta["source"]["kind"] == "simulation" and meta["source"]["seed"] == 3
    assert meta["seed"] == 3
    assert meta["split"] == {
        "burn_in_days": 3,
        "train_days": 14,
        "gap_days": 2,
        "validation_days": 5,
    }

    # The training namespace is gone; the live one is exactly as it was.
    assert run.namespace.startswith(f"{prefix}:train-")
    assert run.keys_cleared > 0
    assert await keys_under(redis, run.namespace) == []
    assert sorted(await keys_under(redis, prefix)) == before
    assert await live_store.snapshot(sample.account_id, sample.event_ms) == snapshot
    assert await redis.get(f"{prefix}:sentinel") == b"keep me"


async def test_train_command_line_from_a_file(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """The real command in a subprocess: reads a simulator file, writes the artifact, exits 0,
    and records the file's digest."""
    history = tmp_path / "history.jsonl"
    write_jsonl(generate(small_world(days=20, seed=9)), history)
    output = tmp_path / "model.json"
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "SCORING_LABEL_DELAY_S": str(int(DELAY.total_seconds())),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.cli",
        "train",
        "--input",
        str(history),
        "--validation-days",
        "4",
        "--output",
        str(output),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), timeout=240)
    assert process.returncode == 0, err.decode()[-3000:]
    assert "train: wrote" in err.decode()
    document = json.loads(output.read_text())
    assert document["metadata"]["source"]["kind"] == "jsonl"
    assert len(document["metadata"]["source"]["sha256"]) == 64
    assert document["metadata"]["command"].startswith("fraudstream train --input ")
    load_model(output, FEATURE_NAMES)
    assert await keys_under(redis, f"{settings.redis_key_prefix}:train-*") == []
