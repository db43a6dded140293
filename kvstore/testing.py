"""A whole kvstore cluster as real processes, for tests, benchmarks and ``kvstore up``.

:class:`Cluster` starts a master and N nodes with ``sys.executable -m ...``,
waits for each one's readiness line on stdout (with a deadline), and stops them
with SIGTERM (SIGKILL after a deadline).  ``Cluster(etcd=True, masters=3)`` also
starts a throw-away etcd (:class:`kvstore.etcd_server.EtcdServer`) and three
masters on it (one leads, the others stand by), with helpers to kill, stop,
pause (SIGSTOP) and resume masters and etcd, and to find the leader.  ``etcd_members=3``
makes that etcd a 3-member cluster (:class:`kvstore.etcd_server.EtcdCluster`); masters
and nodes get all its endpoints (``etcd_endpoint``, also for clients that use ``--etcd``).  After a stop, no pool file of its
nodes may be left in the shared-memory directory: a node that exited on
SIGTERM and left one has leaked it, which :meth:`Cluster.stop` reports.

Each process's stdout and stderr go to a log file in a temporary directory;
:meth:`Cluster.log_tail` returns the tails for failure reports.  Children die
with the process that started them (``PR_SET_PDEATHSIG``), so a test runner
killed mid-run leaves no services behind.

Nothing here sleeps to synchronise: callers wait for a condition with
:func:`wait_for`.  :func:`run_in_process`, :func:`process_pool` and
:func:`submit` run client work (:func:`put_layers`, :func:`get_layers`...) in
separate interpreters (multiprocessing spawn: gRPC does not survive fork).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import functools
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import grpc
import numpy as np

from kvstore import config as kvconfig
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.errors import ErrorCode, KVStoreError, from_rpc_error
from kvstore.etcd_server import EtcdCluster, EtcdServer
from kvstore.tiers.dram import POOL_PREFIX, sweep_orphans

MASTER_READY = re.compile(r"kvstore-master listening on (\S+)")
NODE_READY = re.compile(r"kvstore-node (\S+) data (\S+) control (\S+)")

# Settings the harness sets itself; callers choose them through Cluster's own arguments.
_HARNESS_OWNED = frozenset(
    {
        "port",
        "master",
        "dram",
        "shm_dir",
        "node_id",
        "grant_secret",
        "host",
        "config",
        "etcd",
        "cluster",
        "nvme",
    }
)

# Run before the real command, in the child: die with the parent (PR_SET_PDEATHSIG = 1),
# then exec the service.  A preexec_fn would do the same but is unsafe in a threaded parent.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(70)\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n"
)

_T = TypeVar("_T")

# Leases, quarantine and node liveness short enough that tests can watch them run out.
FAST_SETTINGS: dict[str, int] = {
    "read_lease_ms": 2000,
    "write_lease_ms": 2000,
    "quarantine_ms": 500,
    "heartbeat_ms": 200,
    "node_ttl_ms": 1500,
}

# With etcd: the shortest leader lease the test etcd allows (its election timeout is 50 ms).
FAST_ETCD_SETTINGS: dict[str, int] = {**FAST_SETTINGS, "leader_ttl_ms": 1000}

# How long harness calls to "the leader" keep looking for one across a failover.
LEADER_WAIT_S = 20.0


class ClusterError(RuntimeError):
    """A cluster process failed to start, died, or left state behind."""


async def retry_unavailable(
    call: Callable[[], Awaitable[_T]], within_s: float = 5.0, pause_s: float = 0.02
) -> _T:
    """Await ``call()`` again while it fails with UNAVAILABLE (a restarted or lost etcd member), up to ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except KVStoreError as exc:
            if exc.code != ErrorCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        await asyncio.sleep(pause_s)


