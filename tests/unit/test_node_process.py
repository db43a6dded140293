"""kvstore-node as a process, against a fake master (an in-test NodeRegistry)."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import xxhash

from kvstore import grants
from kvstore._proto import kvstore_pb2 as pb
from kvstore._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.tiers.dram import DramPool
from kvstore.transports import tcp_wire

SECRET = bytes(range(100, 132))
TERM = 2


class FakeRegistry(pb_grpc.NodeRegistryServicer):
    def __init__(self) -> None:
        self.registrations: list[pb.RegisterNodeRequest] = []
        self.heartbeats = 0
        self.forget = threading.Event()

    def RegisterNode(self, request, context):
        self.registrations.append(request)
        return pb.RegisterNodeResponse(term=TERM, heartbeat_ms=100, grant_secret=SECRET)

    def Heartbeat(self, request, context):
        self.heartbeats += 1
        if self.forget.is_set():
            self.forget.clear()
            return pb.HeartbeatResponse(known=False, term=TERM)
        return pb.HeartbeatResponse(known=True, term=TERM)


class FakeMaster:
    def __init__(self, port: int = 0) -> None:
        self.registry = FakeRegistry()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_NodeRegistryServicer_to_server(self.registry, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    def __init__(self, shm_dir, master: str, *flags: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kvstore.node",
                "--master",
                master,
                "--shm-dir",
                str(shm_dir),
                "--dram",
                "8MiB",
                "--prefault",
                "false",
                "--heartbeat-ms",
                "100",
                "--rpc-timeout-ms",
                "2000",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def announcement(self, timeout: float) -> list[str]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no announcement; stderr: {self.stop_and_stderr()}") from None
        return line.split()

    def stop_and_stderr(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        _, err = self.proc.communicate(timeout=10)
        return err

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=15)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def test_node_registers_heartbeats_serves_and_cleans_up(tmp_path):
    master = FakeMaster()
    node = NodeProcess(tmp_path, master.address, "--node-id", "node-7")
    try:
        words = node.announcement(timeout=30)
        assert (
            words[0] == "kvstore-node"
            and words[1] == "node-7"
            and words[2] == "data"
            and words[4] == "control"
        )
        data_address, control_address = words[3], words[5]
        reg = master.registry.registrations[0]
        assert reg.node_id == "node-7"
        assert reg.data_address == data_address and reg.control_address == control_address
        assert len(reg.incarnation) == 16 and reg.host_id
        assert os.path.dirname(reg.pool_path) == str(tmp_path) and os.path.exists(reg.pool_path)
        assert [(r.tier, r.capacity_bytes) for r in reg.regions] == [("dram", 8 << 20)]
        assert reg.pool_bytes == os.path.getsize(reg.pool_path) == reg.pool_data_offset + (8 << 20)
        wait_for(lambda: master.registry.heartbeats >= 3)

        # forgotten by the master -> registers again, same incarnation; announced only once
        master.registry.forget.set()
        wait_for(lambda: len(master.registry.registrations) >= 2)
        assert master.registry.registrations[1].incarnation == reg.incarnation
        assert node.lines.empty()

        # the master assigns a slot; a remote writer writes it over TCP with a grant signed by the master's key
        slot, gen, slot_bytes = 8192, 4, 16384
        with grpc.insecure_channel(control_address) as channel:
            stub = pb_grpc.NodeStub(channel)
            stub.ApplySlotUpdates(
                pb.SlotUpdates(
                    term=TERM,
                    namespaces=["ns"],
                    assign_slots=np.array([slot], dtype="<u8").tobytes(),
                    assign_generations=np.array([gen], dtype="<u4").tobytes(),
                    assign_keys=b"k" * 16,
                    assign_parents=bytes(16),
                    assign_slot_bytes=np.array([slot_bytes], dtype="<u8").tobytes(),
                    assign_ns_index=np.array([0], dtype="<u2").tobytes(),
                ),
                timeout=5,
            )
            grant = grants.sign(
                SECRET,
                "node-7",
                reg.incarnation,
                np.array([slot]),
                np.array([gen]),
                int(time.time() * 1000) + 30_000,
                TERM,
                grants.WRITE | grants.READ,
            )
            data = os.urandom(slot_bytes)
            host, port = data_address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                ops = np.array([(slot, 0, slot_bytes)], dtype=np.uint64)
                sock.sendall(
                    tcp_wire.encode_request_head(tcp_wire.OP_WRITE, grant.SerializeToString(), ops, len(data))
                    + data
                    + np.array([xxhash.xxh3_64_intdigest(data)], dtype="<u8").tobytes()
                )
                assert tcp_wire.read_response_head(sock) == 0
            # a same-host reader maps the pool and finds the bytes at pool_data_offset + slot
            client = DramPool.attach(reg.pool_path, reg.incarnation)
            try:
                assert client.generation(np.array([slot], dtype=np.uint64)).tolist() == [gen]
                start = reg.pool_data_offset + slot
                assert bytes(client.bytes[start : start + slot_bytes]) == data
            finally:
                client.close()
            tier = stub.GetStats(pb.NodeStatsRequest(), timeout=5).tiers[0]
            assert (tier.bytes_written, tier.slots_in_use, tier.used_bytes) == (slot_bytes, 1, slot_bytes)

        assert node.stop(signal.SIGTERM) == 0
        assert os.listdir(tmp_path) == [], "the pool file must be gone"
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
        master.stop()


def test_node_keeps_trying_until_the_master_comes_up(tmp_path):
    master_port = free_port()
    data_port = free_port()
    node = NodeProcess(tmp_path, f"127.0.0.1:{master_port}", "--data-port", str(data_port))
    master = None
    try:
        # the data plane is up before any master answers
        wait_for(lambda: any(n.startswith("kvstore-pool-") for n in os.listdir(tmp_path)), timeout=30)
        wait_for(lambda: _connects(data_port))
        time.sleep(1.0)
        assert node.lines.empty() and node.proc.poll() is None
        master = FakeMaster(master_port)
        words = node.announcement(timeout=15)
        assert words[1] == f"{socket.gethostname()}-{data_port}"
        assert words[3] == f"127.0.0.1:{data_port}"
        assert node.stop(signal.SIGINT) == 0
        assert os.listdir(tmp_path) == []
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
        if master is not None:
            master.stop()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_node_sweeps_orphans_and_fails_cleanly_without_room(tmp_path):
    orphan = tmp_path / "kvstore-pool-dead-0123456789ab"
    orphan.write_bytes(b"\0" * 4096)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvstore.node",
            "--master",
            "127.0.0.1:1",
            "--shm-dir",
            str(tmp_path),
            "--dram",
            "1PiB",
            "--prefault",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot reserve" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("secret", ["not-hex", "abcd"])
def test_bad_grant_secret_is_refused_at_start(tmp_path, secret):
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore.node", "--shm-dir", str(tmp_path), "--grant-secret", secret],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "grant-secret" in proc.stderr
    assert os.listdir(tmp_path) == []
