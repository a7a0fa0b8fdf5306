"""shared.infra without starting anything: configuration, cache rules, missing programs, CLI."""

from __future__ import annotations

import argparse
import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from shared import infra
from shared.infra import (
    DEFAULT_KAFKA_PORT,
    JARS_MARKER,
    KAFKA_VERSION,
    LocalKafka,
    LocalRedis,
    ServerStartError,
    ToolNotFoundError,
    ensure_infra,
    ensure_kafka_jars,
    kafka_libs_dir,
)


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {key: value for key, value in pairs}


@pytest.fixture
def no_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A PATH with nothing on it (and no JAVA_HOME): every program lookup fails."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    return empty


def _fake_program(folder: Path, name: str) -> None:
    program = folder / name
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(program.stat().st_mode | stat.S_IXUSR)


def _cache_jars(cache_root: Path) -> Path:
    libs = kafka_libs_dir(cache_root)
    libs.mkdir(parents=True)
    (libs / JARS_MARKER).write_text(f"kafka_2.13-{KAFKA_VERSION}.jar\n")
    return libs


def test_server_properties_run_one_combined_node_on_loopback(tmp_path: Path) -> None:
    kafka = LocalKafka(29092, tmp_path / "kafka", cache_root=tmp_path)
    props = _properties(kafka.server_properties())

    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:29093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert props["log.dirs"] == str((tmp_path / "kafka" / "kraft-combined-logs").resolve())
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"


def test_server_properties_satisfy_every_internal_topic_with_one_replica(tmp_path: Path) -> None:
    props = _properties(LocalKafka(cache_root=tmp_path).server_properties())

    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    ):
        assert props[key] == "1", key


def test_default_ports_and_folders_follow_the_cache_root(tmp_path: Path) -> None:
    kafka, redis = LocalKafka(cache_root=tmp_path), LocalRedis(cache_root=tmp_path)

    assert kafka.bootstrap == f"127.0.0.1:{DEFAULT_KAFKA_PORT}"
    assert kafka.controller_port == DEFAULT_KAFKA_PORT + 1
    assert kafka.data_dir == (tmp_path / "run" / "kafka-19092").resolve()
    assert redis.url == "redis://127.0.0.1:16379/0"
    assert redis.data_dir == (tmp_path / "run" / "redis-16379").resolve()


def test_cache_root_comes_from_the_environment_or_the_repository(tmp_path: Path) -> None:
    assert infra.default_cache_root({"FRAUDSTREAM_CACHE_DIR": str(tmp_path)}) == tmp_path
    assert infra.default_cache_root({}) == Path(infra.__file__).resolve().parent.parent / ".cache"


def test_the_pom_pins_the_kafka_version_this_module_expects() -> None:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.parse(infra.KAFKA_POM).getroot()
    properties = pom.find("m:properties", ns)
    assert properties is not None
    assert properties.findtext("m:kafka.version", namespaces=ns) == KAFKA_VERSION
    artifacts = {
        d.findtext("m:artifactId", namespaces=ns) for d in pom.iter(f"{{{ns['m']}}}dependency")
    }
    # Kafka 4 logs through SLF4J 1.7: the slf4j2 binding would leave the broker silent.
    assert {"kafka_2.13", "slf4j-api", "log4j-core", "log4j-slf4j-impl"} <= artifacts
    assert "log4j-slf4j2-impl" not in artifacts


def test_the_broker_log_config_logs_info_to_stdout() -> None:
    text = infra.KAFKA_LOG4J_CONFIG.read_text()
    assert re.search(r"^rootLogger\.level\s*=\s*INFO$", text, re.MULTILINE)
    assert re.search(r"^appender\.console\.target\s*=\s*SYSTEM_OUT$", text, re.MULTILINE)


def test_cluster_ids_look_like_kafkas_own() -> None:
    ids = {infra._new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id)
        assert not cluster_id.startswith("-")


def test_missing_java_names_the_install_command(no_tools: Path, tmp_path: Path) -> None:
    with pytest.raises(ToolNotFoundError, match=r"apt-get install -y openjdk-17-jre-headless"):
        LocalKafka(cache_root=tmp_path).start()


def test_missing_redis_server_names_the_install_command(no_tools: Path, tmp_path: Path) -> None:
    redis = LocalRedis(cache_root=tmp_path)
    with pytest.raises(ToolNotFoundError, match=r"apt-get install -y redis-server") as caught:
        redis.start()
    assert caught.value.tool == "redis-server"
    assert not redis.data_dir.exists()  # failed before touching anything