def wait_for(predicate: Callable[[], _T], timeout: float, what: str, interval: float = 0.01) -> _T:
    """Poll ``predicate`` until it returns something truthy; return that, or raise TimeoutError naming ``what``.

    Exceptions from the predicate propagate: a check that cannot be made is a failure, not a "not yet".
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 1.5, 0.1)


def row_hashes(rows: np.ndarray) -> np.ndarray:
    """XXH3_64 of each row of a 2-D uint8 array (what the store commits for a whole-range shard)."""
    from kvstore import native

    flat = np.ascontiguousarray(rows).reshape(len(rows), -1)
    starts = np.arange(len(flat), dtype=np.uint64) * np.uint64(flat.shape[1]) + np.uint64(flat.ctypes.data)
    return native.hash_ranges(np.stack([starts, np.full(len(flat), flat.shape[1], dtype=np.uint64)], axis=1))


def committed_checksums(control_address: str, tier: str = "") -> set[int]:
    """Every layer-commit checksum a node's region holds (its inventory)."""
    with grpc.insecure_channel(control_address) as channel:
        inventory = pb_grpc.NodeStub(channel).GetInventory(pb.InventoryRequest(tier=tier), timeout=5.0)
    return set(np.frombuffer(inventory.slots.commit_checksums, dtype="<u8").tolist())


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _safe_name(text: str) -> str:
    """Node ids the harness picks are safe as file-name parts, so pool files can be told apart by name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _child_env(inherit_settings: bool) -> dict[str, str]:
    env = dict(os.environ)
    if not inherit_settings:
        # A developer's KVSTORE_* variables must not change what a test cluster does.
        for name in [n for n in env if n.startswith("KVSTORE_")]:
            del env[name]
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ManagedProcess:
    """One service process: started, watched for its readiness line, logged, stopped."""

    def __init__(
        self, name: str, argv: Sequence[str], ready: re.Pattern[str], log_path: str, env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._ready_pattern = ready
        self._ready = threading.Event()
        self._match: re.Match[str] | None = None
        self._log: IO[str] = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed in _pump
        self._log.write(f"$ {' '.join(self.argv)}\n")
        stderr = open(log_path, "ab", buffering=0)  # noqa: SIM115 - the child owns its copy
        launcher = (
            [sys.executable, "-c", _LAUNCHER, str(os.getpid())]
            if sys.platform == "linux"
            else [sys.executable]
        )
        try:
            self.proc = subprocess.Popen(
                launcher + self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=dict(env),
                text=True,
                start_new_session=True,  # a terminal's Ctrl-C reaches the harness, which stops children in order
            )
        finally:
            stderr.close()
        self.killed = False  # ended by SIGKILL (ours): its files may legitimately be left behind
        self.retired = False  # ended on purpose (kill_node, kill_master...): not a crash to report
        self._pump_thread = threading.Thread(target=self._pump, name=f"log-{name}", daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            if self._match is None:
                match = self._ready_pattern.search(line)
                if match:
                    self._match = match
                    self._ready.set()
        self._log.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float) -> re.Match[str]:
        def ready_or_dead() -> bool:
            return self._ready.is_set() or not self.alive()

        try:
            wait_for(ready_or_dead, timeout, f"{self.name} to print its readiness line")
        except TimeoutError as exc:
            raise ClusterError(f"{exc}\n{self.log_tail()}") from None
        if self._match is None:
            self._pump_thread.join(timeout=2.0)
            if self._match is None:
                raise ClusterError(
                    f"{self.name} exited with status {self.proc.returncode} before it was ready\n"
                    f"{self.log_tail()}"
                )
        return self._match

    def send_signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.killed = True

    def stop(self, timeout: float, sig: int = signal.SIGTERM) -> int:
        """Signal, wait up to ``timeout``, then SIGKILL; return the exit status."""
        self.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            code = self.proc.wait()
        self._pump_thread.join(timeout=2.0)
        return code

    def wait_exit(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self._pump_thread.join(timeout=2.0)
        return code

    def log_tail(self, lines: int = 80) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                tail = fh.readlines()[-lines:]
        except OSError:
            tail = []
        return f"---- {self.name} ({self.log_path}), last {len(tail)} lines ----\n" + "".join(tail)


@dataclass
class NodeHandle:
    """A node slot of the cluster; ``process`` is its current incarnation."""

    index: int
    node_id: str
    process: ManagedProcess | None = None
    data_address: str = ""
    control_address: str = ""
    history: list[ManagedProcess] = field(default_factory=list)


class Cluster:
    """A master (or several, on etcd) and ``nodes`` storage nodes as subprocesses on loopback.

    ``settings`` are any rows of :data:`kvstore.config.SETTINGS` (``read_lease_ms=2000``,
    ``heartbeat_ms=200``...): each goes to the masters, the nodes, or both, by the
    components the table lists for it.  ``dram`` sizes each node.  ``etcd=True``
    starts an etcd of the cluster's own (or pass a running
    :class:`~kvstore.etcd_server.EtcdServer`), and ``masters`` masters use it; the
    embedded backend (no etcd) allows one master.  Use it as a context manager,
    or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        nodes: int = 1,
        *,
        dram: str | int = "64MiB",
        shm_dir: str | None = None,
        port: int = 0,
        host: str = "127.0.0.1",
        grant_secret: str | None = None,
        node_ids: Sequence[str] | None = None,
        masters: int = 1,
        etcd: bool | EtcdServer | EtcdCluster = False,
        etcd_members: int = 1,
        cluster_name: str | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        inherit_settings_env: bool = False,
        extra_env: Mapping[str, str] | None = None,
        keep_logs: bool = False,
        nvme: str | int | None = None,
        nvme_dir: str | None = None,
        **settings: Any,
    ) -> None:
        by_name = {s.name: s for s in kvconfig.SETTINGS}
        for name in settings:
            if name not in by_name:
                raise TypeError(f"Cluster: {name!r} is not a kvstore setting")
            if name in _HARNESS_OWNED:
                raise TypeError(f"Cluster: set {name!r} through Cluster's own argument")
        if masters < 1 or (masters > 1 and not etcd):
            raise ValueError("several masters need etcd (etcd=True); the embedded backend has one")
        if masters > 1 and port:
            raise ValueError("several masters listen on ports of their own: leave port at 0")
        self._master_flags: list[str] = []
        self._node_flags: list[str] = []
        for name, value in settings.items():
            if value is None:
                continue
            setting = by_name[name]
            if kvconfig.MASTER in setting.components:
                self._master_flags += [setting.flag, _flag_value(value)]
            if kvconfig.NODE in setting.components:
                self._node_flags += [setting.flag, _flag_value(value)]
        self.settings = dict(settings)
        self.dram = kvconfig.parse_size(dram)
        # tiers: ``nvme`` sizes each node's NVMe region, in ``nvme_dir`` (default: a fresh directory
        # on the disk that holds the temp directory, removed at stop)
        self.nvme = kvconfig.parse_size(nvme) if nvme else 0
        self._owns_nvme_dir = bool(self.nvme) and nvme_dir is None
        self.nvme_dir = nvme_dir or (tempfile.mkdtemp(prefix="kvstore-nvme-test-") if self.nvme else "")
        self.host = host
        self.port = port
        self.grant_secret = grant_secret if grant_secret is not None else secrets.token_hex(32)
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.keep_logs = keep_logs
        self._env = {**_child_env(inherit_settings_env), **(extra_env or {})}
        self._owns_shm_dir = shm_dir is None
        if not shm_dir:
            _sweep_stale_cluster_dirs(_default_shm_parent())
        self.shm_dir = shm_dir or tempfile.mkdtemp(prefix="kvstore-test-", dir=_default_shm_parent())
        self.log_dir = tempfile.mkdtemp(prefix="kvstore-logs-")
        ids = list(node_ids) if node_ids is not None else [f"node{i}" for i in range(nodes)]
        if len(ids) != nodes:
            raise ValueError(f"{len(ids)} node ids for {nodes} nodes")
        self.nodes = [NodeHandle(i, _safe_name(node_id)) for i, node_id in enumerate(ids)]
        self.etcd: EtcdServer | EtcdCluster | None = (
            etcd if isinstance(etcd, EtcdServer | EtcdCluster) else None
        )
        self._owns_etcd = etcd is True
        if etcd_members < 1 or (etcd_members > 1 and not self._owns_etcd):
            raise ValueError("etcd_members > 1 needs etcd=True (the cluster starts its own etcd members)")
        self.etcd_members = etcd_members
        self.cluster_name = cluster_name or f"test-{secrets.token_hex(4)}"
        self.master_count = masters
        self.masters: list[ManagedProcess | None] = [None] * masters
        self.master_addresses: list[str] = [""] * masters
        self._master_history: list[ManagedProcess] = []
        self._channels: dict[str, grpc.Channel] = {}
        self._leader = ""  # address of the master last found leading
        self._clients: list[Any] = []
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and exc_type is not KeyboardInterrupt:
            print(self.log_tail(), file=sys.stderr)
            self.keep_logs = True
        self.stop(check=exc_type is None)

    @property
    def master(self) -> ManagedProcess | None:
        """The first master's process (the only one without etcd)."""
        return self.masters[0]

    @property
    def master_address(self) -> str:
        """What clients are given: every master's address, comma separated (they find the leader)."""
        return ",".join(a for a in self.master_addresses if a)

    @property
    def etcd_endpoint(self) -> str:
        """The value of ``--etcd``: every member's address, comma separated."""
        return self.etcd.endpoint if self.etcd is not None else ""

    def start(self) -> Cluster:
        if self._started:
            return self
        self._started = True
        try:
            if self._owns_etcd:
                etcd_dir = os.path.join(self.log_dir, "etcd")
                if self.etcd_members > 1:
                    self.etcd = EtcdCluster(self.etcd_members, data_dir=etcd_dir).start()
                else:
                    self.etcd = EtcdServer(data_dir=etcd_dir).start()
            for i in range(self.master_count):
                self._start_master(i)
            if self.etcd is not None:
                self.wait_leader(self.startup_timeout)
            for node in self.nodes:
                self._start_node(node)
            self.wait_nodes_alive(len(self.nodes), self.startup_timeout)
        except BaseException:
            self.keep_logs = True
            self.stop(check=False)
            raise
        return self

    def _start_master(self, i: int) -> None:
        port = self.port
        if self.master_addresses[i]:  # a restart: the same port, so clients and nodes find it again
            port = int(self.master_addresses[i].rsplit(":", 1)[1])
        argv = [
            "-m",
            "kvstore.master",
            "--host",
            self.host,
            "--port",
            str(port),
            "--grant-secret",
            self.grant_secret,
            *self._master_flags,
        ]
        if self.etcd is not None:
            argv += ["--etcd", self.etcd_endpoint, "--cluster", self.cluster_name]
        name = "master" if self.master_count == 1 else f"master{i}"
        generation = sum(1 for p in self._master_history if p.name.startswith(name + "#") or p.name == name)
        label = name if generation == 0 else f"{name}#{generation}"
        process = ManagedProcess(
            label, argv, MASTER_READY, os.path.join(self.log_dir, f"{label}.log"), self._env
        )
        self.masters[i] = process
        self._master_history.append(process)
        match = process.wait_ready(self.startup_timeout)
        self.master_addresses[i] = match.group(1)

    def _start_node(self, node: NodeHandle) -> None:
        argv = [
            "-m",
            "kvstore.node",
            "--master",
            self.master_address,
            "--host",
            self.host,
            "--node-id",
            node.node_id,
            "--dram",
            str(self.dram),
            "--shm-dir",
            self.shm_dir,
            "--grant-secret",
            self.grant_secret,
            *self._node_flags,
        ]
        if self.nvme:
            argv += ["--nvme", f"{self.nvme}:{self.nvme_dir}"]
        if self.etcd is not None:
            argv += ["--etcd", self.etcd_endpoint, "--cluster", self.cluster_name]
        generation = len(node.history)
        log = os.path.join(self.log_dir, f"{node.node_id}.{generation}.log")
        process = ManagedProcess(f"{node.node_id}#{generation}", argv, NODE_READY, log, self._env)
        node.process = process
        node.history.append(process)
        # a node pre-faults its pool before it is ready: first touch runs at ~1 GB/s here and on the H100 host
        match = process.wait_ready(self.startup_timeout + self.dram / 1e9)
        node.data_address, node.control_address = match.group(2), match.group(3)

    def stop(self, check: bool = True) -> None:
        """Stop nodes, then the masters, then etcd; sweep what killed nodes left; raise if a clean exit leaked a pool file."""
        if self._stopped:
            return
        self._stopped = True
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        for process in self.masters:
            if process is not None and process.alive():
                process.send_signal(signal.SIGCONT)  # a paused master cannot handle SIGTERM
        for node in self.nodes:
            if node.process is not None and node.process.alive():
                node.process.send_signal(signal.SIGCONT)
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.process is not None:
                node.process.stop(self.stop_timeout)
        for process in self.masters:
            if process is not None:
                process.stop(self.stop_timeout)
        if self.etcd is not None and self._owns_etcd:
            self.etcd.cleanup()
        leaks = self._sweep_pool_files()
        if self._owns_shm_dir:
            shutil.rmtree(self.shm_dir, ignore_errors=True)
        if self._owns_nvme_dir:
            shutil.rmtree(self.nvme_dir, ignore_errors=True)
        if not self.keep_logs and not leaks:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if leaks and check:
            raise ClusterError(
                f"pool files left behind by nodes that exited cleanly: {leaks}\nlogs kept in {self.log_dir}"
            )

    def _sweep_pool_files(self) -> list[str]:
        """Remove our nodes' pool files nobody holds; return those of nodes that were not SIGKILLed."""
        prefixes = {POOL_PREFIX + node.node_id + "-": node for node in self.nodes}
        leaks: list[str] = []
        try:
            names = os.listdir(self.shm_dir)
        except FileNotFoundError:
            return leaks
        for name in names:
            if not name.startswith(POOL_PREFIX):
                continue
            owner = next((node for prefix, node in prefixes.items() if name.startswith(prefix)), None)
            if owner is None and not self._owns_shm_dir:
                continue  # another cluster's file in a shared directory
            path = os.path.join(self.shm_dir, name)
            if _locked(path):
                continue  # a live process holds it: not ours to judge
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            if owner is None or not owner.process or not owner.process.killed:
                leaks.append(name)
        return leaks

    # ------------------------------------------------------------ node control
    def kill_node(self, index: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` to node ``index`` and wait for it to exit; return its exit status."""
        node = self.nodes[index]
        if node.process is None or not node.process.alive():
            raise ClusterError(f"node {index} is not running")
        node.process.retired = True
        node.process.send_signal(sig)
        return node.process.wait_exit(timeout)

    def restart_node(self, index: int) -> NodeHandle:
        """Start node ``index`` again (same node id, new incarnation); stops it first if it runs."""
        node = self.nodes[index]
        if node.process is not None and node.process.alive():
            node.process.stop(self.stop_timeout)
        self._start_node(node)
        self.wait_nodes_alive(len(self.nodes), self.startup_timeout)
        return node

    def wait_nodes_alive(self, count: int, timeout: float) -> list[pb.NodeStatus]:
        def enough() -> list[pb.NodeStatus]:
            self.check_alive()
            alive = [n for n in self.list_nodes().nodes if n.alive]
            return alive if len(alive) >= count else []

        return wait_for(enough, timeout, f"{count} live node(s) registered with the master")

    def check_alive(self) -> None:
        """Raise if a master or a node that should run has died."""
        procs = list(self.masters) + [n.process for n in self.nodes if n.process]
        for proc in procs:
            if (
                proc is not None
                and not proc.alive()
                and proc.proc.returncode is not None
                and not (proc.killed or proc.retired)
            ):
                raise ClusterError(f"{proc.name} died with status {proc.proc.returncode}\n{proc.log_tail()}")

    # ------------------------------------------------------------ master control (several masters on etcd)
    def _master_process(self, index: int) -> ManagedProcess:
        process = self.masters[index]
        if process is None:
            raise ClusterError(f"master {index} was never started")
        return process

    def kill_master(self, index: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` (default SIGKILL) to master ``index`` and wait for it to exit; return its status."""
        process = self._master_process(index)
        if not process.alive():
            raise ClusterError(f"master {index} is not running")
        process.retired = True
        process.send_signal(sig)
        if self._leader == self.master_addresses[index]:
            self._leader = ""
        return process.wait_exit(timeout)

    def stop_master(self, index: int) -> int:
        """SIGTERM: a clean stop (a leader resigns, so a standby takes over at once)."""
        return self.kill_master(index, signal.SIGTERM, self.stop_timeout)

    def pause_master(self, index: int) -> None:
        """SIGSTOP: the master neither answers nor renews its lease (a partition, a long GC pause)."""
        self._master_process(index).send_signal(signal.SIGSTOP)
        if self._leader == self.master_addresses[index]:
            self._leader = ""

    def resume_master(self, index: int) -> None:
        self._master_process(index).send_signal(signal.SIGCONT)

    def restart_master(self, index: int) -> ManagedProcess:
        """Start master ``index`` again on its old port (stopping it first if it runs)."""
        process = self._master_process(index)
        if process.alive():
            process.send_signal(signal.SIGCONT)
            process.stop(self.stop_timeout)
        self._start_master(index)
        return self._master_process(index)

    def serving_leader(self, index: int, timeout: float = 2.0) -> bool:
        """Whether master ``index`` answers as the leader right now (a call only a leader answers).

        The probe is a heartbeat of an unknown node: a leader answers it from memory (known=false),
        a standby or a leader still rebuilding refuses it, and it never touches etcd.
        """
        process = self.masters[index]
        if process is None or not process.alive():
            return False
        stub = pb_grpc.NodeRegistryStub(self._channel(self.master_addresses[index]))
        try:
            stub.Heartbeat(pb.HeartbeatRequest(node_id="kvstore-testing-probe"), timeout=timeout)
        except grpc.RpcError:
            return False
        return True

    def leader_index(self, exclude: Sequence[int] = ()) -> int | None:
        """The index of the master serving as leader now (None: none), skipping ``exclude`` (paused ones)."""
        for i in range(self.master_count):
            if i not in exclude and self.serving_leader(i):
                return i
        return None

    def wait_leader(self, timeout: float = LEADER_WAIT_S, exclude: Sequence[int] = ()) -> int:
        """Wait until a master (not in ``exclude``) serves as leader; return its index."""

        def found() -> int | None:
            self.check_alive()
            index = self.leader_index(exclude)
            return None if index is None else index + 1  # 0 is falsy

        found_index = wait_for(found, timeout, "a master to lead")
        assert found_index is not None
        self._leader = self.master_addresses[found_index - 1]
        return found_index - 1

    # ------------------------------------------------------------ etcd control
    def _etcd_server(self) -> EtcdServer | EtcdCluster:
        if self.etcd is None:
            raise ClusterError("this cluster runs without etcd")
        return self.etcd

    def etcd_member(self, index: int) -> EtcdServer:
        """Member ``index`` of the cluster's etcd (``kill()``, ``start()``, ``pause()`` it alone)."""
        etcd = self._etcd_server()
        if isinstance(etcd, EtcdCluster):
            return etcd.members[index]
        if index != 0:
            raise ClusterError(f"this cluster's etcd has one member, not {index + 1}")
        return etcd

    def kill_etcd(self) -> None:
        """SIGKILL etcd (its data directory keeps what it had synced)."""
        self._etcd_server().kill()

    def start_etcd(self) -> None:
        """Start etcd again on the same ports and data directory."""
        self._etcd_server().start()

    def restart_etcd(self, kill: bool = True) -> None:
        self._etcd_server().restart(kill=kill)

    def pause_etcd(self) -> None:
        self._etcd_server().pause()

    def resume_etcd(self) -> None:
        self._etcd_server().resume()

    # ------------------------------------------------------------ access
    def _channel(self, address: str) -> grpc.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.insecure_channel(address)
        return channel

    @property
    def leader_address(self) -> str:
        """The leading master's address (looked up when not known: several masters)."""
        if self.master_count == 1:
            return self.master_addresses[0]
        if not self._leader:
            self.wait_leader(LEADER_WAIT_S)
        return self._leader

    @property
    def channel(self) -> grpc.Channel:
        """A channel to the leading master."""
        return self._channel(self.leader_address)

    @property
    def admin(self) -> pb_grpc.AdminStub:
        return pb_grpc.AdminStub(self.channel)

    @property
    def kvstore_stub(self) -> pb_grpc.KVStoreStub:
        return pb_grpc.KVStoreStub(self.channel)

    def call(self, method: Callable[..., _T], request: Any, timeout: float = 10.0) -> _T:
        """A raw stub call with a deadline; failures come back as KVStoreError."""
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def call_leader(self, stub_class: Callable[[grpc.Channel], Any], method: str, request: Any) -> Any:
        """Call the leading master, following it across a failover (for up to LEADER_WAIT_S)."""
        deadline = time.monotonic() + LEADER_WAIT_S
        while True:
            try:
                return self.call(getattr(stub_class(self.channel), method), request)
            except KVStoreError as exc:
                if self.master_count == 1 or exc.code not in (ErrorCode.NOT_LEADER, ErrorCode.UNAVAILABLE):
                    raise
                if time.monotonic() >= deadline:
                    raise
                self._leader = ""

    def list_nodes(self) -> pb.ListNodesResponse:
        return self.call_leader(pb_grpc.AdminStub, "ListNodes", pb.ListNodesRequest())

    def stats(self) -> pb.ClusterStatsResponse:
        return self.call_leader(pb_grpc.AdminStub, "ClusterStats", pb.ClusterStatsRequest())

    def evict(self, namespace: str = "") -> pb.EvictResponse:
        return self.call_leader(
            pb_grpc.AdminStub, "Evict", pb.EvictRequest(namespace=namespace, all=not namespace)
        )

    def client(self, namespace: str, **cfg: Any) -> Any:
        """A KVStoreClient for this cluster; ``cfg`` are client settings (``transport="tcp"``)."""
        from kvstore.client import KVStoreClient

        client = KVStoreClient(
            self.master_address, namespace=namespace, config=kvconfig.load(cfg, environ={})
        )
        self._clients.append(client)
        return client

    def pool_files(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.shm_dir) if n.startswith(POOL_PREFIX))
        except FileNotFoundError:
            return []

    def processes(self) -> Iterator[ManagedProcess]:
        yield from self._master_history
        for node in self.nodes:
            yield from node.history

    def log_tail(self, lines: int = 80) -> str:
        tails = [p.log_tail(lines) for p in self.processes()]
        if self.etcd is not None:
            tails.append(f"---- {self.etcd!r} ----\n{self.etcd.log_tail()}")
        return "\n".join(tails)


