"""The etcd metadata backend against a real etcd (kvstore.etcd_server.EtcdServer, fast election flags)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.etcd_server import EtcdServer
from kvstore.metadata import NODE_DELETE, NODE_PUT, NODE_RESYNC, NodeEvent, create_backend
from kvstore.metadata.etcd import EtcdBackend
from kvstore.testing import retry_unavailable

T = TypeVar("T")
LEADER_TTL_S = 1  # etcd's smallest lease with the test server's 50 ms election timeout


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def backend(server: EtcdServer, cluster: str, timeout_s: float = 1.0) -> EtcdBackend:
    made = create_backend(server.endpoint, cluster=cluster, timeout_s=timeout_s, leader_ttl_s=LEADER_TTL_S)
    assert isinstance(made, EtcdBackend)
    return made


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within_s:
            raise AssertionError(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def next_event(watch: AsyncIterator[NodeEvent], timeout_s: float = 5.0) -> NodeEvent:
    return await asyncio.wait_for(anext(watch), timeout_s)


# ---------------------------------------------------------------- namespaces, values, config


def test_namespaces_values_and_config_round_trip(etcd: EtcdServer, cluster_name: str) -> None:
    async def body() -> None:
        md, other_cluster = backend(etcd, cluster_name), backend(etcd, cluster_name + "-other")
        try:
            assert await md.get_namespace("llama3-8b/bf16") is None
            assert await md.put_namespace_if_absent("llama3-8b/bf16", b"spec-1") is None
            assert await md.put_namespace_if_absent("llama3-8b/bf16", b"spec-2") == b"spec-1"
            assert await md.put_namespace_if_absent("mistral/fp8", b"\x00\xffbinary") is None
            assert await md.get_namespace("llama3-8b/bf16") == b"spec-1"
            assert await md.list_namespaces() == {
                "llama3-8b/bf16": b"spec-1",
                "mistral/fp8": b"\x00\xffbinary",
            }
            assert await other_cluster.list_namespaces() == {}, (
                "clusters sharing an etcd must not see each other"
            )
            assert await md.delete_namespace("mistral/fp8") is True
            assert await md.delete_namespace("mistral/fp8") is False
            assert await md.list_namespaces() == {"llama3-8b/bf16": b"spec-1"}

            assert await md.get_or_create("grant_secret", b"first") == b"first"
            assert await other_cluster.get_or_create("grant_secret", b"theirs") == b"theirs"
            assert await md.get_or_create("grant_secret", b"second") == b"first"
            assert await md.get_value("grant_secret") == b"first"

            assert await md.get_cluster_config() is None
            await md.put_cluster_config(b"high_watermark = 0.9\n")
            assert await md.get_cluster_config() == b"high_watermark = 0.9\n"
        finally:
            await md.close()
            await other_cluster.close()

    run(body())


# ---------------------------------------------------------------- node registrations


def test_node_registration_disappears_after_its_ttl_when_keepalives_stop(
    etcd: EtcdServer, cluster_name: str
) -> None:
    async def body() -> None:
        node, master = backend(etcd, cluster_name), backend(etcd, cluster_name)
        try:
            reg = await node.register_node("node-1", b"info-1", ttl_s=1.0)
            assert await master.list_nodes() == {"node-1": b"info-1"}
            # Keepalives hold it well past its TTL...
            for _ in range(6):
                await asyncio.sleep(0.3)
                assert await node.keepalive_node(reg)
            assert await master.list_nodes() == {"node-1": b"info-1"}
            assert await node.update_node(reg, b"info-1b")
            assert await master.list_nodes() == {"node-1": b"info-1b"}
            # ...and without them it goes (etcd checks lease expiry every 500 ms).
            took = await eventually(lambda: _absent(master, "node-1"), 4.0, "expired node still listed")
            assert took >= 0.5
            assert not await node.keepalive_node(reg)
            assert not await node.update_node(reg, b"late")
            await node.unregister_node(reg)  # no error for an expired registration
        finally:
            await node.close()
            await master.close()

    run(body())


async def _absent(md: EtcdBackend, node_id: str) -> bool:
    return node_id not in await md.list_nodes()


def test_watch_sees_put_update_and_delete(etcd: EtcdServer, cluster_name: str) -> None:
    async def body() -> None:
        node, master = backend(etcd, cluster_name), backend(etcd, cluster_name)
        watch = master.watch_nodes()
        try:
            existing = await node.register_node("node-0", b"zero", ttl_s=5)
            assert await next_event(watch) == NodeEvent(NODE_PUT, "node-0", b"zero")
            reg = await node.register_node("node-1", b"one", ttl_s=5)
            assert await next_event(watch) == NodeEvent(NODE_PUT, "node-1", b"one")
            await node.update_node(reg, b"one-b")
            assert await next_event(watch) == NodeEvent(NODE_PUT, "node-1", b"one-b")
            await node.unregister_node(reg)
            assert await next_event(watch) == NodeEvent(NODE_DELETE, "node-1", b"")
            await node.unregister_node(existing)
            assert await next_event(watch) == NodeEvent(NODE_DELETE, "node-0", b"")
        finally:
            await watch.aclose()
            await node.close()
            await master.close()

    run(body())


def test_watch_resumes_after_etcd_kill_and_restart_without_losing_events(
    fresh_etcd: EtcdServer, cluster_name: str
) -> None:
    async def body() -> None:
        writer, master = backend(fresh_etcd, cluster_name), backend(fresh_etcd, cluster_name)
        watch = master.watch_nodes()
        try:
            first = await writer.register_node("node-1", b"one", ttl_s=30)
            assert await next_event(watch) == NodeEvent(NODE_PUT, "node-1", b"one")

            await asyncio.to_thread(fresh_etcd.restart, True)  # kill -9, same data dir and ports
            # These land while the watcher is disconnected (it is not even being pulled):
            # it must replay them from its last revision, in order.
            await retry_unavailable(lambda: writer.register_node("node-2", b"two", ttl_s=30))
            await writer.register_node("node-3", b"three", ttl_s=30)
            await writer.unregister_node(first)

            seen = [await next_event(watch, 10) for _ in range(3)]
            assert seen == [
                NodeEvent(NODE_PUT, "node-2", b"two"),
                NodeEvent(NODE_PUT, "node-3", b"three"),
                NodeEvent(NODE_DELETE, "node-1", b""),
            ]
            # And it keeps following live changes on the new connection.
            await writer.register_node("node-4", b"four", ttl_s=30)
            assert await next_event(watch) == NodeEvent(NODE_PUT, "node-4", b"four")
            assert set(await master.list_nodes()) == {"node-2", "node-3", "node-4"}
        finally:
            await watch.aclose()
            await writer.close()
            await master.close()

    run(body())


def test_watch_resyncs_after_compaction(fresh_etcd: EtcdServer, cluster_name: str) -> None:
    async def body() -> None:
        writer, master = backend(fresh_etcd, cluster_name), backend(fresh_etcd, cluster_name)
        watch = master.watch_nodes()
        try:
            gone = await writer.register_node("node-gone", b"g", ttl_s=30)
            kept = await writer.register_node("node-kept", b"k", ttl_s=30)
            assert {await next_event(watch), await next_event(watch)} == {
                NodeEvent(NODE_PUT, "node-gone", b"g"),
                NodeEvent(NODE_PUT, "node-kept", b"k"),
            }
            await asyncio.to_thread(fresh_etcd.restart, True)
            await retry_unavailable(lambda: writer.unregister_node(gone))
            await writer.update_node(kept, b"k2")
            await writer.register_node("node-new", b"n", ttl_s=30)
            await writer.update_node(kept, b"k3")
            # Compact away the history the watcher has not seen.
            client = writer._client()
            head = await client.put(writer.prefix + b"unrelated", b"x")
            await client.compact(head.header.revision, physical=True)

            seen = [await next_event(watch, 10) for _ in range(4)]
            assert seen[0] == NodeEvent(NODE_RESYNC, "", b"")
            assert seen[1:] == [
                NodeEvent(NODE_DELETE, "node-gone", b""),
                NodeEvent(NODE_PUT, "node-kept", b"k3"),
                NodeEvent(NODE_PUT, "node-new", b"n"),
            ]
            await writer.register_node("node-later", b"l", ttl_s=30)
            assert await next_event(watch) == NodeEvent(NODE_PUT, "node-later", b"l")
        finally:
            await watch.aclose()
            await writer.close()
            await master.close()

    run(body())


# ---------------------------------------------------------------- leader election


def test_one_candidate_leads_the_other_waits_then_takes_over_on_lease_expiry(
    etcd: EtcdServer, cluster_name: str
) -> None:
    async def body() -> None:
        a, b, observer = (backend(etcd, cluster_name) for _ in range(3))
        try:
            assert await observer.leader() is None
            first = await a.campaign("master-a:1")
            assert first.leader_address == "master-a:1" and first.term >= 1
            standby = asyncio.ensure_future(b.campaign("master-b:1"))
            await asyncio.sleep(1.5 * LEADER_TTL_S)  # longer than a lease: A's keepalives hold it
            assert not standby.done(), "the standby must wait while the leader keeps its lease"
            assert a.leading(first) and await a.still_leader(first)
            assert await observer.leader() == "master-a:1"
            assert await observer.current_leadership() == first
            assert await observer.list_masters() == ["master-a:1", "master-b:1"]

            # A dies without resigning (its keepalives stop): its lease lapses and B takes over.
            died = time.monotonic()
            await a.close()
            second = await asyncio.wait_for(standby, 5)
            failover_s = time.monotonic() - died
            assert second.leader_address == "master-b:1"
            assert second.term > first.term and second.token > first.token
            assert failover_s < LEADER_TTL_S + 1.5, f"failover took {failover_s:.2f} s"
            assert await observer.leader() == "master-b:1"
            assert await observer.current_leadership() == second
            assert await observer.list_masters() == ["master-b:1"]
            assert b.leading(second) and await b.still_leader(second)
        finally:
            for md in (a, b, observer):
                await md.close()

    run(body())


def test_revoked_leader_is_deposed_and_its_fenced_writes_fail(etcd: EtcdServer, cluster_name: str) -> None:
    async def body() -> None:
        a, b, admin = (backend(etcd, cluster_name) for _ in range(3))
        try:
            first = await a.campaign("master-a:1")
            await a.put_if_leader("epoch", b"a", first)
            assert await admin.get_value("epoch") == b"a"
            lost = asyncio.ensure_future(a.wait_lost(first))
            standby = asyncio.ensure_future(b.campaign("master-b:1"))
            await asyncio.sleep(0.1)
            assert not standby.done()

            # An operator (or an etcd-side expiry) removes A's lease; A has not noticed yet.
            assert a._kept is not None
            await admin._revoke(a._kept.lease_id)
            second = await asyncio.wait_for(standby, 5)
            assert second.term == first.term + 1

            # A's own clock still says "leading", but etcd's fence stops its writes.
            with pytest.raises(KVStoreError) as err:
                await a.put_if_leader("epoch", b"stale", first)
            assert err.value.code == ErrorCode.NOT_LEADER
            assert "master-b:1" in err.value.message
            for write in (
                a.put_namespace_if_absent("ns", b"spec", leadership=first),
                a.delete_namespace("ns", leadership=first),
                a.put_cluster_config(b"stale", leadership=first),
            ):
                with pytest.raises(KVStoreError) as err:
                    await write
                assert err.value.code == ErrorCode.NOT_LEADER
            assert await admin.get_value("epoch") == b"a"
            assert await admin.get_namespace("ns") is None
            assert await admin.get_cluster_config() is None
            assert not a.leading(first) and not await a.still_leader(first)
            assert "another leadership" in await asyncio.wait_for(lost, 2) or "revoked" in lost.result()

            # The same fence presented from any process fails; the new leader's writes pass.
            with pytest.raises(KVStoreError):
                await admin.put_if_leader("epoch", b"stale", first)
            await b.put_if_leader("epoch", b"b", second)
            assert await b.put_namespace_if_absent("ns", b"spec", leadership=second) is None
            assert await b.put_namespace_if_absent("ns", b"other", leadership=second) == b"spec"
            await b.put_cluster_config(b"cfg", leadership=second)
            assert await admin.get_value("epoch") == b"b"
            assert await b.delete_namespace("ns", leadership=second)
            assert await admin.get_cluster_config() == b"cfg"

            # A can campaign again and becomes a standby behind B.
            again = asyncio.ensure_future(a.campaign("master-a:1"))
            await asyncio.sleep(0.1)
            assert not again.done()
            await b.resign()
            third = await asyncio.wait_for(again, 3)
            assert third.term == second.term + 1
        finally:
            for md in (a, b, admin):
                await md.close()

    run(body())


def test_stalled_leader_stops_leading_by_its_own_clock(etcd: EtcdServer, cluster_name: str) -> None:
    async def body() -> None:
        a, b = backend(etcd, cluster_name), backend(etcd, cluster_name)
        try:
            first = await a.campaign("master-a:1")
            standby = asyncio.ensure_future(b.campaign("master-b:1"))

            # Partition the leader from etcd: its keepalives time out from now on.
            async def partitioned(lease_id: int, timeout_s: float | None = None) -> int:
                await asyncio.sleep(timeout_s or 1.0)
                raise KVStoreError(ErrorCode.UNAVAILABLE, "partitioned")

            a._refresh = partitioned  # type: ignore[method-assign]
            stalled = time.monotonic()
            reason = await asyncio.wait_for(a.wait_lost(first), 3)
            assert "no keepalive" in reason
            # It stops before etcd can expire the lease: no keepalive for a whole TTL, less the margin.
            assert time.monotonic() - stalled <= LEADER_TTL_S
            assert not a.leading(first)
            with pytest.raises(KVStoreError) as err:
                await a.put_if_leader("epoch", b"stale", first)
            assert err.value.code == ErrorCode.NOT_LEADER
            second = await asyncio.wait_for(standby, 5)
            assert second.term == first.term + 1
        finally:
            await a.close()
            await b.close()

    run(body())


def test_resign_hands_over_at_once(etcd: EtcdServer, cluster_name: str) -> None:
    async def body() -> None:
        a, b = backend(etcd, cluster_name), backend(etcd, cluster_name)
        try:
            first = await a.campaign("master-a:1")
            standby = asyncio.ensure_future(b.campaign("master-b:1"))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await a.resign()
            second = await asyncio.wait_for(standby, 2)
            assert time.monotonic() - started < 0.5, "a resignation must not wait for the lease TTL"
            assert second.term == first.term + 1
            assert await a.wait_lost(first) == "this backend does not hold that leadership"
            assert not a.leading(first)
        finally:
            await a.close()
            await b.close()

    run(body())


def test_paused_etcd_gives_unavailable_and_the_leader_steps_down_in_time(
    fresh_etcd: EtcdServer, cluster_name: str
) -> None:
    async def body() -> None:
        a = backend(fresh_etcd, cluster_name, timeout_s=0.5)
        try:
            first = await a.campaign("master-a:1")
            fresh_etcd.pause()
            try:
                started = time.monotonic()
                with pytest.raises(KVStoreError) as err:
                    await a.get_namespace("x")
                assert err.value.code == ErrorCode.UNAVAILABLE
                assert time.monotonic() - started < 1.5
                # etcd silent: still leading only while the lease is provably alive.
                await asyncio.wait_for(a.wait_lost(first), LEADER_TTL_S + 0.5)
                assert not await a.still_leader(first)
            finally:
                fresh_etcd.resume()
            # etcd back: the same backend works again and can lead again.
            again = await asyncio.wait_for(a.campaign("master-a:1"), 10)
            assert again.term == first.term + 1
            assert await retry_unavailable(lambda: a.leader()) == "master-a:1"
        finally:
            await a.close()

    run(body())
