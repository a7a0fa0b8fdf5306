"""Local Apache Kafka (KRaft) and Redis servers, without Docker, for `make run` and the tests.

The Apache download site is out of reach on our machines but Maven Central is not, so the broker
is assembled from Maven Central jars: `deploy/local/kafka-pom.xml` names them, `mvn
dependency:copy-dependencies` collects them once into `.cache/kafka/<version>/libs`, and the
broker runs as `java -cp '<libs>/*' kafka.Kafka server.properties` in KRaft combined mode (one
process is both broker and controller). Kafka version: KAFKA_VERSION below (4.1.1; 4.0.x is not
used), with SLF4J 1.7.36 and Log4j 2.25.3 (`log4j-slf4j-impl`) as its logging backend.

Redis is the distribution's `redis-server`, configured entirely on its command line: no
persistence, bound to 127.0.0.1, on a port of its own (16379) so it never collides with a
system Redis on 6379.

Both servers run detached (their own session, so a Ctrl-C in the terminal that started them
does not reach them), log to a file in their data folder and leave a pid file there, so a later
`infra down` or `infra status`, or the test suite, finds them again. `ensure_infra` is what
`fraudstream run` and the tests call: use the servers configured by argument or environment,
else reuse the local ones already up, else start them.

Errors (what a caller can catch):

    InfraError                    anything this module raises on purpose
    ├── ToolNotFoundError         java, mvn or redis-server missing; names the install command
    ├── JarDownloadError          mvn could not collect the Kafka jars (carries mvn's output)
    ├── PortInUseError            a port we need is held by a process that is not our server
    ├── ServerStartError          a server exited, or was not ready in time (carries its log tail)
    └── UnreachableServerError    a configured (external) server does not accept connections

Only the standard library is used: CI runs `python -m shared.infra fetch` before anything else,
and the code that brings the servers up must not depend on the clients that talk to them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from shared.errors import FraudstreamError

__all__ = [
    "DEFAULT_KAFKA_PORT",
    "DEFAULT_REDIS_PORT",
    "KAFKA_VERSION",
    "Infra",
    "InfraError",
    "JarDownloadError",
    "LocalKafka",
    "LocalRedis",
    "PortInUseError",
    "ServerStartError",
    "ServerStatus",
    "ToolNotFoundError",
    "UnreachableServerError",
    "default_cache_root",
    "ensure_infra",
    "ensure_kafka_jars",
    "kafka_jars_cached",
    "kafka_libs_dir",
    "main",
    "redis_ping",
    "register",
]

# Keep in step with <kafka.version> in deploy/local/kafka-pom.xml (a unit test checks). This one
# wins: it is passed to mvn as -Dkafka.version, and it names the jar cache folder.
KAFKA_VERSION = "4.1.1"
DEFAULT_KAFKA_PORT = 19092  # PLAINTEXT; the KRaft controller listens on port + 1
DEFAULT_REDIS_PORT = 16379
LOOPBACK = "127.0.0.1"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO_ROOT / "deploy" / "local"
KAFKA_POM = DEPLOY_DIR / "kafka-pom.xml"
KAFKA_LOG4J_CONFIG = DEPLOY_DIR / "log4j2.properties"

# Written into the libs folder after a complete mvn run; its presence means "skip mvn".
JARS_MARKER = ".complete"
KAFKA_READY_LINE = b"Kafka Server started"
LOG_TAIL_LINES = 30

INSTALL_HINTS: dict[str, str] = {
    "java": "apt-get install -y openjdk-17-jre-headless",
    "mvn": "apt-get install -y maven",
    "redis-server": "apt-get install -y redis-server",
}

# A broker tuned for a small development box (2 cores): fewer request threads than the
# defaults (3 network, 8 io), and 4 partitions instead of 50 for the internal offsets and
# transaction-state topics, which the broker creates on the first consumer group and the first
# transactional producer: 50 partitions make those first calls visibly slower, and one broker
# gains nothing from them.
KAFKA_TUNING: dict[str, str] = {
    "num.network.threads": "2",
    "num.io.threads": "4",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.num.partitions": "4",
}
KAFKA_JVM_OPTIONS: tuple[str, ...] = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    # The same GC flags Kafka's own start scripts use, for short pauses under test load.
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)

Progress = Callable[[str], None]
Origin = Literal["argument", "environment", "started", "reused"]


def _print_progress(message: str) -> None:
    """Default progress sink: stderr, so stdout stays clean for command output."""
    print(f"[infra] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Errors


class InfraError(FraudstreamError):
    """Base of every error this module raises on purpose."""


class ToolNotFoundError(InfraError):
    """A program we need (java, mvn, redis-server) is not installed; the message says how."""

    def __init__(self, tool: str) -> None:
        hint = INSTALL_HINTS.get(tool, f"install {tool}")
        super().__init__(f"{tool} not found on PATH: install it with `{hint}`")
        self.tool = tool


class JarDownloadError(InfraError):
    """mvn failed to collect the Kafka jars from Maven Central."""


class PortInUseError(InfraError):
    """A port our server needs is taken by something that is not that server."""


class ServerStartError(InfraError):
    """A server exited during start, or did not become ready in time. `log_tail` says why."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        full = f"{message}\n--- last lines of the log ---\n{log_tail}" if log_tail else message
        super().__init__(full)
        self.log_tail = log_tail