STALE_DIR_AGE_S = 600.0


def _sweep_stale_cluster_dirs(parent: str | None) -> None:
    """Remove what clusters of crashed test processes left: orphaned pool files, then their old empty dirs."""
    if parent is None:
        return
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        with contextlib.suppress(OSError):
            if not name.startswith("kvstore-test-") or time.time() - os.path.getmtime(path) < STALE_DIR_AGE_S:
                continue  # young: a cluster may be starting there
            sweep_orphans(path)  # only files no live node holds a lock on
            if not os.listdir(path):
                os.rmdir(path)


def _default_shm_parent() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


# ---------------------------------------------------------------------------------------------------------
# Client work in another process (spawn).  Results and KVStoreErrors cross back; KVStoreError does not
# pickle as itself, so workers return ("error", code name, message) and the parent raises it again.


async def master_in_process(
    regions: Sequence[pb.RegionInfo],
    *,
    sender: Callable[[int, pb.SlotUpdates], Awaitable[None]] | None = None,
    clock: Callable[[], float] | None = None,
    node_id: str = "n1",
    **settings: Any,
) -> Any:
    """A started leader ``Master`` in this process with one registered node of ``regions``.

    For tests of the master's logic without gRPC: slot updates go to ``sender``
    (default: dropped), the node's inventory is empty.  ``settings`` override the
    defaults (short leases, 1 MiB arenas).
    """
    from kvstore.master.core import Master
    from kvstore.metadata.embedded import EmbeddedBackend

    cfg = kvconfig.load(
        {"read_lease_ms": 2000, "write_lease_ms": 2000, "arena_bytes": 1 << 20, **settings}, environ={}
    )

    async def drop(node: int, msg: pb.SlotUpdates) -> None:
        return None

    async def empty_inventory(record: Any) -> pb.InventoryResponse:
        return pb.InventoryResponse()

    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    master = Master(cfg, EmbeddedBackend(), sender=sender or drop, **extra)
    master.nodes.inventory = empty_inventory  # type: ignore[method-assign]
    await master.start("test:1", background=False)
    await master.register_node(
        pb.RegisterNodeRequest(
            node_id=node_id,
            incarnation=node_id.encode().ljust(16, b"."),
            host_id="h",
            control_address="127.0.0.1:1",
            data_address="127.0.0.1:2",
            pool_path="/dev/shm/x",
            regions=list(regions),
        )
    )
    return master


