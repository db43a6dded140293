"""The etcd backend with one of three etcd members dead: it moves to the next endpoint and keeps working.

Each member is killed (SIGKILL) in turn and started again before the next one; the
backends start on the first endpoint, so the first kill hits the member they use.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from kvstore.etcd_server import EtcdCluster
from kvstore.metadata import create_backend
from kvstore.metadata.etcd import EtcdBackend
from kvstore.testing import retry_unavailable

T = TypeVar("T")
LEADER_TTL_S = 1
NODE_TTL_S = 1.0
DOWN_S = 2.0  # each member stays down longer than both leases: a stuck backend would lose them
RETRY_S = 3.0  # a call that hit the dead member fails UNAVAILABLE once; the next goes elsewhere


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def backend(etcd: EtcdCluster, cluster: str) -> EtcdBackend:
    made = create_backend(etcd.endpoints, cluster=cluster, timeout_s=1.0, leader_ttl_s=LEADER_TTL_S)
    assert isinstance(made, EtcdBackend)
    return made


def retrying(call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
    return retry_unavailable(call, RETRY_S)


def test_node_lease_and_fenced_writes_survive_each_member_dying(
    etcd_cluster3: EtcdCluster, cluster_name: str
) -> None:
    async def body() -> None:
        node, master = backend(etcd_cluster3, cluster_name), backend(etcd_cluster3, cluster_name)
        try:
            leadership = await master.campaign("master-a")
            registration = await node.register_node("node-1", b"info", ttl_s=NODE_TTL_S)
            written = 0
            for member in range(3):
                await asyncio.to_thread(etcd_cluster3.kill, member)
                down_until = time.monotonic() + DOWN_S
                while time.monotonic() < down_until:
                    assert await retrying(lambda: node.keepalive_node(registration)), "node lease lost"
                    written += 1
                    put = functools.partial(master.put_if_leader, "k", str(written).encode(), leadership)
                    await retrying(put)
                    assert master.leading(leadership), f"leadership lost with member {member} down"
                    await asyncio.sleep(0.2)  # the node's heartbeat period
                dead = etcd_cluster3.members[member].endpoint
                assert dead not in (node.endpoint, master.endpoint), "a backend stayed on the dead member"
                assert await retrying(master.list_nodes) == {"node-1": b"info"}
                assert await retrying(lambda: master.get_value("k")) == str(written).encode()
                assert await retrying(lambda: master.still_leader(leadership))
                await asyncio.to_thread(etcd_cluster3.start, member)
            assert (await retrying(master.current_leadership)) == leadership
        finally:
            await node.close()
            await master.close()

    run(body())