class UnreachableServerError(InfraError):
    """A server named by argument or environment does not accept TCP connections."""


# --------------------------------------------------------------------------------------------
# Small helpers: paths, tools, ports, processes


def default_cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """`$FRAUDSTREAM_CACHE_DIR`, else `.cache/` at the repository root (git-ignored)."""
    env = os.environ if environ is None else environ
    override = env.get("FRAUDSTREAM_CACHE_DIR", "").strip()
    return Path(override).expanduser().resolve() if override else REPO_ROOT / ".cache"


def _require_tool(name: str) -> str:
    """Absolute path of `name` on PATH (java: `$JAVA_HOME/bin/java` first), or a clear error."""
    if name == "java":
        java_home = os.environ.get("JAVA_HOME", "").strip()
        candidate = Path(java_home, "bin", "java") if java_home else None
        if candidate is not None and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise ToolNotFoundError(name)
    return os.path.abspath(found)


def _port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return f"(no log at {path})"
    return b"\n".join(data.splitlines()[-lines:]).decode("utf-8", errors="replace")


def _cmdline(pid: int) -> str | None:
    """The command line of `pid`, or None when there is no such process.

    Identity, not just liveness: after a reboot a stale pid file can name an unrelated process,
    and we must never signal that. A zombie has an empty command line, so it reads as gone.
    """
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            raw = proc.read_bytes()
        except OSError:
            return None
        return raw.replace(b"\0", b" ").decode("utf-8", errors="replace").strip()
    # No /proc (macOS): ask ps.
    ps = subprocess.run(
        ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
    )
    if ps.returncode != 0:
        return None
    return ps.stdout.strip()


def _child_status(pid: int) -> tuple[bool, int | None]:
    """(is `pid` our own child, its exit code if it has ended). An ended child is reaped.

    Our own children are judged by waitpid, not by their command line: right after
    posix_spawn returns, the child can still be inside exec with an empty /proc cmdline. And a
    child that died must be reaped, or it stays a zombie of this process that still answers
    `kill -0`, and the start loop would wait the whole timeout for a dead broker.
    """
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False, None
    return True, (os.waitstatus_to_exitcode(status) if done else None)


def _spawn(argv: Sequence[str], log_path: Path) -> int:
    """Start `argv` detached: a new session, stdin from /dev/null, stdout+stderr to `log_path`.

    posix_spawn rather than subprocess.Popen: a Popen object of a server meant to outlive it
    warns "subprocess is still running" when collected, which pytest (warnings as errors) turns
    into a failure. The pid is all we keep; `_child_status` reaps the child when it ends.
    """
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawn(
        argv[0], list(argv), dict(os.environ), file_actions=file_actions, setsid=True
    )