def run_cli(
    *args: str, timeout: float = 60.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``kvstore ARGS`` in a child process, free of this process's KVSTORE_* settings (plus ``env``)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run(
        [sys.executable, "-m", "kvstore.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
    )


def put_or_no_room(client: Any, tokens: np.ndarray, layers: Sequence[np.ndarray]) -> int:
    """Write every layer; returns the pages written, 0 when the store answers NO_ROOM (RESOURCE_EXHAUSTED)."""
    try:
        written = [client.put_layer(tokens, layer, data) for layer, data in enumerate(layers)]
    except KVStoreError as exc:
        assert exc.status.name == "RESOURCE_EXHAUSTED", exc
        return 0
    assert len(set(written)) == 1, written
    return int(written[0])


def spawn_context() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def process_pool(workers: int = 1) -> Iterator[concurrent.futures.ProcessPoolExecutor]:
    """Spawned worker processes; they are shut down (and joined) on exit."""
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=spawn_context())
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _guarded(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, Any, str]:
    try:
        return ("ok", fn(*args, **kwargs), "")
    except KVStoreError as exc:
        return ("error", exc.code.name, exc.message)


def _unwrap(outcome: tuple[str, Any, str]) -> Any:
    kind, value, message = outcome
    if kind == "error":
        raise KVStoreError(ErrorCode[value], message)
    return value