def test_mvn_is_needed_only_while_the_jars_are_not_cached(no_tools: Path, tmp_path: Path) -> None:
    _fake_program(no_tools, "java")
    kafka = LocalKafka(cache_root=tmp_path)
    with pytest.raises(ToolNotFoundError, match=r"mvn not found.*apt-get install -y maven"):
        kafka.preflight()

    _cache_jars(tmp_path)
    kafka.preflight()  # no mvn, and no error


def test_cached_jars_are_used_without_running_mvn(no_tools: Path, tmp_path: Path) -> None:
    libs = _cache_jars(tmp_path)
    said: list[str] = []
    assert ensure_kafka_jars(tmp_path, progress=said.append) == libs
    assert said == []  # no "fetching ... from Maven Central"


def test_java_home_wins_over_path(
    no_tools: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    java_home = tmp_path / "jdk"
    (java_home / "bin").mkdir(parents=True)
    _fake_program(java_home / "bin", "java")
    monkeypatch.setenv("JAVA_HOME", str(java_home))
    _cache_jars(tmp_path)
    LocalKafka(cache_root=tmp_path).preflight()


def test_configured_servers_are_used_and_nothing_is_started(no_tools: Path, tmp_path: Path) -> None:
    environ = {"KAFKA_BOOTSTRAP_SERVERS": "kafka-1:9092", "REDIS_URL": "redis://cache:6379/2"}
    found = ensure_infra(environ=environ, cache_root=tmp_path, verify_external=False)

    assert (found.kafka_bootstrap, found.redis_url) == ("kafka-1:9092", "redis://cache:6379/2")
    assert (found.kafka_origin, found.redis_origin) == ("environment", "environment")
    assert found.started == ()
    found.stop_started()  # nothing to stop, no error


def test_arguments_win_over_the_environment(no_tools: Path, tmp_path: Path) -> None:
    environ = {"KAFKA_BOOTSTRAP_SERVERS": "env:9092", "REDIS_URL": "redis://env:6379/0"}
    found = ensure_infra(
        "arg:9092",
        "redis://arg:6379/0",
        environ=environ,
        cache_root=tmp_path,
        verify_external=False,
    )
    assert (found.kafka_bootstrap, found.redis_url) == ("arg:9092", "redis://arg:6379/0")
    assert (found.kafka_origin, found.redis_origin) == ("argument", "argument")


def test_missing_programs_are_reported_before_anything_starts(
    no_tools: Path, tmp_path: Path
) -> None:
    # redis-server is there, java is not: Redis must not be started only to be left behind.
    _fake_program(no_tools, "redis-server")
    with pytest.raises(ToolNotFoundError, match="java not found"):
        ensure_infra(environ={}, cache_root=tmp_path)
    assert not (tmp_path / "run").exists()


def test_a_stale_pid_file_is_never_signalled(tmp_path: Path) -> None:
    # The pid file names a live process that is not a redis-server (this test process, which
    # would die of the SIGTERM): it must be recognised as not ours and left alone.
    redis = LocalRedis(1, tmp_path / "redis", cache_root=tmp_path)
    redis.data_dir.mkdir(parents=True)
    redis.pid_path.write_text(f"{os.getpid()}\n")

    status = redis.status()
    assert not status.running
    assert status.pid is None
    assert not redis.pid_path.exists()  # the stale file is cleaned up
    assert redis.stop() is False


def test_start_errors_carry_the_log_tail() -> None:
    error = ServerStartError("kafka stopped during start", "line 1\nFATAL: port in use")
    assert error.log_tail.endswith("FATAL: port in use")
    assert "FATAL: port in use" in str(error)


def test_register_adds_infra_actions_with_handlers(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="fraudstream")
    infra.register(parser.add_subparsers(dest="command", required=True))

    for action in ("up", "down", "status", "fetch"):
        args = parser.parse_args(["infra", action])
        assert callable(args.handler)
    args = parser.parse_args(
        ["infra", "up", "--kafka-port", "29092", "--redis-port", "26379", "--data-dir", "x"]
    )
    assert (args.kafka_port, args.redis_port, args.data_dir) == (29092, 26379, Path("x"))
    with pytest.raises(SystemExit):
        parser.parse_args(["infra"])  # an action is required


def test_status_of_nothing_running_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = infra.main(
        ["status", "--kafka-port", "1", "--redis-port", "3", "--data-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"^kafka\s+stopped", out, re.MULTILINE)
    assert re.search(r"^redis\s+stopped", out, re.MULTILINE)


def test_cli_errors_are_messages_not_tracebacks(
    no_tools: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = infra.main(["up", "--data-dir", str(tmp_path)])
    assert code == 1
    assert "error: redis-server not found" in capsys.readouterr().err
