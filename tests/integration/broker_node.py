"""A private RabbitMQ node for tests and benchmarks that stop, restart or reconfigure it.

Each `BrokerNode` runs `rabbitmq-server` under its own node name, ports and folder, so
stopping it never touches the machine's shared node. It needs root (the server drops
to the `rabbitmq` user, which must own the folder) and the Debian rabbitmq-server
package. No pytest import, so `bench/` loads it too.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions

logger = logging.getLogger(__name__)

# Node names this module makes, so that no command of it can address another node.
NODE_PREFIX = "fairu-test-"
FIRST_PORT = 5680
PORT_TRIES = 100
# Erlang distribution port = AMQP port + this offset, as 5672 pairs with 25672.
DIST_PORT_OFFSET = 20000
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
CTL_TIMEOUT_S = 60.0
# connection_name inside client_properties as rabbitmqctl 3.10 prints them.
_CONNECTION_NAME = re.compile(r'\{"connection_name","((?:[^"\\]|\\.)*)"\}')


class BrokerNodeError(Exception):
    """The private node failed to start or stop, or a rabbitmqctl command failed."""


@dataclass(frozen=True)
class ConnectionInfo:
    pid: str
    connection_name: str
    user: str


@dataclass
class BrokerNode:
    """A private RabbitMQ node on 127.0.0.1 with a throwaway folder.

    `config` lines go into its rabbitmq.conf, for example `consumer_timeout = 5000`.
    """

    config: list[str] = field(default_factory=list)
    base_dir: Path = Path("/var/tmp")
    name: str = field(init=False)
    port: int = field(init=False)
    folder: Path = field(init=False)
    _running: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.name = f"{NODE_PREFIX}{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port_pair()
        self.folder = Path(tempfile.mkdtemp(prefix="fairu-broker-", dir=self.base_dir))
        self._write_files()

    @property
    def dist_port(self) -> int:
        return self.port + DIST_PORT_OFFSET

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @property
    def log_file(self) -> Path:
        return self.folder / "log" / f"{self.name}.log"

    # --- lifecycle --------------------------------------------------------------

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the node and return once it accepts an AMQP connection."""
        began = time.monotonic()
        completed = subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self._env(),
            capture_output=True,
            check=False,
            text=True,
            timeout=CTL_TIMEOUT_S,
        )
        if completed.returncode != 0:
            raise BrokerNodeError(
                f"rabbitmq-server -detached for node {self.name} exited with "
                f"{completed.returncode}: {completed.stderr.strip()[-2000:]}"
            )
        self._running = True
        self._wait_for_amqp(began + timeout_s)
        logger.info(
            "private broker node %s accepts AMQP connections on port %d after %.1f s",
            self.name,
            self.port,
            time.monotonic() - began,
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the node and its Erlang VM and wait until the AMQP port is closed."""
        began = time.monotonic()
        # `shutdown` waits for the VM of a local node to exit, with no pid file.
        self.ctl("shutdown", timeout_s=timeout_s)
        self._running = False
        while _port_open(self.port):
            if time.monotonic() - began > timeout_s:
                raise BrokerNodeError(
                    f"port {self.port} of node {self.name} still open {timeout_s:.0f} s "
                    "after shutdown"
                )
            time.sleep(0.1)
        logger.info(
            "private broker node %s stopped in %.1f s",
            self.name,
            time.monotonic() - began,
        )

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the node, stay down for `down_s` seconds, and start it again."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def destroy(self) -> None:
        """Stop the node if it runs, then delete its folder. Calling it twice is safe."""
        if self._running:
            try:
                self.stop()
            except (BrokerNodeError, subprocess.TimeoutExpired) as exc:
                logger.error("private broker node %s did not stop: %s", self.name, exc)
                self._kill_vm()
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- inspection and faults --------------------------------------------------

    def ctl(self, *args: str, timeout_s: float = CTL_TIMEOUT_S) -> str:
        """Run `rabbitmqctl -n NODE ARGS...` against this node and return its stdout."""
        assert self.name.startswith(NODE_PREFIX)
        command = ["rabbitmqctl", "-n", self.name, *args]
        completed = subprocess.run(
            command,
            env=self._env(),
            capture_output=True,
            check=False,
            text=True,
            timeout=timeout_s,
        )
        if completed.returncode != 0:
            raise BrokerNodeError(
                f"{' '.join(command)} exited with {completed.returncode}: "
                f"{(completed.stderr or completed.stdout).strip()[-2000:]}"
            )
        return completed.stdout

    def connections(self) -> list[ConnectionInfo]:
        """List the client connections, with the name each client gave itself."""
        # The table format, because only it prints pids in the <node.N.N.N> form that
        # close_connection accepts (the JSON formatter prints #PID<N.N.N>).
        output = self.ctl(
            "list_connections", "pid", "user", "client_properties", "--silent"
        )
        found = []
        for line in output.splitlines():
            pid, _, rest = line.partition("\t")
            user, _, properties = rest.partition("\t")
            if not pid.startswith("<"):
                continue
            match = _CONNECTION_NAME.search(properties)
            name = match.group(1).replace('\\"', '"') if match else ""
            found.append(ConnectionInfo(pid=pid, connection_name=name, user=user))
        return found

    def close_connections(
        self, name_substring: str, reason: str = "closed by a test"
    ) -> int:
        """Close, from the broker side, every connection whose name contains the text.

        Returns how many it closed.
        """
        closed = 0
        for connection in self.connections():
            if name_substring in connection.connection_name:
                self.ctl("close_connection", connection.pid, reason)
                logger.info(
                    "closed connection %s (%s) on %s",
                    connection.pid,
                    connection.connection_name,
                    self.name,
                )
                closed += 1
        return closed

    def queue_counts(self, queue: str) -> tuple[int, int]:
        """Return (ready, unacknowledged) message counts of a queue on the / vhost."""
        output = self.ctl(
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "--formatter",
            "json",
            "--quiet",
        )
        for row in json.loads(output or "[]"):
            if row["name"] == queue:
                return int(row["messages_ready"]), int(row["messages_unacknowledged"])
        raise BrokerNodeError(f"queue {queue} not found on node {self.name}")

    # --- internals --------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        folder = str(self.folder)
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{folder}/mnesia",
            "RABBITMQ_LOG_BASE": f"{folder}/log",
            "RABBITMQ_CONFIG_FILE": f"{folder}/rabbitmq",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{folder}/enabled_plugins",
            "RABBITMQ_PID_FILE": f"{folder}/node.pid",
        }

    def _write_files(self) -> None:
        lines = [f"listeners.tcp.default = 127.0.0.1:{self.port}", *self.config]
        (self.folder / "rabbitmq.conf").write_text("\n".join(lines) + "\n")
        # No plugins: the management plugin would need a port of its own.
        (self.folder / "enabled_plugins").write_text("[].\n")
        owner = pwd.getpwnam("rabbitmq")
        for path in (
            self.folder,
            self.folder / "rabbitmq.conf",
            self.folder / "enabled_plugins",
        ):
            os.chown(path, owner.pw_uid, owner.pw_gid)

    def _wait_for_amqp(self, deadline: float) -> None:
        parameters = pika.URLParameters(self.url)
        parameters.connection_attempts = 1
        parameters.socket_timeout = 2
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            # A plain TCP probe first, because pika logs every refused attempt as an
            # error with a traceback.
            if not _port_open(self.port):
                time.sleep(0.2)
                continue
            try:
                pika.BlockingConnection(parameters).close()
                return
            except pika.exceptions.AMQPError as exc:
                last_error = exc
            time.sleep(0.2)
        raise BrokerNodeError(
            f"node {self.name} did not accept AMQP connections on port {self.port} "
            f"in time (last error: {last_error!r}); see {self.log_file}"
        )

    def _kill_vm(self) -> None:
        pid_file = self.folder / "node.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            return
        logger.warning("killed the Erlang VM %d of node %s", pid, self.name)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """Return a port from 5680 up that is free, with its distribution port free too."""
    # Random start, so that concurrent test runs rarely race for the same pair.
    start = FIRST_PORT + int.from_bytes(os.urandom(2), "big") % PORT_TRIES
    for index in range(PORT_TRIES):
        port = FIRST_PORT + (start - FIRST_PORT + index) % PORT_TRIES
        if _port_free(port) and _port_free(port + DIST_PORT_OFFSET):
            return port
    raise BrokerNodeError(
        f"no free port pair in {FIRST_PORT}-{FIRST_PORT + PORT_TRIES - 1} "
        f"(and {DIST_PORT_OFFSET} above)"
    )