def run_in_process(fn: Callable[..., _T], *args: Any, timeout: float = 60.0, **kwargs: Any) -> _T:
    """Run ``fn(*args, **kwargs)`` in a fresh spawned interpreter and return its result (or raise its KVStoreError)."""
    with process_pool(1) as pool:
        return submit(pool, fn, *args, **kwargs).result(timeout)


def submit(
    pool: concurrent.futures.ProcessPoolExecutor, fn: Callable[..., _T], *args: Any, **kwargs: Any
) -> concurrent.futures.Future[_T]:
    """Submit to a spawned pool; the returned future re-raises the worker's KVStoreError as one."""
    inner = pool.submit(_guarded, fn, args, kwargs)
    outer: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def done(future: concurrent.futures.Future[tuple[str, Any, str]]) -> None:
        try:
            outer.set_result(_unwrap(future.result()))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            outer.set_exception(exc)

    inner.add_done_callback(done)
    return outer


def client_for(master: str, namespace: str, transport: str = "auto") -> Any:
    from kvstore.client import KVStoreClient

    return KVStoreClient(
        master, namespace=namespace, config=kvconfig.load({"transport": transport}, environ={})
    )


def put_layers(
    master: str,
    namespace: str,
    tokens: np.ndarray,
    layers: Sequence[np.ndarray],
    transport: str = "auto",
    tp_rank: int = 0,
    tp_size: int = 1,
    layer_ids: Sequence[int] | None = None,
) -> list[int]:
    """Write ``layers[i]`` (``[pages, shard_bytes]``) as layer ``layer_ids[i]``; the pages each call wrote."""
    client = client_for(master, namespace, transport)
    try:
        ids = list(layer_ids) if layer_ids is not None else list(range(len(layers)))
        return [
            int(client.put_layer(tokens, layer, kv, tp_rank=tp_rank, tp_size=tp_size))
            for layer, kv in zip(ids, layers, strict=True)
        ]
    finally:
        _close(client)


