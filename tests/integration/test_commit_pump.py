"""The client's commit pump: layers go out as their checksums come in; the completing commit is last and durable.

A GPU write's checksums are a future (computed after its copy, on the client's
hash thread).  Here the client's ``_write`` is wrapped so that chosen layers hand
back futures the test completes by hand, and the master calls are recorded.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np

from kvstore.testing import prompt, wait_for

PAGE = 16
LAYERS = 4


def test_pump_commits_ready_layers_without_waiting_for_later_ones(cluster, client, namespace) -> None:
    writer = client(cluster, namespace)
    writer.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=16 << 10)
    gates: dict[int, tuple[concurrent.futures.Future[Any], np.ndarray]] = {}
    write = writer._write

    def gated_write(session: Any, plan: Any) -> Any:
        sums = write(session, plan)
        layer = plan.layers[0]
        if layer in (1, 2):  # checksums still "being computed"
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            gates[layer] = (future, sums)
            return future
        return sums

    sent = _recording(writer)
    writer._write = gated_write
    tokens = prompt(71, 6 * PAGE)
    kv = np.random.default_rng(71).integers(0, 256, (6, 16 << 10), dtype=np.uint8)
    for layer in range(3):
        assert writer.put_layer(tokens, layer, kv) == 6
    wait_for(lambda: sent == [([0], True)], 10, "layer 0 committed")
    future, sums = gates[1]
    future.set_result(sums)  # layer 1's checksums are in, layer 2's are not: layer 1 goes out alone
    wait_for(lambda: len(sent) == 2, 10, "layer 1 committed")
    assert sent[1] == ([1], True)
    future, sums = gates[2]
    future.set_result(sums)
    wait_for(lambda: len(sent) == 3, 10, "layer 2 committed")
    assert sent[2] == ([2], True)
    assert writer.put_layer(tokens, 3, kv) == 6  # the completing put: its commit is the last, durable
    assert sent[-1] == ([3], False)
    assert all(deferred for _, deferred in sent[:-1])
    assert writer.match_prefix(tokens) == 6 * PAGE


def _recording(writer: Any) -> list[tuple[list[int], bool]]:
    sent: list[tuple[list[int], bool]] = []
    acall = writer._master.acall

    async def recording_acall(method: str, request: Any) -> Any:
        if method == "CommitLayer":
            sent.append((np.frombuffer(request.layers, dtype="<u2").tolist(), bool(request.deferred)))
        return await acall(method, request)

    writer._master.acall = recording_acall
    return sent


def test_commit_each_layer_off_sends_one_durable_commit_per_request(cluster, client, namespace) -> None:
    writer = client(cluster, namespace, commit_each_layer=False)
    writer.create_namespace(page_size=PAGE, num_layers=LAYERS, segment_bytes=16 << 10)
    sent = _recording(writer)
    tokens = prompt(72, 5 * PAGE)
    kv = np.random.default_rng(72).integers(0, 256, (LAYERS, 5, 16 << 10), dtype=np.uint8)
    for layer in range(LAYERS - 1):
        assert writer.put_layer(tokens, layer, kv[layer]) == 5
    reader = client(cluster, namespace)
    assert sent == [] and reader.match_prefix(tokens) == 0  # nothing committed yet
    assert writer.put_layer(tokens, LAYERS - 1, kv[LAYERS - 1]) == 5
    assert sent == [(list(range(LAYERS)), False)]  # every layer in one durable commit
    hit = reader.get_prefix(tokens)
    assert hit.num_pages == 5
    assert np.array_equal(np.stack([hit.layer(i) for i in range(LAYERS)]), kv)
    # the default commits a layer without waiting for the request's last one
    eager = client(cluster, namespace)
    sent_eager = _recording(eager)
    tokens2 = prompt(73, 3 * PAGE)
    assert eager.put_layer(tokens2, 0, kv[0][:3]) == 3
    wait_for(lambda: sent_eager == [([0], True)], 10, "layer 0 committed on its own")
