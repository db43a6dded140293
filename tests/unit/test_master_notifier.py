"""Notifier: per-node order, batching, frees never overtaken, failures keep the queue."""

from __future__ import annotations

import asyncio

import numpy as np

from kvstore._proto import kvstore_pb2 as pb
from kvstore.master.notifier import Notifier


def u64(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<u8").tolist()


def test_one_rpc_per_flush_in_order_and_reassignment_after_free_starts_a_new_batch() -> None:
    sent: list[tuple[int, pb.SlotUpdates]] = []

    async def send(node: int, msg: pb.SlotUpdates) -> None:
        sent.append((node, msg))

    async def run() -> None:
        notifier = Notifier(send, term=lambda: 7)
        k = bytes(16)
        notifier.enqueue_assign(1, "ns", np.array([0, 4096]), np.array([1, 1]), k * 2, k * 2, 4096)
        notifier.enqueue_commit(1, np.array([0, 4096]), np.array([0, 0]), (0, 8), np.array([11, 12]))
        notifier.enqueue_free(1, np.array([0]), np.array([2]))
        notifier.enqueue_assign(1, "ns", np.array([0]), np.array([3]), k, k, 4096)  # after the free
        notifier.enqueue_free(2, np.array([8192]), np.array([5]))
        assert await notifier.flush(1)
        assert len(sent) == 2
        first, second = sent[0][1], sent[1][1]
        assert first.term == 7 and list(first.namespaces) == ["ns"]
        assert u64(first.assign_slots) == [0, 4096]
        assert np.frombuffer(first.commit_heads, "<u2").tolist() == [0, 8, 0, 8]
        assert u64(first.commit_checksums) == [11, 12]
        assert u64(first.free_slots) == [0]
        assert u64(second.assign_slots) == [0]
        assert np.frombuffer(second.assign_generations, "<u4").tolist() == [3]
        await notifier.flush_all()
        assert [n for n, _ in sent] == [1, 1, 2]

    asyncio.run(run())


def test_a_failed_send_keeps_the_batch_and_reports_the_node() -> None:
    attempts: list[pb.SlotUpdates] = []
    failures: list[tuple[int, float]] = []
    healthy = False

    async def send(node: int, msg: pb.SlotUpdates) -> None:
        attempts.append(msg)
        if not healthy:
            raise ConnectionError("node down")

    async def run() -> None:
        nonlocal healthy
        notifier = Notifier(
            send, term=lambda: 1, on_failure=lambda n, since: failures.append((n, since)), clock=lambda: 42.0
        )
        notifier.enqueue_free(3, np.array([4096]), np.array([9]))
        assert not await notifier.flush(3)
        assert notifier.failing(3) and failures == [(3, 42.0)]
        notifier.enqueue_free(3, np.array([8192]), np.array([4]))
        healthy = True
        assert await notifier.flush(3)
        assert not notifier.failing(3)
        assert u64(attempts[-1].free_slots) == [4096, 8192]  # the failed batch went first
        assert notifier.pending(3) == 0

    asyncio.run(run())


def test_background_flush() -> None:
    sent: list[pb.SlotUpdates] = []

    async def send(node: int, msg: pb.SlotUpdates) -> None:
        sent.append(msg)

    async def run() -> None:
        notifier = Notifier(send, term=lambda: 1, flush_interval_s=0.001)
        notifier.start()
        try:
            notifier.enqueue_free(0, np.array([0]), np.array([2]))
            for _ in range(200):
                if sent:
                    break
                await asyncio.sleep(0.005)
        finally:
            await notifier.stop()
        assert len(sent) == 1

    asyncio.run(run())


def test_an_urgent_flush_goes_behind_the_batch_in_flight_and_failures_come_back_in_order() -> None:
    written: list[list[int]] = []
    answers: list[asyncio.Future[None]] = []

    async def send(node: int, msg: pb.SlotUpdates) -> None:  # only for announce_term
        raise AssertionError("not used")

    async def post(node: int, msg: pb.SlotUpdates) -> asyncio.Future[None]:
        written.append(u64(msg.free_slots))
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        answers.append(answer)
        return answer

    async def run() -> None:
        notifier = Notifier(send, term=lambda: 1, post=post)
        notifier.enqueue_free(0, np.array([4096]), np.array([2]))
        first = asyncio.ensure_future(notifier.flush(0))
        await asyncio.sleep(0)
        assert written == [[4096]]  # written, not answered
        notifier.enqueue_free(0, np.array([8192]), np.array([2]))
        second = asyncio.ensure_future(notifier.flush(0))  # urgent: does not wait for the first answer
        await asyncio.sleep(0)
        assert written == [[4096], [8192]]
        notifier.enqueue_free(0, np.array([12288]), np.array([2]))
        lazy = asyncio.ensure_future(notifier.flush(0, urgent=False))  # waits for the answer in flight
        await asyncio.sleep(0)
        assert len(written) == 2
        answers[0].set_exception(ConnectionError("stream broke"))  # the node may have applied neither
        answers[1].set_exception(ConnectionError("stream broke"))
        assert not await first and not await second
        assert notifier.failing(0)
        for _ in range(100):
            if len(written) == 5:
                break
            await asyncio.sleep(0)
        # the failed batches went back first, in the order they were taken, then the new one
        assert written[2:] == [[4096], [8192], [12288]]
        for answer in answers[2:]:
            answer.set_result(None)
        assert await lazy
        assert not notifier.failing(0) and notifier.pending(0) == 0

    asyncio.run(run())
