"""A single-node Apache Kafka broker (KRaft, combined broker+controller) on loopback, no Docker.

The official ``org.apache.kafka:kafka_2.13`` artifacts are resolved by Maven (``deploy/kafka/pom.xml``)
into a cache folder outside git; the broker runs as a detached ``java`` process whose home folder
holds its configuration, data, log file and pid file.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import orjson

DEFAULT_PORT = 9092
KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


def kafka_version() -> str:
    """The Kafka version pinned in ``deploy/kafka/pom.xml``."""
    pom = resources.files("deploy").joinpath("kafka/pom.xml").read_text()
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    if match is None:
        raise RuntimeError("deploy/kafka/pom.xml does not pin <kafka.version>")
    return match.group(1)


def cache_root() -> Path:
    """Where resolved artifacts live: ``$KEYYO_CACHE_DIR`` or ``~/.cache/keyyo-stream``."""
    env = os.environ.get("KEYYO_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "keyyo-stream"


def default_home(port: int) -> Path:
    """Default broker home: ``$KEYYO_STATE_DIR`` or ``~/.local/state/keyyo-stream``, per port."""
    env = os.environ.get("KEYYO_STATE_DIR")
    base = Path(env) if env else Path.home() / ".local" / "state" / "keyyo-stream"
    return base / f"kafka-{port}"


def resolve_artifacts(progress: bool = True) -> Path:
    """Copy the broker's jars into the cache with Maven (once); return the folder of jars."""
    version = kafka_version()
    lib = cache_root() / f"kafka-{version}" / "lib"
    marker = lib / ".complete"
    if marker.exists():
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError("Maven (mvn) is needed to fetch the Kafka broker; install it or use Docker")
    if shutil.which("java") is None:
        raise RuntimeError("Java 17+ is needed to run the local Kafka broker")
    if lib.exists():
        shutil.rmtree(lib)
    lib.mkdir(parents=True)
    pom = resources.files("deploy").joinpath("kafka/pom.xml")
    with resources.as_file(pom) as pom_path:
        if progress:
            print(f"resolving org.apache.kafka:kafka_2.13:{version} with Maven into {lib}", flush=True)
        cmd = [mvn, "-B", "-q", "-f", str(pom_path), "dependency:copy-dependencies",
               f"-DoutputDirectory={lib}", "-DincludeScope=runtime"]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"Maven could not resolve Kafka {version}:\n{result.stdout}{result.stderr}")
    marker.write_text(version)
    return lib


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_port(count: int = 1) -> int:
    """The first of ``count`` consecutive TCP ports on loopback that nothing listens on now.

    Taken below the kernel's ephemeral range (10000 up to it), never twice by one process: a port
    the kernel hands out is also what it gives outgoing connections, so one picked there can be
    taken by a client socket before the server that was to listen on it starts.
    """
    low, high = 10_000, _ephemeral_low() - count
    rng = random.Random()  # noqa: S311 - spreading picks, not a secret
    for _ in range(1000):
        first = rng.randrange(low, high)
        ports = range(first, first + count)
        if _handed_out.intersection(ports) or not all(_bindable(p) for p in ports):
            continue
        _handed_out.update(ports)
        return first
    raise RuntimeError(f"no {count} free consecutive ports between {low} and {high}")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def broker_answers(bootstrap: str, wait_s: float = 5.0) -> bool:
    """True when a Kafka broker at ``bootstrap`` answers a metadata request."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(wait_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), wait_s)
        await asyncio.wait_for(admin.describe_cluster(), wait_s)
        return True
    except Exception:
        return False
    finally:
        await admin.close()


@dataclass
class LocalKafka:
    """One local broker: its home folder, port and controller port."""

    home: Path
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    heap: str = "768m"
    node_id: int = 1
    cluster_size: int = 1
    """Brokers in the cluster this one belongs to (replication settings follow it)."""
    voters: str | None = None
    """``controller.quorum.voters`` of a cluster; None: this broker is its own quorum."""
    cluster_id: str | None = None
    """Shared by every broker of a cluster (formatting); None: a new one."""

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients."""
        return f"{self.host}:{self.port}"

    @property
    def log_file(self) -> Path:
        """The broker's log file."""
        return self.home / "broker.log"

    @property
    def pid_file(self) -> Path:
        return self.home / "broker.pid"

    @property
    def config_file(self) -> Path:
        return self.home / "server.properties"

    def pid(self) -> int | None:
        """The broker's pid when its process is alive, else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        # A reused pid belongs to another program: check it still runs our broker.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        return pid if KAFKA_MAIN.encode() in cmdline else None

    def running(self) -> bool:
        """True when the broker process is alive and its port accepts connections."""
        return self.pid() is not None and port_open(self.host, self.port)

    def _write_config(self, controller_port: int) -> None:
        data = self.home / "data"
        replicas = str(min(3, self.cluster_size))
        min_isr = "2" if self.cluster_size >= 3 else "1"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters or f"{self.node_id}@{self.host}:{controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "8",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "default.replication.factor": replicas,
            "group.initial.rebalance.delay.ms": "0",
            "min.insync.replicas": min_isr,
            "log.retention.hours": "168",
            "log.segment.bytes": str(64 * 1024 * 1024),
            # The log cleaner looks for compactable changelogs every 5 s (default 15 s).
            "log.cleaner.backoff.ms": "5000",
        }
        text = "".join(f"{k}={v}\n" for k, v in props.items())
        self.config_file.write_text(text)

    def controller_port(self) -> int:
        """This broker's controller port, chosen once and kept in its home."""
        self.home.mkdir(parents=True, exist_ok=True)
        ports_file = self.home / "controller.port"
        if ports_file.exists():
            return int(ports_file.read_text())
        port = free_port()
        ports_file.write_text(str(port))
        return port

    def start(self, wait_seconds: float = 90.0, progress: bool = True) -> bool:
        """Start the broker unless it already runs; wait until it answers. True if started now."""
        proc = self.launch(progress)
        if proc is None:
            return False
        self.wait_ready(proc, wait_seconds)
        return True

    def launch(self, progress: bool = True) -> subprocess.Popen[bytes] | None:
        """Start the broker's process (None when it already runs); :meth:`wait_ready` waits."""
        if self.running():
            return None
        if port_open(self.host, self.port):
            raise RuntimeError(f"port {self.port} is taken by another program; choose --port")
        lib = resolve_artifacts(progress=progress)
        self.home.mkdir(parents=True, exist_ok=True)
        controller_port = self.controller_port()
        self._write_config(controller_port)
        classpath = f"{lib}/*"
        log4j = resources.files("deploy").joinpath("kafka/log4j2.properties")
        java = shutil.which("java") or "java"
        jvm = [java, f"-Xmx{self.heap}", f"-Xms{self.heap}", "-XX:+UseG1GC",
               "-Djava.awt.headless=true", f"-Dkafka.logs.file={self.log_file}",
               f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
        if not (self.home / "data" / "meta.properties").exists():
            cluster_id = self.cluster_id or uuid.uuid4().hex[:22]
            fmt = subprocess.run(
                [*jvm, STORAGE_TOOL, "format", "-t", cluster_id, "-c", str(self.config_file)],
                capture_output=True, text=True, check=False,
            )
            if fmt.returncode != 0:
                raise RuntimeError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        with (self.home / "stdout.log").open("ab") as out:
            proc = subprocess.Popen(
                [*jvm, KAFKA_MAIN, str(self.config_file)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], wait_seconds: float = 90.0) -> None:
        """Wait until the broker launched as ``proc`` answers; stop it and raise if it does not."""
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the broker exited with status {proc.returncode}; see {self.log_file} "
                    f"and {self.home / 'stdout.log'}"
                )
            if port_open(self.host, self.port) and asyncio.run(broker_answers(self.bootstrap, 3)):
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the broker did not answer within {wait_seconds:.0f}s; see {self.log_file}")

    def stop(self, wait_seconds: float = 60.0) -> bool:
        """Stop the broker cleanly (SIGTERM, then SIGKILL after ``wait_seconds``). True if it ran."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if self.pid() is None:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.05)


@dataclass
class LocalCluster:
    """Local brokers forming one KRaft cluster (each broker and controller): ports ``port`` up,
    homes ``home/broker-<id>``; the layout is kept in ``home/cluster.json``."""

    home: Path
    port: int = DEFAULT_PORT
    brokers: int = 1
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        layout_file = self.home / "cluster.json"
        if layout_file.exists():  # an existing cluster keeps its size
            self.brokers = int(orjson.loads(layout_file.read_bytes())["brokers"])
        self._nodes: list[LocalKafka] | None = None

    def nodes(self) -> list[LocalKafka]:
        """The brokers, node ids 1..N (a cluster's layout is written on first use)."""
        if self._nodes is None:
            self._nodes = self._layout()
        return self._nodes

    def _layout(self) -> list[LocalKafka]:
        if self.brokers == 1:
            return [LocalKafka(home=self.home, port=self.port, host=self.host)]
        layout_file = self.home / "cluster.json"
        if layout_file.exists():
            layout = orjson.loads(layout_file.read_bytes())
        else:
            self.home.mkdir(parents=True, exist_ok=True)
            layout = {"brokers": self.brokers, "cluster_id": uuid.uuid4().hex[:22],
                      "controller_ports": [free_port() for _ in range(self.brokers)]}
            layout_file.write_bytes(orjson.dumps(layout))
        voters = ",".join(f"{i + 1}@{self.host}:{p}" for i, p in enumerate(layout["controller_ports"]))
        nodes = []
        for i in range(self.brokers):
            node = LocalKafka(home=self.home / f"broker-{i + 1}", port=self.port + i, host=self.host,
                              node_id=i + 1, cluster_size=self.brokers, voters=voters,
                              cluster_id=layout["cluster_id"])
            node.home.mkdir(parents=True, exist_ok=True)
            (node.home / "controller.port").write_text(str(layout["controller_ports"][i]))
            nodes.append(node)
        return nodes

    @property
    def bootstrap(self) -> str:
        """Every broker, comma-separated."""
        return ",".join(node.bootstrap for node in self.nodes())

    def start(self, wait_seconds: float = 120.0, progress: bool = True) -> list[int]:
        """Start the brokers that are not running (together: a quorum needs a majority up);
        wait until each answers. Returns the node ids started."""
        launched = [(node, node.launch(progress)) for node in self.nodes()]
        started = []
        try:
            for node, proc in launched:
                if proc is not None:
                    node.wait_ready(proc, wait_seconds)
                    started.append(node.node_id)
        except BaseException:
            self.stop()  # none left running when the cluster as a whole did not start
            raise
        return started

    def stop(self) -> list[int]:
        """Stop every broker; the node ids that were running."""
        return [node.node_id for node in self.nodes() if node.stop()]


@contextmanager
def temporary_broker() -> Iterator[LocalKafka]:
    """A broker in a temporary home on a free port, stopped and removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="keyyo-kafka-"))
    broker = LocalKafka(home=home, port=free_port())
    broker.start(progress=False)
    try:
        yield broker
    finally:
        broker.stop(wait_seconds=20)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def bootstrap_or_temporary_broker() -> Iterator[str]:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set, else a :func:`temporary_broker` for the duration."""
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if env:
        yield env
        return
    with temporary_broker() as broker:
        yield broker.bootstrap
