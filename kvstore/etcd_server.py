"""Find and run a throw-away etcd server for tests and tools.

:func:`find_etcd` locates the binary (``$ETCD_BIN``, else ``etcd`` on PATH).
:class:`EtcdServer` runs one single-member etcd on free loopback ports with a
temporary data directory and fast election settings (ready in ~0.1 s), and can
stop it gently, kill it with SIGKILL, pause it (SIGSTOP, a partition as seen by
clients) and start it again on the same data directory and ports.
:class:`EtcdCluster` runs several such members as one etcd cluster (each an
:class:`EtcdServer` with its own ports and data directory), to kill one member
while the others keep a quorum.

This module is for tests and local tools; production runs a real etcd cluster.
Its methods block (subprocess, HTTP polling); call them from a thread when an
event loop is running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

_INSTALL_HINT = (
    "no etcd server binary found: set ETCD_BIN to an etcd executable, put `etcd` on PATH, "
    "or run `make setup` (it installs Debian's etcd-server package)"
)


def find_etcd() -> str:
    """Path of the etcd binary: ``$ETCD_BIN``, else ``etcd`` on PATH; FileNotFoundError otherwise."""
    # The one environment read outside kvstore.config: this is test/tool plumbing, not a kvstore setting.
    explicit = os.environ.get("ETCD_BIN", "")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise FileNotFoundError(f"ETCD_BIN={explicit!r} is not an executable file; {_INSTALL_HINT}")
    found = shutil.which("etcd")
    if found:
        return found
    raise FileNotFoundError(_INSTALL_HINT)


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """One single-member etcd on 127.0.0.1 with its own data directory.

    ``start()`` picks free client and peer ports the first time; ``restart()``
    (and ``start()`` after ``stop()``/``kill()``) reuses the same ports and data
    directory, so clients reconnect to the same address and find their data.
    ``cleanup()`` stops it and removes the directory it created.
    """

    def __init__(
        self,
        binary: str | None = None,
        data_dir: str | None = None,
        host: str = "127.0.0.1",
        heartbeat_ms: int = 10,
        election_ms: int = 50,
        ready_timeout_s: float = 15.0,
        extra_args: tuple[str, ...] = (),
        name: str = "kvstore-test",
    ) -> None:
        self.binary = binary or find_etcd()
        self.name = name
        self._own_dir = data_dir is None
        self.base_dir = Path(data_dir or tempfile.mkdtemp(prefix="kvstore-etcd-"))
        self.host = host
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.ready_timeout_s = ready_timeout_s
        self.extra_args = tuple(extra_args)
        self.client_port = 0
        self.peer_port = 0
        # ``--initial-cluster`` (name=peer URL, ...); empty: a cluster of this member alone.
        self.initial_cluster = ""
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses
    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` of the client port (the value of ``--etcd``)."""
        return f"{self.host}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "etcd.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle
    def _command(self) -> list[str]:
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(self.heartbeat_ms),
            "--election-timeout", str(self.election_ms),
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> EtcdServer:
        """Start etcd (same ports and data after a stop) and wait until it serves requests."""
        self.launch()
        self.wait_ready()
        return self

    def pick_ports(self, taken: Sequence[int] = ()) -> None:
        """Choose free client and peer ports (once; kept across restarts), avoiding ``taken``."""
        if self.client_port:
            return
        avoid = set(taken)
        while not self.client_port or self.client_port in avoid:
            self.client_port = _free_port(self.host)
        avoid.add(self.client_port)
        while not self.peer_port or self.peer_port in avoid:
            self.peer_port = _free_port(self.host)

    def launch(self) -> None:
        """Start the process without waiting: a cluster member is ready only once a quorum runs."""
        if self.running():
            return
        self.pick_ports()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        log_fh = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed on stop
        try:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                start_new_session=True,  # a Ctrl-C in the test runner must not reach etcd first
            )
        finally:
            log_fh.close()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Poll ``/health`` until etcd has a leader and answers; raise with its log tail otherwise."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.ready_timeout_s)
        delay = 0.005
        last_error = ""
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc is not None else None
                raise RuntimeError(f"etcd exited with status {code} while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.client_url + "/health", timeout=0.5) as resp:
                    if resp.status == 200 and b'"true"' in resp.read():
                        return
                    last_error = f"HTTP {resp.status}"
            except (OSError, urllib.error.URLError) as exc:
                last_error = str(exc)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"etcd at {self.endpoint} not ready: {last_error}\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit in time)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused etcd cannot handle SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash; the data directory keeps whatever etcd had synced."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._proc = None

    def pause(self, timeout_s: float = 5.0) -> None:
        """SIGSTOP: clients see an etcd that neither answers nor closes connections.

        Returns once every thread is stopped (signal delivery is asynchronous, and a
        request sent in between would still be answered).
        """
        if not self.running():
            return
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout_s
        while not self._all_threads_stopped(self._proc.pid):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"etcd (pid {self._proc.pid}) did not stop within {timeout_s} s")
            time.sleep(0.001)

    @staticmethod
    def _all_threads_stopped(pid: int) -> bool:
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return True  # gone
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat", "rb") as fh:
                    # The state follows the parenthesised command name, which may contain spaces.
                    state = fh.read().rsplit(b")", 1)[1].split()[0]
            except (FileNotFoundError, IndexError):
                continue
            if state not in (b"T", b"t"):
                return False
        return True

    def resume(self) -> None:
        if self.running():
            assert self._proc is not None
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, kill: bool = False) -> EtcdServer:
        """Stop (or SIGKILL with ``kill=True``) and start again on the same ports and data."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop etcd and remove the directory this object created."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, max_bytes: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no etcd log)"
        return data[-max_bytes:].decode(errors="replace")

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"EtcdServer({self.endpoint or 'unstarted'}, {state}, data={self.data_dir})"


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 forming one cluster, each an :class:`EtcdServer`.

    ``endpoints`` (also ``endpoint``, the value of ``--etcd``) lists every member's
    client address.  ``kill(i)``/``stop(i)``/``pause(i)`` act on member ``i`` (on all
    members without an index); ``start(i)``/``restart(i)`` bring one back on its old
    ports and data directory, where it rejoins the others.
    """

    def __init__(
        self, size: int = 3, binary: str | None = None, data_dir: str | None = None, **member_args: Any
    ) -> None:
        if size < 1:
            raise ValueError(f"an etcd cluster needs at least one member, got {size}")
        self._own_dir = data_dir is None
        self.base_dir = Path(data_dir or tempfile.mkdtemp(prefix="kvstore-etcd-cluster-"))
        binary = binary or find_etcd()
        self.members = [
            EtcdServer(binary, str(self.base_dir / f"member{i}"), name=f"member{i}", **member_args)
            for i in range(size)
        ]
        taken: list[int] = []
        for member in self.members:
            member.pick_ports(taken)
            taken += [member.client_port, member.peer_port]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    @property
    def endpoints(self) -> str:
        """Every member's ``HOST:PORT``, comma separated."""
        return ",".join(m.endpoint for m in self.members)

    endpoint = endpoints  # the same interface as EtcdServer: the value of ``--etcd``

    def _chosen(self, index: int | None) -> list[EtcdServer]:
        return self.members if index is None else [self.members[index]]

    def running(self, index: int | None = None) -> bool:
        return all(m.running() for m in self._chosen(index))

    def start(self, index: int | None = None) -> EtcdCluster:
        """Start the chosen members (all by default) together, then wait until each serves."""
        chosen = self._chosen(index)
        for member in chosen:
            member.launch()
        for member in chosen:
            member.wait_ready()
        return self

    def stop(self, index: int | None = None) -> None:
        for member in self._chosen(index):
            member.stop()

    def kill(self, index: int | None = None) -> None:
        for member in self._chosen(index):
            member.kill()

    def pause(self, index: int | None = None) -> None:
        for member in self._chosen(index):
            member.pause()

    def resume(self, index: int | None = None) -> None:
        for member in self._chosen(index):
            member.resume()

    def restart(self, index: int | None = None, kill: bool = False) -> EtcdCluster:
        for member in self._chosen(index):
            if kill:
                member.kill()
            else:
                member.stop()
        return self.start(index)

    def cleanup(self) -> None:
        for member in self.members:
            member.cleanup()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, max_bytes: int = 4000) -> str:
        return "\n".join(f"-- {m.name} ({m.log_path})\n{m.log_tail(max_bytes)}" for m in self.members)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"EtcdCluster({self.members!r})"