def get_layers(
    master: str,
    namespace: str,
    tokens: np.ndarray,
    transport: str = "auto",
    layers: Sequence[int] | None = None,
    heads: tuple[int, int] | None = None,
    lease: Any = None,
) -> tuple[int, list[np.ndarray]]:
    """Read a prefix; return (pages, a copy of each asked layer as ``[pages, bytes]``)."""
    client = client_for(master, namespace, transport)
    try:
        kwargs: dict[str, Any] = {"layers": list(layers) if layers is not None else None, "heads": heads}
        if lease is not None:
            kwargs["lease"] = lease
        hit = client.get_prefix(tokens, **kwargs)
        return int(hit.num_pages), [np.array(hit.layer(i), dtype=np.uint8, copy=True) for i in hit.layers]
    finally:
        _close(client)


def get_layers_gpu(
    master: str,
    namespace: str,
    tokens: np.ndarray,
    transport: str = "auto",
    lease: Any = None,
) -> tuple[int, np.ndarray, list[str]]:
    """vram: read every layer of a prefix into a CuPy ``out`` on GPU 0 (in a spawned process).

    Returns (pages, a host copy of ``out[:, :pages]``, the nodes whose VRAM region this
    client opened over CUDA IPC).
    """
    import cupy

    client = client_for(master, namespace, transport)
    try:
        layout = client.layout
        num_pages = len(tokens) // layout.page_size
        out = cupy.zeros((layout.num_layers, num_pages, layout.segment_bytes), dtype=cupy.uint8)
        kwargs: dict[str, Any] = {} if lease is None else {"lease": lease}
        hit = client.get_prefix(tokens, out=out, **kwargs)
        opened = sorted(
            node for node, (_, ipc) in client._transports._ipc.items() if ipc is not None and ipc._pointers
        )
        return int(hit.num_pages), cupy.asnumpy(out[:, : hit.num_pages]), opened
    finally:
        _close(client)