def _wait_gone(pid: int, alive: Callable[[int], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes: `make run` and a test session starting the same
    server (or downloading the same jars) at once must not both do it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Kafka jars


def kafka_libs_dir(cache_root: Path | None = None) -> Path:
    return (cache_root or default_cache_root()) / "kafka" / KAFKA_VERSION / "libs"


def kafka_jars_cached(cache_root: Path | None = None) -> bool:
    return (kafka_libs_dir(cache_root) / JARS_MARKER).is_file()


def ensure_kafka_jars(cache_root: Path | None = None, progress: Progress = _print_progress) -> Path:
    """The folder holding the Kafka broker jars, collected with mvn on the first call only."""
    libs = kafka_libs_dir(cache_root)
    if (libs / JARS_MARKER).is_file():
        return libs
    with _file_lock(libs.parent / ".lock"):
        if (libs / JARS_MARKER).is_file():  # another process fetched them while we waited
            return libs
        mvn = _require_tool("mvn")
        if not KAFKA_POM.is_file():
            raise InfraError(f"{KAFKA_POM} not found: run from a fraudstream source checkout")
        progress(f"fetching Kafka {KAFKA_VERSION} jars from Maven Central (first run only)...")
        began = time.monotonic()
        partial = libs.with_name("libs.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(libs, ignore_errors=True)  # a folder without the marker is incomplete
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(KAFKA_POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={partial}",
            f"-Dkafka.version={KAFKA_VERSION}",
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=900, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise JarDownloadError(f"mvn did not finish in {exc.timeout:.0f} s") from None
        kafka_jar = partial / f"kafka_2.13-{KAFKA_VERSION}.jar"
        if result.returncode != 0 or not kafka_jar.is_file():
            output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise JarDownloadError(
                f"mvn could not collect the Kafka {KAFKA_VERSION} jars "
                f"(exit {result.returncode}): {' '.join(command)}\n{output}"
            )
        jars = sorted(p.name for p in partial.glob("*.jar"))
        (partial / JARS_MARKER).write_text("\n".join(jars) + "\n")
        partial.rename(libs)  # atomic: a reader sees no libs folder or a complete one
        progress(f"{len(jars)} jars cached in {libs} ({time.monotonic() - began:.1f} s)")
        return libs


def _new_cluster_id() -> str:
    """A KRaft cluster id, as `kafka-storage.sh random-uuid` makes one (16 random bytes,
    URL-safe base64 without padding, never starting with '-'), without a JVM start."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not text.startswith("-"):
            return text


# --------------------------------------------------------------------------------------------
# The servers


@dataclass(frozen=True)
class ServerStatus:
    """What `status()` saw. `running` means: our process is alive and its port answers."""

    name: str
    address: str
    running: bool
    pid: int | None
    detail: str

    def line(self) -> str:
        state = "running" if self.running else "stopped"
        pid = f"pid {self.pid}" if self.pid else "-"
        return f"{self.name:<6} {state:<8} {self.address:<28} {pid:<10} {self.detail}"


class _LocalServer:
    """A server process we start detached and find again through its pid file."""

    name = "server"

    def __init__(
        self,
        port: int,
        data_dir: Path | None,
        *,
        cache_root: Path | None,
        start_timeout: float,
        progress: Progress,
    ) -> None:
        self.port = port
        self.cache_root = cache_root or default_cache_root()
        self.data_dir = (data_dir or self.cache_root / "run" / f"{self.name}-{port}").resolve()
        self.start_timeout = start_timeout
        self.progress = progress

    # Subclasses provide these.
    @property
    def address(self) -> str:
        raise NotImplementedError

    def _owns(self, cmdline: str) -> bool:
        """Does this command line belong to our server (this kind, this port / data folder)?"""
        raise NotImplementedError

    def preflight(self) -> None:
        """Raise ToolNotFoundError now, before anything is started, if a program is missing."""
        raise NotImplementedError

    def _prepare(self) -> list[str]:
        """Write config, do one-time setup; return the command line to spawn."""
        raise NotImplementedError

    def _ready(self, pid: int) -> bool:
        """Does the server serve yet? Polled every 0.1 s while `pid` is alive."""
        raise NotImplementedError

    def _reset_ready(self) -> None:
        """Forget what earlier `_ready` polls saw (called before each wait)."""

    # Shared behaviour.
    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / f"{self.name}.pid"

    def _ports(self) -> tuple[int, ...]:
        return (self.port,)

    def _alive(self, pid: int) -> bool:
        """Is `pid` our server, still running? A pid from a file is checked by its command line
        (it may be stale and now name another program); our own child by waitpid."""
        is_child, exit_code = _child_status(pid)
        if is_child:
            return exit_code is None
        cmdline = _cmdline(pid)
        return cmdline is not None and self._owns(cmdline)

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _live_pid(self) -> int | None:
        """The pid of our running process, or None (a stale pid file is removed)."""
        pid = self._read_pid()
        if pid is None:
            return None
        if self._alive(pid):
            return pid
        self.pid_path.unlink(missing_ok=True)
        return None

    def status(self) -> ServerStatus:
        pid = self._live_pid()
        if pid is None:
            taken = [p for p in self._ports() if _port_open(p)]
            detail = f"port {taken[0]} held by another process" if taken else ""
            return ServerStatus(self.name, self.address, False, None, detail)
        if _port_open(self.port):
            return ServerStatus(self.name, self.address, True, pid, f"log: {self.log_path}")
        return ServerStatus(
            self.name, self.address, False, pid, f"process up, port closed; log: {self.log_path}"
        )

    def is_running(self) -> bool:
        return self.status().running

    def start(self) -> bool:
        """Start the server and wait until it serves. True if this call started it, False if
        it was already running (started earlier by us, e.g. `infra up`), which is then reused."""
        self.preflight()
        with _file_lock(self.data_dir / ".lock"):
            pid = self._live_pid()
            if pid is not None:
                # Up from an earlier start. If its port is still closed it may be mid-start in a
                # process that died, or hung: give it the start timeout, then say so.
                self._wait_ready(pid, what=f"{self.name} (already running, pid {pid})")
                return False
            taken = [p for p in self._ports() if _port_open(p)]
            if taken:
                raise PortInUseError(
                    f"{LOOPBACK}:{taken[0]} is in use by a process that is not our {self.name} "
                    f"(no live pid file in {self.data_dir}): stop it or choose another port"
                )
            argv = self._prepare()
            if self.log_path.exists():  # keep the previous run's log for a post-mortem
                self.log_path.replace(self.log_path.with_suffix(".prev.log"))
            began = time.monotonic()
            try:
                pid = _spawn(argv, self.log_path)
            except OSError as exc:
                raise ServerStartError(f"could not run {argv[0]}: {exc}") from exc
            self.pid_path.write_text(f"{pid}\n")
            try:
                self._wait_ready(pid, what=self.name)
            except BaseException:  # timeout, exit, Ctrl-C: leave no half-started server behind
                self._terminate(pid, timeout=10.0)
                raise
            self.progress(
                f"{self.name} ready at {self.address} in {time.monotonic() - began:.1f} s "
                f"(pid {pid}, log {self.log_path})"
            )
            return True

    def _wait_ready(self, pid: int, what: str) -> None:
        self._reset_ready()
        deadline = time.monotonic() + self.start_timeout
        while True:
            is_child, code = _child_status(pid)
            if code is not None or not (is_child or self._alive(pid)):
                self.pid_path.unlink(missing_ok=True)
                exit_text = f"exit code {code}" if code is not None else "it is gone"
                raise ServerStartError(
                    f"{what} stopped during start ({exit_text}); log: {self.log_path}",
                    _log_tail(self.log_path),
                )
            if self._ready(pid):
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"{what} was not ready within {self.start_timeout:.0f} s; log: {self.log_path}",
                    _log_tail(self.log_path),
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM our server and wait (SIGKILL after `timeout`). True if one was stopped."""
        with _file_lock(self.data_dir / ".lock"):
            pid = self._live_pid()
            if pid is None:
                return False
            self._terminate(pid, timeout)
            return True

    def _terminate(self, pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, self._alive, timeout):
            self.progress(f"{self.name} (pid {pid}) ignored SIGTERM for {timeout:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, self._alive, 10.0)
        self.pid_path.unlink(missing_ok=True)


class LocalKafka(_LocalServer):
    """One Apache Kafka process in KRaft combined mode (broker and controller) on 127.0.0.1.

    PLAINTEXT on `port`, the controller on `port + 1`; data, config, log and pid file in
    `data_dir` (default `<cache>/run/kafka-<port>`). A new start begins with an empty broker,
    as `docker compose down` / `up` would (and Redis does): the test suite makes fresh topics
    for every test, and a kept data folder would pile them up run after run, slowing every
    later start. `keep_data=True` keeps topics and offsets across restarts instead.
    """

    name = "kafka"

    def __init__(
        self,
        port: int = DEFAULT_KAFKA_PORT,
        data_dir: Path | None = None,
        *,
        cache_root: Path | None = None,
        start_timeout: float = 120.0,
        keep_data: bool = False,
        progress: Progress = _print_progress,
    ) -> None:
        super().__init__(
            port, data_dir, cache_root=cache_root, start_timeout=start_timeout, progress=progress
        )
        self.keep_data = keep_data
        self._log_offset = 0
        self._ready_seen = False

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def address(self) -> str:
        return self.bootstrap

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_dirs(self) -> Path:
        return self.data_dir / "kraft-combined-logs"

    def _ports(self) -> tuple[int, ...]:
        return (self.port, self.controller_port)

    def _owns(self, cmdline: str) -> bool:
        return "kafka.Kafka" in cmdline and str(self.properties_path) in cmdline

    def server_properties(self) -> str:
        """The broker's server.properties: combined mode, one node, replication factor 1."""
        cport = self.controller_port
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # A static quorum: `storage format` needs no --standalone / --initial-controllers.
            "controller.quorum.voters": f"1@{LOOPBACK}:{cport}",
            "listeners": f"PLAINTEXT://{LOOPBACK}:{self.port},CONTROLLER://{LOOPBACK}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{LOOPBACK}:{self.port}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            # One broker: every internal topic must be satisfied by a single replica, or the
            # first consumer group / transactional producer waits forever.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Tests create a consumer group per test: no 3 s wait for more members.
            "group.initial.rebalance.delay.ms": "0",
            "num.partitions": "1",
            # Topics are created on purpose (`fraudstream topics`, test fixtures), never by a typo.
            "auto.create.topics.enable": "false",
            **KAFKA_TUNING,
        }
        header = "# Written by shared/infra.py on every start; edits here are overwritten.\n"
        return header + "".join(f"{key}={value}\n" for key, value in props.items())

    def preflight(self) -> None:
        _require_tool("java")
        if not kafka_jars_cached(self.cache_root):
            _require_tool("mvn")

    def _prepare(self) -> list[str]:
        java = _require_tool("java")
        libs = ensure_kafka_jars(self.cache_root, self.progress)
        if not KAFKA_LOG4J_CONFIG.is_file():
            raise InfraError(f"{KAFKA_LOG4J_CONFIG} not found: run from a fraudstream checkout")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(self.server_properties())
        if not self.keep_data:
            shutil.rmtree(self.log_dirs, ignore_errors=True)
        base = [
            java,
            *KAFKA_JVM_OPTIONS,
            # A JVM crash report goes next to the broker log, not into whatever the cwd is.
            f"-XX:ErrorFile={self.data_dir}/hs_err_pid%p.log",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J_CONFIG}",
            "-cp",
            f"{libs}/*",  # the JVM expands the wildcard itself
        ]
        if not (self.log_dirs / "meta.properties").is_file():
            self._format(base)
        return [*base, "kafka.Kafka", str(self.properties_path)]

    def _format(self, java_base: list[str]) -> None:
        """`kafka-storage format`: once per data folder (a kept one is not formatted again)."""
        command = [
            *java_base,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _new_cluster_id(),
            "-c",
            str(self.properties_path),
            "--ignore-formatted",
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-LOG_TAIL_LINES:])
            raise ServerStartError(f"formatting {self.log_dirs} failed", output)

    def _reset_ready(self) -> None:
        self._log_offset = 0
        self._ready_seen = False

    def _ready(self, pid: int) -> bool:
        """Ready when the broker logged "Kafka Server started" and its port answers. The log is
        read on from where the last look stopped, so each poll stays cheap on a long log."""
        overlap = len(KAFKA_READY_LINE)  # so a line split across two reads is still found
        try:
            with self.log_path.open("rb") as log:
                while not self._ready_seen:
                    start = max(0, self._log_offset - overlap)
                    log.seek(start)
                    # In blocks: the log of a broker found running may be large.
                    chunk = log.read(1 << 20)
                    if len(chunk) <= self._log_offset - start:
                        break  # nothing new
                    self._log_offset = start + len(chunk)
                    self._ready_seen = KAFKA_READY_LINE in chunk
        except OSError:
            return False
        return self._ready_seen and _port_open(self.port)


class LocalRedis(_LocalServer):
    """`redis-server` on 127.0.0.1:`port`, configured on its command line, without persistence.

    Its working folder, log and pid file are in `data_dir` (default `<cache>/run/redis-<port>`).
    Nothing is saved: a restart starts empty, like the tests expect.
    """

    name = "redis"

    def __init__(
        self,
        port: int = DEFAULT_REDIS_PORT,
        data_dir: Path | None = None,
        *,
        cache_root: Path | None = None,
        start_timeout: float = 20.0,
        progress: Progress = _print_progress,
    ) -> None:
        super().__init__(
            port, data_dir, cache_root=cache_root, start_timeout=start_timeout, progress=progress
        )

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def address(self) -> str:
        return self.url

    def _owns(self, cmdline: str) -> bool:
        # Before redis sets its process title the command line is ours ("--port N"); after,
        # it reads "redis-server 127.0.0.1:N".
        padded = f"{cmdline} "
        return "redis" in cmdline and (
            f"--port {self.port} " in padded or f":{self.port} " in padded
        )

    def preflight(self) -> None:
        _require_tool("redis-server")

    def _prepare(self) -> list[str]:
        redis_server = _require_tool("redis-server")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [
            redis_server,
            "--port", str(self.port),
            "--bind", LOOPBACK,
            "--dir", str(self.data_dir),
            "--save", "",  # no RDB snapshots ...
            "--appendonly", "no",  # ... and no AOF: a cache for tests and demos, not a database
            "--daemonize", "no",  # we keep the pid; a daemonizing redis would hide it
            "--protected-mode", "no",
            "--logfile", "",  # stdout, which we send to redis.log
            # An account's applied-transaction index (vt) holds members of ~150-180 bytes (the
            # stored result of each): above the default 64, a sorted set leaves the compact
            # listpack encoding for a skiplist. 256 keeps small ones compact: ~35% less
            # velocity memory per account, same speed (measured in bench.scoring_bench). The
            # same setting is in docker-compose.yml and recommended in the README.
            "--zset-max-listpack-value", "256",
        ]  # fmt: skip

    def _ready(self, pid: int) -> bool:
        return redis_ping(LOOPBACK, self.port)


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis at host:port answers PING with +PONG (raw RESP, no client needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# ensure_infra: what `fraudstream run` and the test suite call


@dataclass(frozen=True)
class Infra:
    """Where Kafka and Redis are, and which servers this process started (and so stops).

    `kafka_origin` / `redis_origin`: "argument" or "environment" (someone else's server, used
    as is), "reused" (our local server, already up, e.g. from `infra up`: left running), or
    "started" (started by this call: `stop_started()` stops it). As a context manager it calls
    `stop_started()` on exit.
    """

    kafka_bootstrap: str
    redis_url: str
    kafka_origin: Origin
    redis_origin: Origin
    started: tuple[LocalKafka | LocalRedis, ...] = field(default=())

    def stop_started(self) -> None:
        """Stop the servers this call started, newest first. Servers found running are left."""
        for server in reversed(self.started):
            server.stop()

    def describe(self) -> str:
        return (
            f"Kafka {self.kafka_bootstrap} ({self.kafka_origin}), "
            f"Redis {self.redis_url} ({self.redis_origin})"
        )

    def __enter__(self) -> Infra:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_started()


def _bootstrap_hosts(bootstrap: str) -> list[tuple[str, int]]:
    hosts: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        if host and port.isdigit():
            hosts.append((host.strip("[]"), int(port)))
    return hosts


def _redis_host(url: str) -> tuple[str, int] | None:
    """(host, port) of a redis:// or rediss:// URL; None for a unix socket URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return None
    return (parts.hostname or "localhost", parts.port or 6379)


def _check_reachable(what: str, source: str, addresses: Sequence[tuple[str, int]]) -> None:
    """At least one address must accept a TCP connection: a clear error now beats every test
    timing out later against a server that is not there."""
    for host, port in addresses:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=3.0):
            return
    raise UnreachableServerError(
        f"{what} at {source} does not accept connections: start it, or unset the variable "
        "to let fraudstream start a local one"
    )


def ensure_infra(
    kafka_bootstrap: str | None = None,
    redis_url: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    kafka_port: int = DEFAULT_KAFKA_PORT,
    redis_port: int = DEFAULT_REDIS_PORT,
    run_dir: Path | None = None,
    cache_root: Path | None = None,
    verify_external: bool = True,
    keep_kafka_data: bool = False,
    progress: Progress = _print_progress,
) -> Infra:
    """Make Kafka and Redis available and say where they are.

    For each of the two, the first that applies: the argument; the environment variable
    (`KAFKA_BOOTSTRAP_SERVERS`, `REDIS_URL`), used as is (checked to accept TCP connections
    unless `verify_external=False`); our local server when it is already running ("reused");
    else a local server started now ("started"), which `Infra.stop_started()` stops. Missing
    programs are reported before anything starts; if the second start fails, the first server
    started here is stopped again.
    """
    env = os.environ if environ is None else environ
    cache = cache_root or default_cache_root(env)
    runs = run_dir or cache / "run"

    kafka_given = kafka_bootstrap or env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    redis_given = redis_url or env.get("REDIS_URL", "").strip()
    kafka_source: Origin = "argument" if kafka_bootstrap else "environment"
    redis_source: Origin = "argument" if redis_url else "environment"

    if verify_external:
        if kafka_given:
            where = kafka_given if kafka_bootstrap else f"KAFKA_BOOTSTRAP_SERVERS={kafka_given}"
            _check_reachable("Kafka", where, _bootstrap_hosts(kafka_given))
        redis_address = _redis_host(redis_given) if redis_given else None
        if redis_address is not None:
            where = redis_given if redis_url else f"REDIS_URL={redis_given}"
            _check_reachable("Redis", where, [redis_address])

    locals_: list[LocalKafka | LocalRedis] = []
    if not redis_given:
        redis = LocalRedis(
            redis_port, runs / f"redis-{redis_port}", cache_root=cache, progress=progress
        )
        locals_.append(redis)
    if not kafka_given:
        kafka = LocalKafka(
            kafka_port,
            runs / f"kafka-{kafka_port}",
            cache_root=cache,
            keep_data=keep_kafka_data,
            progress=progress,
        )
        locals_.append(kafka)
    for server in locals_:  # every missing program is reported before anything starts
        server.preflight()

    started: list[LocalKafka | LocalRedis] = []
    try:
        for server in locals_:  # Redis first: it takes a moment, the broker seconds
            if server.start():
                started.append(server)
    except BaseException:
        for server in reversed(started):
            server.stop()
        raise

    def origin(server_type: type[_LocalServer], given: str, source: Origin) -> Origin:
        if given:
            return source
        return "started" if any(isinstance(s, server_type) for s in started) else "reused"

    return Infra(
        kafka_bootstrap=kafka_given or f"{LOOPBACK}:{kafka_port}",
        redis_url=redis_given or f"redis://{LOOPBACK}:{redis_port}/0",
        kafka_origin=origin(LocalKafka, kafka_given, kafka_source),
        redis_origin=origin(LocalRedis, redis_given, redis_source),
        started=tuple(started),
    )


# --------------------------------------------------------------------------------------------
# Command line: `fraudstream infra up|down|status|fetch` and `python -m shared.infra ...`


def _servers(args: argparse.Namespace) -> tuple[LocalRedis, LocalKafka]:
    runs: Path | None = args.data_dir
    redis_dir = runs / f"redis-{args.redis_port}" if runs else None
    kafka_dir = runs / f"kafka-{args.kafka_port}" if runs else None
    keep_data: bool = getattr(args, "keep_data", False)
    return (
        LocalRedis(args.redis_port, redis_dir),
        LocalKafka(args.kafka_port, kafka_dir, keep_data=keep_data),
    )


def _cmd_up(args: argparse.Namespace) -> int:
    redis, kafka = _servers(args)
    for server in (redis, kafka):
        server.preflight()
    for server in (redis, kafka):
        if not server.start():
            print(f"{server.name} already running at {server.address}")
    print(f"export KAFKA_BOOTSTRAP_SERVERS={kafka.bootstrap}")
    print(f"export REDIS_URL={redis.url}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    redis, kafka = _servers(args)
    for server in (kafka, redis):
        stopped = server.stop()
        print(f"{server.name} {'stopped' if stopped else 'was not running'} ({server.address})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    statuses = [server.status() for server in _servers(args)]
    for status in statuses:
        print(status.line())
    return 0 if all(s.running for s in statuses) else 1


def _cmd_fetch(args: argparse.Namespace) -> int:
    libs = ensure_kafka_jars()
    print(f"Kafka {KAFKA_VERSION} jars in {libs}")
    return 0


def _handling_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """An InfraError is a message for the user, not a traceback: print it, exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except InfraError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _add_actions(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="infra_action", required=True, metavar="ACTION")
    specs: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("up", "start local Kafka and Redis (reused when already running)", _cmd_up),
        ("down", "stop the local Kafka and Redis started by `up`", _cmd_down),
        ("status", "show whether they run (exit 1 when one does not)", _cmd_status),
        ("fetch", f"only download the Kafka {KAFKA_VERSION} jars into the cache", _cmd_fetch),
    ]
    for name, help_text, handler in specs:
        action = actions.add_parser(name, help=help_text, description=help_text)
        if name != "fetch":
            action.add_argument(
                "--kafka-port",
                type=int,
                default=DEFAULT_KAFKA_PORT,
                help="Kafka PLAINTEXT port; the KRaft controller uses the next one "
                f"(default {DEFAULT_KAFKA_PORT})",
            )
            action.add_argument(
                "--redis-port",
                type=int,
                default=DEFAULT_REDIS_PORT,
                help=f"Redis port (default {DEFAULT_REDIS_PORT})",
            )
            action.add_argument(
                "--data-dir",
                type=Path,
                default=None,
                help="folder holding kafka-<port>/ and redis-<port>/ (data, logs, pid files); "
                "default: .cache/run/ in the repository, or $FRAUDSTREAM_CACHE_DIR/run/",
            )
        if name == "up":
            action.add_argument(
                "--keep-data",
                action="store_true",
                help="keep Kafka's topics and offsets from the previous run (default: start empty)",
            )
        action.set_defaults(handler=_handling_errors(handler))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `infra up|down|status|fetch` to a CLI; each sets `args.handler(args) -> exit code`."""
    parser = subparsers.add_parser(
        "infra",
        help="local Kafka and Redis without Docker",
        description="Local Apache Kafka (KRaft, from Maven Central jars) and Redis, no Docker.",
    )
    _add_actions(parser)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.infra",
        description="Local Apache Kafka (KRaft, from Maven Central jars) and Redis, no Docker.",
    )
    _add_actions(parser)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
