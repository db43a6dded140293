"""The embedded metadata backend: namespaces, values, node TTLs on a fake clock, election terms, fencing."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from kvstore.errors import ErrorCode, KVStoreError
from kvstore.metadata import NODE_DELETE, NODE_PUT, NodeEvent, create_backend
from kvstore.metadata.embedded import EmbeddedBackend

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_factory_without_endpoints_is_embedded() -> None:
    assert isinstance(create_backend(""), EmbeddedBackend)
    assert isinstance(create_backend("  ", cluster="other"), EmbeddedBackend)


def test_namespace_put_if_absent_keeps_the_first() -> None:
    async def body() -> None:
        md = EmbeddedBackend()
        assert await md.get_namespace("llama/bf16") is None
        assert await md.put_namespace_if_absent("llama/bf16", b"spec-1") is None
        assert await md.put_namespace_if_absent("llama/bf16", b"spec-2") == b"spec-1"
        assert await md.get_namespace("llama/bf16") == b"spec-1"
        assert await md.list_namespaces() == {"llama/bf16": b"spec-1"}
        assert await md.delete_namespace("llama/bf16") is True
        assert await md.delete_namespace("llama/bf16") is False
        assert await md.list_namespaces() == {}

    run(body())


def test_values_and_cluster_config() -> None:
    async def body() -> None:
        md = EmbeddedBackend()
        assert await md.get_or_create("grant_secret", b"a") == b"a"
        assert await md.get_or_create("grant_secret", b"b") == b"a"
        assert await md.get_value("grant_secret") == b"a"
        assert await md.get_value("missing") is None
        assert await md.get_cluster_config() is None
        await md.put_cluster_config(b"high_watermark = 0.9\n")
        assert await md.get_cluster_config() == b"high_watermark = 0.9\n"

    run(body())


def test_node_registration_expires_after_ttl_without_keepalive() -> None:
    async def body() -> None:
        clock = FakeClock()
        md = EmbeddedBackend(clock=clock)
        reg = await md.register_node("node-a", b"info-a", ttl_s=5.0)
        other = await md.register_node("node-b", b"info-b", ttl_s=5.0)
        clock.advance(4.0)
        assert await md.keepalive_node(reg)  # node-a: expires at +9 now; node-b still at +5
        clock.advance(1.5)
        assert await md.list_nodes() == {"node-a": b"info-a"}
        assert not await md.keepalive_node(other)
        assert not await md.update_node(other, b"late")
        assert await md.update_node(reg, b"info-a2")
        clock.advance(3.4)
        assert await md.list_nodes() == {"node-a": b"info-a2"}
        clock.advance(0.2)
        assert await md.list_nodes() == {}
        assert not await md.keepalive_node(reg)
        # Unregistering an expired registration is not an error; re-registering starts afresh.
        await md.unregister_node(reg)
        again = await md.register_node("node-a", b"back", ttl_s=5.0)
        assert again.lease_id != reg.lease_id
        assert not await md.keepalive_node(reg), "the old handle must not keep the new registration alive"
        assert await md.list_nodes() == {"node-a": b"back"}

    run(body())


def test_node_registration_rejects_bad_input() -> None:
    async def body() -> None:
        md = EmbeddedBackend()
        with pytest.raises(KVStoreError) as err:
            await md.register_node("", b"", 5)
        assert err.value.code == ErrorCode.INVALID_ARGUMENT
        with pytest.raises(KVStoreError):
            await md.register_node("n", b"", 0)

    run(body())


def test_watch_nodes_sees_existing_puts_deletes_and_expiry() -> None:
    async def body() -> None:
        clock = FakeClock()
        md = EmbeddedBackend(clock=clock, sweep_interval_s=0.01)
        first = await md.register_node("node-a", b"a", ttl_s=2.0)
        watch = md.watch_nodes()
        assert await anext(watch) == NodeEvent(NODE_PUT, "node-a", b"a")
        second = await md.register_node("node-b", b"b", ttl_s=10.0)
        assert await anext(watch) == NodeEvent(NODE_PUT, "node-b", b"b")
        await md.update_node(second, b"b2")
        assert await anext(watch) == NodeEvent(NODE_PUT, "node-b", b"b2")
        clock.advance(3.0)  # node-a's TTL lapses; the watcher's sweep notices without any other call
        assert await anext(watch) == NodeEvent(NODE_DELETE, "node-a", b"")
        await md.unregister_node(second)
        assert await anext(watch) == NodeEvent(NODE_DELETE, "node-b", b"")
        assert not await md.keepalive_node(first)
        await watch.aclose()

        only_new = md.watch_nodes(include_existing=False)
        pending = asyncio.ensure_future(anext(only_new))
        await asyncio.sleep(0.01)  # a generator starts watching when first pulled
        await md.register_node("node-c", b"c", ttl_s=1.0)
        assert await pending == NodeEvent(NODE_PUT, "node-c", b"c")
        await only_new.aclose()

    run(body())


def test_first_campaign_leads_with_term_one_and_terms_grow() -> None:
    async def body() -> None:
        md = EmbeddedBackend()
        assert await md.leader() is None
        first = await md.campaign("master-a:50051")
        assert (first.term, first.leader_address) == (1, "master-a:50051")
        assert md.leading(first) and await md.still_leader(first)
        assert await md.leader() == "master-a:50051"
        assert await md.current_leadership() == first

        standby = asyncio.ensure_future(md.campaign("master-b:50051"))
        await asyncio.sleep(0.05)
        assert not standby.done(), "a second candidate must wait while the first leads"
        assert await md.list_masters() == ["master-a:50051", "master-b:50051"]
        lost = asyncio.ensure_future(md.wait_lost(first))

        await md.resign()
        second = await standby
        assert second.term == 2 and second.leader_address == "master-b:50051"
        assert await lost == "resigned"
        assert not md.leading(first) and not await md.still_leader(first)
        assert await md.leader() == "master-b:50051"
        assert await md.current_leadership() == second
        assert await md.list_masters() == ["master-b:50051"]

        await md.resign()
        third = await md.campaign("master-a:50051")
        assert third.term == 3

    run(body())


def test_deposed_leader_writes_are_fenced() -> None:
    async def body() -> None:
        md = EmbeddedBackend()
        old = await md.campaign("a")
        await md.put_if_leader("epoch", b"1", old)
        assert await md.get_value("epoch") == b"1"
        await md.resign()
        new = await md.campaign("b")
        for write in (
            md.put_if_leader("epoch", b"stale", old),
            md.put_namespace_if_absent("ns", b"spec", leadership=old),
            md.delete_namespace("ns", leadership=old),
            md.put_cluster_config(b"x", leadership=old),
        ):
            with pytest.raises(KVStoreError) as err:
                await write
            assert err.value.code == ErrorCode.NOT_LEADER
            assert "the leader is b (term 2)" in err.value.message
        assert await md.get_value("epoch") == b"1"
        assert await md.put_namespace_if_absent("ns", b"spec", leadership=new) is None
        assert await md.delete_namespace("ns", leadership=new)
        await md.put_if_leader("epoch", b"2", new)
        assert await md.get_value("epoch") == b"2"

    run(body())


def test_close_wakes_waiting_candidates() -> None:
    async def body() -> None:
        md = EmbeddedBackend()
        await md.campaign("a")
        waiting = asyncio.ensure_future(md.campaign("b"))
        await asyncio.sleep(0.01)
        await md.close()
        with pytest.raises(KVStoreError) as err:
            await waiting
        assert err.value.code == ErrorCode.UNAVAILABLE

    run(body())