def hold_put_session(
    master: str,
    namespace: str,
    tokens: np.ndarray,
    layers: Sequence[np.ndarray],
    layer_ids: Sequence[int],
    ready: Any,
    transport: str = "auto",
) -> None:
    """Write some layers of a put, tell the parent, then wait to be killed (the session is never finished)."""
    client = client_for(master, namespace, transport)
    written = [int(client.put_layer(tokens, layer, kv)) for layer, kv in zip(layer_ids, layers, strict=True)]
    ready.put(written)
    while True:  # the parent SIGKILLs this process; nothing to synchronise with
        time.sleep(3600)


def put_get_workload(
    master: str,
    namespace: str,
    first_seed: int,
    progress: Any,
    stop: Any,
    pages: int = 4,
    segment_bytes: int = 4096,
    transport: str = "auto",
    **settings: Any,
) -> dict[str, Any]:
    """Put one prompt after another and read back what was put, until ``stop`` (an Event) is set.

    A put that fails is retried (same prompt) on the next round, so a put caught by a
    failover shows that callers can simply retry.  After each completed put,
    ``progress.put((seed, unix time))``.  Every read compares the bytes it got with
    what was written: a page with other bytes is recorded under "wrong" (it must
    never happen); fewer pages than written is a miss.  Returns counts, the error
    codes seen, the puts completed with their times, and the longest single call.
    """
    from kvstore.client import KVStoreClient

    client = KVStoreClient(
        master, namespace=namespace, config=kvconfig.load({"transport": transport, **settings}, environ={})
    )
    layout = client.layout
    done: list[tuple[int, float]] = []
    report: dict[str, Any] = {
        "errors": {},
        "wrong": [],
        "reads": 0,
        "misses": 0,
        "retried": 0,
        "max_call_s": 0.0,
    }

    def timed(fn: Callable[[], _T]) -> _T:
        started = time.monotonic()
        try:
            return fn()
        finally:
            report["max_call_s"] = max(report["max_call_s"], time.monotonic() - started)

    def failed(exc: KVStoreError) -> None:
        report["errors"][exc.code.name] = report["errors"].get(exc.code.name, 0) + 1

    seed, retrying = first_seed, False
    try:
        while not stop.is_set():
            tokens = prompt(seed, pages * layout.page_size)
            try:
                for layer in range(layout.num_layers):
                    kv = page_bytes(seed * 1000 + layer, pages, segment_bytes)
                    timed(functools.partial(client.put_layer, tokens, layer, kv))
            except KVStoreError as exc:
                failed(exc)
                retrying = True
                continue
            done.append((seed, time.time()))
            progress.put((seed, done[-1][1]))
            report["retried"] += int(retrying)
            seed, retrying = seed + 1, False
            for check, _ in (done[-1], done[len(done) // 2]):
                try:
                    check_tokens = prompt(check, pages * layout.page_size)
                    hit = timed(functools.partial(client.get_prefix, check_tokens))
                except KVStoreError as exc:
                    failed(exc)
                    continue
                report["reads"] += 1
                report["misses"] += int(hit.num_pages < pages)
                for layer in range(layout.num_layers):
                    want = page_bytes(check * 1000 + layer, pages, segment_bytes)[: hit.num_pages]
                    if not np.array_equal(hit.layer(layer), want):
                        report["wrong"].append(check)
    finally:
        _close(client)
    report["done"] = done
    return report


def _close(client: Any) -> None:
    close = getattr(client, "close", None)
    if callable(close):
        close()


# ---------------------------------------------------------------------------------------------------------
# Deterministic test data: any process can rebuild what another wrote.


def prompt(seed: int, length: int, vocab: int = 128_000) -> np.ndarray:
    """A token sequence that differs from every other seed's from its first token on."""
    tokens = np.random.default_rng(seed).integers(0, vocab, length, dtype=np.int64)
    tokens[0] = vocab + seed  # distinct first page for distinct seeds
    return tokens


def page_bytes(seed: int, pages: int, nbytes: int) -> np.ndarray:
    """``[pages, nbytes]`` of random bytes for one layer (or shard) of one prompt."""
    return np.random.default_rng(seed).integers(0, 256, (pages, nbytes), dtype=np.uint8)


def matched_tokens(result: Any, page_size: int) -> int:
    """match_prefix's answer as a token count, whether it is a count or an object carrying one."""
    if isinstance(result, int | np.integer):
        return int(result)
    if hasattr(result, "num_tokens"):
        return int(result.num_tokens)
    return int(result.num_pages) * page_size


def check_serves(cluster: Cluster, transport: str = "auto") -> None:
    """Assert that the cluster still takes a put and serves it back (after a bad request, a kill...)."""
    namespace = f"health/{secrets.token_hex(4)}"
    client = cluster.client(namespace, transport=transport)
    try:
        client.create_namespace(page_size=4, num_layers=2, segment_bytes=4096)
        tokens = prompt(int.from_bytes(secrets.token_bytes(2), "little"), 8)
        layers = [page_bytes(layer, 2, 4096) for layer in range(2)]
        written = [client.put_layer(tokens, layer, kv) for layer, kv in enumerate(layers)]
        if written != [2, 2]:
            raise AssertionError(f"health put wrote {written} pages per layer, expected [2, 2]")
        hit = client.get_prefix(tokens)
        if hit.num_pages != 2 or not all(np.array_equal(hit.layer(i), layers[i]) for i in range(2)):
            raise AssertionError(f"health get returned {hit.num_pages} pages or different bytes")
    finally:
        _close(client)
