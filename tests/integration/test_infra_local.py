"""shared.infra against the real programs: redis-server and a Kafka broker on free ports.

These start servers of their own, beside (never instead of) the session's shared broker, so they
use free ports and a temporary folder. A warm Kafka start takes a few seconds.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shared import infra
from shared.infra import (
    LocalKafka,
    LocalRedis,
    PortInUseError,
    ServerStartError,
    UnreachableServerError,
    ensure_infra,
    redis_ping,
)

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _free_port_pair() -> int:
    """A port whose successor is free too (Kafka's controller listens on port + 1)."""
    for _ in range(100):
        port = _free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    # The default folder under the cache root, where ensure_infra(cache_root=...) looks too.
    server = LocalRedis(_free_port(), cache_root=tmp_path, progress=print)
    try:
        yield server
    finally:
        server.stop()


def test_redis_starts_answers_ping_and_stops(redis_server: LocalRedis) -> None:
    assert redis_server.start() is True
    assert redis_ping("127.0.0.1", redis_server.port)
    status = redis_server.status()
    assert status.running and status.pid is not None
    assert redis_server.pid_path.read_text().strip() == str(status.pid)

    assert redis_server.stop() is True
    assert not redis_ping("127.0.0.1", redis_server.port)
    assert not redis_server.status().running
    assert not redis_server.pid_path.exists()
    assert redis_server.stop() is False  # stopping twice is fine


def test_a_running_local_server_is_reused_and_left_running(
    redis_server: LocalRedis, tmp_path: Path
) -> None:
    redis_server.start()
    # Another process (a new object, as after `infra up`) finds it through the pid file.
    again = LocalRedis(redis_server.port, cache_root=tmp_path)
    assert again.start() is False

    found = ensure_infra(
        "127.0.0.1:1",  # Kafka given: only Redis is managed here
        environ={},
        redis_port=redis_server.port,
        cache_root=tmp_path,
        verify_external=False,
    )
    assert found.redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert found.redis_origin == "reused"
    assert found.started == ()
    found.stop_started()
    assert redis_ping("127.0.0.1", redis_server.port)  # not ours to stop


def test_ensure_infra_stops_what_it_started(tmp_path: Path) -> None:
    port = _free_port()
    with ensure_infra(
        "127.0.0.1:1",
        environ={},
        redis_port=port,
        run_dir=tmp_path,
        cache_root=tmp_path,
        verify_external=False,
    ) as found:
        assert found.redis_origin == "started"
        assert redis_ping("127.0.0.1", port)
    assert not redis_ping("127.0.0.1", port)


def test_a_port_held_by_a_stranger_is_refused(tmp_path: Path) -> None:
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        port = stranger.getsockname()[1]
        server = LocalRedis(port, tmp_path / "redis", cache_root=tmp_path)
        with pytest.raises(PortInUseError, match=f"127.0.0.1:{port} is in use"):
            server.start()
        assert "held by another process" in server.status().detail


class _BrokenRedis(LocalRedis):
    """A redis-server given a directive it does not know: it exits at once."""

    def _prepare(self) -> list[str]:
        return [*super()._prepare(), "--no-such-directive", "yes"]


def test_a_server_that_exits_during_start_reports_its_log(tmp_path: Path) -> None:
    server = _BrokenRedis(_free_port(), tmp_path / "redis", cache_root=tmp_path)
    with pytest.raises(ServerStartError, match="stopped during start") as caught:
        server.start()
    assert "no-such-directive" in caught.value.log_tail
    assert not server.pid_path.exists()


def test_configured_servers_must_accept_connections(tmp_path: Path) -> None:
    closed = _free_port()
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]

        environ = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{closed}"}
        with pytest.raises(UnreachableServerError, match=f"SERVERS=127.0.0.1:{closed} does not"):
            ensure_infra(environ=environ, cache_root=tmp_path)
        with pytest.raises(UnreachableServerError, match=f"Redis at redis://127.0.0.1:{closed}"):
            ensure_infra(f"127.0.0.1:{port}", f"redis://127.0.0.1:{closed}/0", cache_root=tmp_path)

        found = ensure_infra(f"127.0.0.1:{port}", f"redis://127.0.0.1:{port}/0", environ={})
        assert found.kafka_origin == found.redis_origin == "argument"
        assert found.started == ()


async def _create_and_list_topic(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic("infra-check", num_partitions=2, replication_factor=1)])
        topics: list[str] = await admin.list_topics()
        return topics
    finally:
        await admin.close()


def test_kafka_up_status_reuse_and_down_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kafka_port, redis_port = _free_port_pair(), _free_port()
    options = ["--kafka-port", str(kafka_port), "--redis-port", str(redis_port)]
    options += ["--data-dir", str(tmp_path)]
    kafka = LocalKafka(kafka_port, tmp_path / f"kafka-{kafka_port}")
    try:
        assert infra.main(["up", *options]) == 0
        assert f"export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{kafka_port}" in capsys.readouterr().out
        assert infra.main(["status", *options]) == 0

        # A real client sees a working broker that creates topics on request only.
        topics = asyncio.run(_create_and_list_topic(kafka.bootstrap))
        assert "infra-check" in topics
        assert kafka.start() is False  # found running through its pid file: reused
        assert infra.main(["up", *options]) == 0
        assert "kafka already running" in capsys.readouterr().out
    finally:
        assert infra.main(["down", *options]) == 0
    assert infra.main(["status", *options]) == 1
    assert not kafka.status().running
