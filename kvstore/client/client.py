"""The synchronous client SDK.

Control calls (gRPC) run on the client's own event-loop thread
(:mod:`kvstore.client.loop`); data moves in the calling thread through the
transport chosen per node (:mod:`kvstore.transports`), with the GIL released
inside the native copy.  Every argument is checked here before any RPC.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import struct
import threading
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import xxhash

from kvstore import gpu as gpu_plane
from kvstore import hostid, keys
from kvstore._proto import kvstore_pb2 as pb
from kvstore.client.buffers import byte_view, check_size
from kvstore.client.control import MasterConnection
from kvstore.client.loop import LoopThread
from kvstore.client.sessions import PutSession, SessionCache, SessionKey
from kvstore.client.stream import PrefixStream
from kvstore.client.types import Lease, PrefixHit
from kvstore.config import Config, load
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.layout import Layout, shard_checksums
from kvstore.memo import LruMemo
from kvstore.transports import CopyPlan, NodeBatch, TransportSelector, node_batches

log = logging.getLogger("kvstore.client")

_U32 = struct.Struct("<I")
_KEY_MEMO_SIZE = 16  # sequences whose page keys a client remembers
PUT_TIERS = ("auto", "dram", "vram")  # the put_tier setting (vram: where puts ask to be placed)
LeaseRef = Lease | str


def _log_release_failure(lease_id: str, future: concurrent.futures.Future[Any]) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        # It expires on its own; the read itself succeeded.
        log.info("release of lease %s failed: %s", lease_id, exc)


def _pages_of(result: concurrent.futures.Future[int], opened: concurrent.futures.Future[PutSession]) -> None:
    error = opened.exception()
    if error is not None:
        result.set_exception(error)
    else:
        result.set_result(len(opened.result().new_pages))


def _put_session(response: pb.OpenPutResponse, num_pages: int, heads: tuple[int, int]) -> PutSession:
    """The client's side of an OpenPut answer; raises INTERNAL on an answer that does not fit the request."""
    status = np.frombuffer(response.status, dtype=np.uint8)
    if len(status) != num_pages:
        raise KVStoreError(
            ErrorCode.INTERNAL, f"OpenPut answered {len(status)} statuses for {num_pages} pages"
        )
    if response.head_end and (response.head_begin, response.head_end) != heads:
        raise KVStoreError(
            ErrorCode.INTERNAL,
            f"master granted heads {response.head_begin}..{response.head_end}, "
            f"this writer has {heads[0]}..{heads[1]}",
        )
    new_pages = np.flatnonzero(status == pb.PAGE_NEW).astype(np.int64)
    batches: list[NodeBatch] = []
    if len(new_pages):
        batches, first_unplaced = node_batches(response.placements, new_pages)
        if first_unplaced <= int(new_pages[-1]):
            raise KVStoreError(ErrorCode.INTERNAL, f"OpenPut gave new page {first_unplaced} no node")
    return PutSession(
        session_id=response.session_id,
        num_pages=num_pages,
        new_pages=new_pages,
        batches=batches,
        heads=heads,
        expires_unix_ms=response.expires_unix_ms,
        # one node (the common case): its batch is every new page, in order
        columns=[np.arange(len(new_pages))]
        if len(batches) == 1
        else [np.searchsorted(new_pages, batch.pages) for batch in batches],
    )


def _resolved(checksums: Any) -> np.ndarray:
    """Checksums of a put_layer call: an array, or the future of a GPU write's (computed by then)."""
    return checksums.result() if isinstance(checksums, concurrent.futures.Future) else checksums


def _when_landed(future: concurrent.futures.Future[int], queued: concurrent.futures.Future[Any]) -> None:
    """Complete an async put's future once its put returned and its bytes have landed."""
    error = queued.exception()
    if error is not None:
        future.set_exception(error)
        return
    pages, checksums = queued.result()
    if not isinstance(checksums, concurrent.futures.Future):
        future.set_result(pages)
        return

    def landed(done: concurrent.futures.Future[Any]) -> None:
        failed = done.exception()
        if failed is not None:
            future.set_exception(failed)
        else:
            future.set_result(pages)

    checksums.add_done_callback(landed)


def _finish_checksums(
    checksums: np.ndarray, deferred: list[tuple[Callable[[], np.ndarray], np.ndarray]], runs_per_shard: int
) -> np.ndarray:
    """Fill in the checksums of GPU-written batches from their run hashes (on the client's hash thread)."""
    for finish, columns in deferred:
        run_hashes = finish()
        checksums[:, columns] = shard_checksums(run_hashes.reshape(-1), runs_per_shard).reshape(
            checksums.shape[0], len(columns)
        )
    return checksums.reshape(-1)


def _common_prefix(a: bytes, b: bytes) -> int:
    """Number of leading 16-byte keys two packed key strings share."""
    n = min(len(a), len(b)) // keys.KEY_BYTES
    if n == 0:
        return 0
    left = np.frombuffer(a, dtype=np.uint8, count=n * keys.KEY_BYTES).reshape(n, keys.KEY_BYTES)
    right = np.frombuffer(b, dtype=np.uint8, count=n * keys.KEY_BYTES).reshape(n, keys.KEY_BYTES)
    differ = np.flatnonzero((left != right).any(axis=1))
    return int(differ[0]) if len(differ) else n


class KVStoreClient:
    """Puts and gets the KV cache of one namespace.

    ``KVStoreClient("127.0.0.1:50051", namespace="llama3-8b/bf16")``; the
    address defaults to the ``master`` setting, and any client setting of
    :mod:`kvstore.config` can be given as a keyword (``transport="tcp"``,
    ``rpc_timeout_ms=2000``) or through ``config=``.  Thread-safe.
    """

    def __init__(
        self,
        address: str | None = None,
        namespace: str = "",
        *,
        config: Config | None = None,
        salt: bytes = b"",
        session_cache_size: int = 512,
        **settings: Any,
    ) -> None:
        cfg = config if config is not None else load()
        if settings:
            try:
                cfg = cfg.replace(**settings)
            except KeyError as exc:
                raise TypeError(f"unknown kvstore setting {exc.args[0]!r}") from None
        self.config = cfg
        self.namespace = namespace
        self._salt = bytes(salt)
        self._timeout_s = cfg.rpc_timeout_ms / 1000.0
        self._commit_each_layer = cfg.commit_each_layer
        self._transports = TransportSelector(cfg.transport, cfg.copy_threads, self._timeout_s)
        if cfg.put_tier not in PUT_TIERS:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"put_tier must be one of {PUT_TIERS}, not {cfg.put_tier!r}"
            )
        self._host = hostid.host_id(cfg.host_id)
        self._sessions = SessionCache(session_cache_size)
        self._layout: Layout | None = None
        self._root = b""
        self._key_memo = LruMemo(_KEY_MEMO_SIZE)  # token digest -> packed page keys: see _page_keys
        # (lease answer, page keys) -> batches: see _leased_batches
        self._lease_memo = LruMemo(_KEY_MEMO_SIZE)
        self._closed = False
        self._loop = LoopThread()
        # calls sent without waiting (pipelined commits, get's own release): close() lets them land
        self._background: set[concurrent.futures.Future[Any]] = set()
        self._background_lock = threading.Lock()
        self._hash_worker: concurrent.futures.ThreadPoolExecutor | None = None  # GPU writes' checksums
        # put_layer_async: one worker thread runs the queued puts in call order
        self._put_worker: concurrent.futures.ThreadPoolExecutor | None = None
        self._put_local = threading.local()  # the put worker's mode, and each put's checksums
        self._async_lock = threading.Lock()
        self._unflushed: list[concurrent.futures.Future[int]] = []
        self._async_failed: set[SessionKey] = set()  # sequences whose async put failed since the last flush
        self._master = MasterConnection(
            address or cfg.master,
            self._loop,
            self._timeout_s,
            cfg.max_message_bytes,
            etcd=cfg.etcd,
            cluster=cfg.cluster,
            failover_wait_s=cfg.failover_wait_ms / 1000.0,
            stream=cfg.control_stream,
        )

    # ------------------------------------------------------------ lifetime
    def __enter__(self) -> KVStoreClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Abort unfinished put sessions, close connections and stop the loop thread.  Idempotent."""
        if self._closed:
            return
        self._finish_async_puts()
        self._closed = True
        with self._background_lock:
            in_flight = list(self._background)
        if in_flight:  # commits, and puts opened ahead: those land in the cache, to be aborted below
            concurrent.futures.wait(in_flight, timeout=self._timeout_s)
        unfinished = [s for s in self._sessions.drain() if s.has_work]
        try:
            if unfinished and self._loop.running:
                self._loop.run(self._abort_all(unfinished), timeout_s=self._timeout_s + 5.0)
        except KVStoreError as exc:
            log.info("could not abort %d unfinished put sessions: %s", len(unfinished), exc)
        finally:
            try:
                self._master.close()
            except KVStoreError as exc:
                log.debug("closing the master channel: %s", exc)
            self._loop.stop()
            if self._hash_worker is not None:
                self._hash_worker.shutdown(wait=True)
            self._transports.close()

    async def _abort_all(self, sessions: list[PutSession]) -> None:
        calls = [
            self._master.acall("AbortPut", pb.AbortPutRequest(session_id=s.session_id)) for s in sessions
        ]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                log.debug("abort at close: %s", result)

    def _check_open(self) -> None:
        if self._closed:
            raise KVStoreError(ErrorCode.UNAVAILABLE, "the client is closed")
        if not self.namespace:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "no namespace: pass namespace= to KVStoreClient")

    # ------------------------------------------------------------ namespaces
    def create_namespace(
        self,
        page_size: int,
        num_layers: int,
        segment_bytes: int = 0,
        fingerprint: bytes = b"",
        *,
        kind: str = "",
        kv_heads: int = 0,
        head_dim: int = 0,
        dtype: str = "",
        quota_bytes: int = 0,
    ) -> Layout:
        """Register the namespace (or confirm an identical one); returns its layout.

        Opaque form: ``segment_bytes``.  Geometry form: ``kind`` ("mha"/"mla"),
        ``kv_heads``, ``head_dim``, ``dtype``; the segment size follows.  A
        namespace that exists with another layout or fingerprint raises
        NAMESPACE_MISMATCH.
        """
        self._check_open()
        Layout.build(self.namespace, page_size, num_layers, segment_bytes, kind, kv_heads, head_dim, dtype)
        spec = pb.NamespaceSpec(
            name=self.namespace,
            page_size=page_size,
            num_layers=num_layers,
            segment_bytes=segment_bytes,
            fingerprint=bytes(fingerprint),
            salt=self._salt,
            quota_bytes=quota_bytes,
        )
        if kind:
            spec.geometry.CopyFrom(pb.Geometry(kind=kind, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype))
        response = self._master.call("CreateNamespace", pb.CreateNamespaceRequest(spec=spec))
        log.debug("namespace %s %s", self.namespace, "created" if response.created else "already registered")
        return self._remember(response.spec)

    @property
    def layout(self) -> Layout:
        """The namespace layout (fetched from the master on first use, then cached)."""
        self._check_open()
        if self._layout is None:
            response = self._master.call("GetNamespace", pb.GetNamespaceRequest(name=self.namespace))
            self._remember(response.spec)
        assert self._layout is not None
        return self._layout

    def _remember(self, spec: pb.NamespaceSpec) -> Layout:
        layout = Layout.from_spec(spec)
        self._root = keys.namespace_root(self.namespace, self._salt or spec.salt)
        self._layout = layout
        return layout

    def delete_namespace(self) -> int:
        """Delete the namespace and every page in it; returns the pages freed."""
        self._check_open()
        response = self._master.call("DeleteNamespace", pb.DeleteNamespaceRequest(name=self.namespace))
        self._layout = None
        self._sessions.drain()
        return int(response.pages_freed)

    # ------------------------------------------------------------ keys
    def _page_keys(self, tokens: np.ndarray, num_pages: int, contexts: Sequence[bytes] | None) -> bytes:
        layout = self.layout
        keyed = np.ascontiguousarray(tokens[: num_pages * layout.page_size])
        # A decoder reads one prefix layer by layer: the key chain (a Python step per page, ~15 ms
        # for 16384 pages) is remembered for the last few sequences, found by one 128-bit digest.
        memo = (
            self._root,
            layout.page_size,
            keyed.dtype.str,
            xxhash.xxh3_128_digest(keyed.tobytes() if keyed.size < 4096 else keyed.data.cast("B")),
            None if contexts is None else tuple(contexts[:num_pages]),
        )
        packed: bytes | None = self._key_memo.get(memo)
        if packed is None:
            packed = keys.packed_page_keys(self._root, keyed, layout.page_size, contexts)
            self._key_memo.put(memo, packed)
        return packed

    def _full_pages(self, tokens: Any) -> tuple[np.ndarray, Layout, int]:
        """The open-client check every public call makes, then (token array, layout, number of full pages)."""
        self._check_open()
        arr = keys.as_token_array(tokens)
        layout = self.layout
        return arr, layout, arr.size // layout.page_size

    def _put_tokens(self, tokens: Any) -> tuple[np.ndarray, int]:
        """A put's open-client check, then (token source, number of full pages): the tokens are
        converted only when a session is opened, and checked by the session key's digest."""
        self._check_open()
        src = keys.token_source(tokens)
        if self._layout is None:
            # bad tokens are reported before the namespace is first fetched (the master may be down)
            keys.as_token_array(src)
        return src, src.size // self.layout.page_size

    def _put_session_key(
        self,
        src: np.ndarray,
        num_pages: int,
        contexts: Sequence[bytes] | None,
        tp_rank: int,
        tp_size: int,
        tokens: Any,
    ) -> tuple[np.ndarray, list[bytes] | None, SessionKey]:
        """(keyed tokens, their page contexts, put session key): what put_layers and abort agree on.

        The key is one digest of the keyed tokens (every token checked on the way), not the
        whole key chain: put_layer runs once per layer.  ``tokens``: the caller's, whose
        digest a :class:`~kvstore.keys.TokenSequence` remembers.
        """
        if contexts is not None and len(contexts) < num_pages:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"{len(contexts)} page contexts for {num_pages} pages"
            )
        count = num_pages * self.layout.page_size
        page_contexts = list(contexts[:num_pages]) if contexts is not None else None
        known: SessionKey | None = getattr(self._put_local, "key", None)
        if known is not None:  # an async put: its caller's thread worked the key out at the call
            return src[:count], page_contexts, known
        digest = keys.sequence_digest(
            self._root, tokens if isinstance(tokens, keys.TokenSequence) else src, count
        )
        if page_contexts:
            digest = xxhash.xxh3_128(digest + b"".join(_U32.pack(len(c)) + c for c in page_contexts)).digest()
        return src[:count], page_contexts, (digest, tp_rank, tp_size)

    # ------------------------------------------------------------ put
    def put_layer(
        self,
        tokens: Any,
        layer: int,
        kv: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        contexts: Sequence[bytes] | None = None,
        reader_host: str = "",
    ) -> int:
        """Store one layer of every full page of ``tokens``; returns the pages written.

        ``kv`` is ``[num_full_pages, shard_bytes]`` (this rank's heads of the
        layer, canonical head-major layout), any dtype, C-contiguous.  Pages
        already stored (or being written by an earlier writer) and pages with no
        room are skipped.  On an error the sequence's put is aborted: start it
        again from its first layer.  ``reader_host`` (a host id, see
        kvstore.hostid) asks for the pages near their future reader; it counts
        at the sequence's first put only.
        """
        return self.put_layers(
            tokens, [layer], kv, tp_rank, tp_size, contexts=contexts, reader_host=reader_host
        )

    def put_layers(
        self,
        tokens: Any,
        layers: Sequence[int],
        kv: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        contexts: Sequence[bytes] | None = None,
        reader_host: str = "",
    ) -> int:
        """:meth:`put_layer` for several layers at once: ``kv`` is ``[len(layers), num_full_pages, shard_bytes]``."""
        src, num_pages = self._put_tokens(tokens)
        keyed, page_contexts, key = self._put_session_key(src, num_pages, contexts, tp_rank, tp_size, tokens)
        layout = self.layout
        layer_list = layout.check_layers(list(layers))
        if len(set(layer_list)) != len(layer_list):
            raise KVStoreError(ErrorCode.BAD_RANGE, f"layers repeat: {layer_list}")
        heads = layout.head_range(tp_rank, tp_size)
        shard = layout.shard_bytes(heads)
        side = gpu_plane.caller_side(kv, "kv", layout, layer_list, heads, num_pages, writable=False)
        source = byte_view(kv, "kv") if side is None else side.buffer
        check_size(
            source,
            len(layer_list) * num_pages * shard,
            "kv",
            f"{len(layer_list)} layer(s) x {num_pages} full pages x {shard} bytes per shard "
            f"of heads {heads[0]}..{heads[1]}",
        )
        if num_pages == 0:
            return 0
        from_gpu = side is not None and side.gpu is not None
        while True:
            pending, opening = self._claim_put(
                key, keyed, num_pages, page_contexts, tp_rank, tp_size, heads, reader_host, from_gpu
            )
            if opening is not None:  # this call opens the session
                self._run_open(key, pending, opening, wait=True)  # raises what the open raised
                session = pending.result()
                break
            with contextlib.suppress(Exception):  # another caller's open failed: look again, open it here
                session = pending.result()
                break

        if not session.has_work:
            with session.lock:
                session.layers_seen.update(layer_list)
                finished = len(session.layers_seen) >= layout.num_layers
            if finished:
                self._sessions.drop(key, session)
            return 0
        gpu_side = None if side is None else side.gpu
        if gpu_side is not None and getattr(self._put_local, "pipelined", False):
            # an async put: the copy is queued and the call returns; its checksums (a future)
            # are ready once the bytes have landed, and its caller's future waits for them
            gpu_side = dataclasses.replace(gpu_side, wait=False)
        plan = CopyPlan(layout, layer_list, heads, source, num_pages, gpu_side)
        try:
            checksums: Any = self._write(session, plan)  # an array, or a future of one (GPU writes)
            self._put_local.checksums = checksums
        except KVStoreError as exc:
            self._fail_session(key, session, exc)
            raise
        # The commit goes out now that the bytes are in place, through the session's pump (one
        # CommitLayer in flight, later layers whose checksums are known merged into the next).
        # The call that completes the session's layers waits for the pump to send everything,
        # its own layers last and durably (so the pages are complete when it returns); the
        # others return at once:
        # a CommitLayer round trip (client -> master -> nodes and back) costs as much as copying
        # 10-20 MiB here, and its CPU on the master overlaps the next layer's copy.
        completing = False
        with session.lock:
            error = session.commit_error
            if error is None:
                session.layers_seen.update(layer_list)
                session.unsent.append((layer_list, checksums))
                if len(session.layers_seen) >= layout.num_layers:
                    # The pump sends this entry last and durably (not deferred); the layers queued
                    # before it go out as their checksums come in, not all at once with it.
                    completing = session.completing = True
                # commit_each_layer off: the layers wait in the queue for the completing call's commit
                if not session.pumping and (self._commit_each_layer or completing):
                    session.pumping = True
                    session.pump = self._submit_coroutine(self._commit_pump(session))
            finished = len(session.layers_seen) >= layout.num_layers
            pump = session.pump
        try:
            if error is not None:
                raise error
            if completing:
                assert pump is not None
                self._commit_result(pump)
                with session.lock:
                    error = session.commit_error
                if error is not None:
                    raise error
        except KVStoreError as exc:
            self._fail_session(key, session, exc)
            raise
        if finished:
            self._sessions.drop(key, session)
        return len(session.new_pages)

    def open_put(
        self,
        tokens: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        contexts: Sequence[bytes] | None = None,
        reader_host: str = "",
        from_gpu: bool = False,
    ) -> concurrent.futures.Future[int]:
        """Open the put of ``tokens`` now, in the background; returns a future of the pages this writer will write.

        The master allocates the pages (an OpenPut round trip: a few ms for a long
        prompt) while the caller computes the first layer; the sequence's first
        :meth:`put_layer` then finds the session open, or waits for the answer on
        its way.  Optional: without it the first put_layer opens the session itself.
        Call it once the request's tokens are known (a scheduler's step, before
        the forward pass).  ``from_gpu`` says the layers will come from GPU memory
        (``put_tier = auto`` then asks for a VRAM tier).  A failed open reaches the
        future, and the first put_layer tries again (and raises what it gets).  A
        session opened and never written expires with its write lease; :meth:`abort`
        or :meth:`close` give it back at once.
        """
        self._check_open()
        src, num_pages = self._put_tokens(tokens)
        done: concurrent.futures.Future[int] = concurrent.futures.Future()
        if num_pages == 0:
            done.set_result(0)
            return done
        keyed, page_contexts, key = self._put_session_key(src, num_pages, contexts, tp_rank, tp_size, tokens)
        heads = self.layout.head_range(tp_rank, tp_size)
        pending, opening = self._claim_put(
            key, keyed, num_pages, page_contexts, tp_rank, tp_size, heads, reader_host, from_gpu
        )
        if opening is not None:
            self._run_open(key, pending, opening, wait=False)
        pending.add_done_callback(functools.partial(_pages_of, done))
        return done

    @staticmethod
    def _commit_request(
        session: PutSession, queued: list[tuple[list[int], np.ndarray]], deferred: bool = False
    ) -> pb.CommitLayerRequest:
        """One CommitLayer for several put_layer calls: their layers, and checksums in the same order."""
        return pb.CommitLayerRequest(
            session_id=session.session_id,
            deferred=deferred,
            layers=np.asarray([layer for layers, _ in queued for layer in layers], dtype="<u2").tobytes(),
            checksums=np.concatenate([_resolved(sums) for _, sums in queued]).astype("<u8").tobytes(),
        )

    async def _commit_pump(self, session: PutSession) -> None:
        """Send the session's queued commits, merged, one CommitLayer at a time, until none are left.

        Each CommitLayer carries the leading queued layers whose checksums are known: a GPU
        write's are computed after its copy, and when the copies outpace the hashing, waiting
        for every queued layer would hold back layers a stream reader could already have.
        """
        while True:
            pending: concurrent.futures.Future[Any] | None = None
            with session.lock:
                if not session.unsent or session.failed or session.commit_error is not None:
                    session.pumping = False  # under the lock: a put_layer from now on starts a new pump
                    return
                ready = 0
                for _, sums in session.unsent:
                    if isinstance(sums, concurrent.futures.Future) and not sums.done():
                        break
                    ready += 1
                if ready:
                    # the batch that holds the completing put's entry is the sequence's last commit:
                    # durable (answered once the nodes hold every record), the others deferred
                    deferred = not (session.completing and ready == len(session.unsent))
                    queued, session.unsent = session.unsent[:ready], session.unsent[ready:]
                else:
                    # a future, not done: it stays queued and goes out in a later batch
                    first: Any = session.unsent[0][1]
                    pending = first
            try:
                if pending is not None:
                    # wait for the first one (its error, if any, is the commit's: raised below)
                    await asyncio.wait([asyncio.wrap_future(pending)])
                    continue
                await self._master.acall("CommitLayer", self._commit_request(session, queued, deferred))
            except KVStoreError as exc:
                with session.lock:
                    session.commit_error = exc
                    session.pumping = False
                return
            except BaseException:
                with session.lock:
                    session.pumping = False
                raise

    def _submit_coroutine(self, coro: Any) -> concurrent.futures.Future[Any]:
        future = self._loop.submit(coro)
        with self._background_lock:
            self._background.add(future)
        future.add_done_callback(self._forget_background)
        return future

    def _commit_result(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            future.result(self._timeout_s + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise KVStoreError(ErrorCode.DEADLINE, "CommitLayer did not finish in time") from None

    def _fail_session(self, key: SessionKey, session: PutSession, exc: KVStoreError) -> None:
        """A put of the session failed: forget it and (unless the master lost it already) abort it."""
        self._sessions.drop(key, session)
        with session.lock:
            session.failed = True
            session.unsent = []
        if exc.code is not ErrorCode.SESSION_NOT_FOUND:
            self._abort_quietly(session)

    def _submit(self, method: str, request: Any) -> concurrent.futures.Future[Any]:
        """Send a control call without waiting for it; the future is tracked until it is done."""
        return self._submit_coroutine(self._master.acall(method, request))

    def _forget_background(self, future: concurrent.futures.Future[Any]) -> None:
        with self._background_lock:
            self._background.discard(future)

    def _open_put_request(
        self,
        keyed: np.ndarray,
        num_pages: int,
        contexts: list[bytes] | None,
        tp_rank: int,
        tp_size: int,
        reader_host: str,
        prefer_tier: str,
    ) -> pb.OpenPutRequest:
        """The OpenPut of ``keyed`` (the full pages' tokens, as :meth:`_put_session_key` gives them)."""
        return pb.OpenPutRequest(
            namespace=self.namespace,
            keys=self._page_keys(keys.as_token_array(keyed), num_pages, contexts),
            tp_rank=tp_rank,
            tp_size=tp_size,
            client_host=self._host,
            reader_host=reader_host,
            lease_ms=self.config.put_lease_ms,
            prefer_tier=prefer_tier,
        )

    def _claim_put(
        self,
        key: SessionKey,
        keyed: np.ndarray,
        num_pages: int,
        contexts: list[bytes] | None,
        tp_rank: int,
        tp_size: int,
        heads: tuple[int, int],
        reader_host: str,
        from_gpu: bool,
    ) -> tuple[concurrent.futures.Future[PutSession], Coroutine[Any, Any, PutSession] | None]:
        """``key``'s put session as a future (cached, or being opened), and the OpenPut to run
        (:meth:`_run_open`) when this caller is the one to open it."""
        pending, mine = self._sessions.claim_open(key)
        if not mine:
            return pending, None
        try:
            request = self._open_put_request(
                keyed, num_pages, contexts, tp_rank, tp_size, reader_host, self._put_tier(from_gpu)
            )
        except BaseException as exc:
            self._sessions.opened(key, pending, None, exc)
            raise
        return pending, self._open_put(key, pending, request, num_pages, heads)

    def _run_open(
        self,
        key: SessionKey,
        pending: concurrent.futures.Future[PutSession],
        opening: Coroutine[Any, Any, PutSession],
        wait: bool,
    ) -> None:
        """Run a claimed open on the loop: waited for (a put), or in the background (open_put)."""
        try:
            if wait:
                self._loop.run(opening, timeout_s=self._master.backstop_s)
            else:
                self._submit_coroutine(opening)
        except BaseException as exc:
            if not pending.done():  # the open never ran (a closed client): nobody else reports it
                self._sessions.opened(key, pending, None, exc)
            raise

    async def _open_put(
        self,
        key: SessionKey,
        pending: concurrent.futures.Future[PutSession],
        request: pb.OpenPutRequest,
        num_pages: int,
        heads: tuple[int, int],
    ) -> PutSession:
        """The OpenPut of a claimed session; the session (or the error) lands in the cache before this returns.
        An answer that does not fit the request is given back to the master at once."""
        try:
            response = await self._master.acall("OpenPut", request)
            try:
                session = _put_session(response, num_pages, heads)
            except KVStoreError:
                if response.session_id:
                    with contextlib.suppress(KVStoreError):
                        await self._master.acall(
                            "AbortPut", pb.AbortPutRequest(session_id=response.session_id)
                        )
                raise
        except BaseException as exc:
            self._sessions.opened(key, pending, None, exc)
            raise
        self._sessions.opened(key, pending, session, None)
        return session

    def _put_tier(self, from_gpu: bool) -> str:
        """vram: the tier a put asks for (put_tier auto: VRAM for a GPU source, CUDA arrays or PagedKV)."""
        if self.config.put_tier == "auto":
            return "vram" if from_gpu else ""
        return "" if self.config.put_tier == "dram" else "vram"

    def _write(
        self, session: PutSession, plan: CopyPlan
    ) -> np.ndarray | concurrent.futures.Future[np.ndarray]:
        """Write every new page, node by node; returns the commit checksums, per (layer, new page).

        A GPU write's checksums are computed from the landed bytes on the client's hash
        thread, off the copy's timing: then the result is a future of them.
        """
        checksums = np.empty((len(plan.layers), len(session.new_pages)), dtype=np.uint64)
        deferred: list[tuple[Callable[[], np.ndarray], np.ndarray]] = []
        try:
            for batch, columns in zip(session.batches, session.columns, strict=True):
                transport = self._transports.for_node(batch.node)
                with transport.in_use():
                    run_hashes = transport.write(batch, plan)
                if callable(run_hashes):
                    deferred.append((run_hashes, columns))
                    continue
                checksums[:, columns] = shard_checksums(run_hashes.reshape(-1), plan.runs_per_shard).reshape(
                    len(plan.layers), len(batch)
                )
        except BaseException:
            for finish, _ in deferred:  # they hold their pools mapped until they have run
                with contextlib.suppress(Exception):
                    finish()
            raise
        if deferred:
            return self._hasher().submit(_finish_checksums, checksums, deferred, plan.runs_per_shard)
        return checksums.reshape(-1)

    def _hasher(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._background_lock:
            if self._hash_worker is None:
                self._hash_worker = concurrent.futures.ThreadPoolExecutor(
                    1, thread_name_prefix="kvstore-hash"
                )
            return self._hash_worker

    def put_layer_async(
        self,
        tokens: Any,
        layer: int,
        kv: Any,
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        contexts: Sequence[bytes] | None = None,
        reader_host: str = "",
    ) -> concurrent.futures.Future[int]:
        """:meth:`put_layer` without waiting: returns at once with a future of the pages written.

        The copy and the commit run on a worker thread of the client (the native
        copy releases the GIL, so the caller computes the next layer meanwhile);
        puts run in call order, so the layers of a sequence are written and
        committed in the order they were handed over.  A GPU array's copy is
        queued on the GPU and the worker goes on with the next put while it runs
        (its future completes once the bytes have landed).  ``tokens`` and ``kv``
        must not be modified (or freed) until its future is done.  Arguments are checked
        here; a put that fails aborts its sequence's put (as put_layer does) and
        the later async puts of that sequence fail without writing, until the
        next :meth:`flush`, which waits for every pending async put and raises
        the first error.  :meth:`close` flushes first.
        """
        src, num_pages = self._put_tokens(tokens)
        key = (
            self._put_session_key(src, num_pages, contexts, tp_rank, tp_size, tokens)[2]
            if num_pages
            else None
        )
        with self._async_lock:
            if self._put_worker is None:
                self._put_worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvstore-put")
            # keep what flush must report: puts not done yet and the failed ones
            self._unflushed = [f for f in self._unflushed if not f.done() or f.exception() is not None]
            queued = self._put_worker.submit(
                self._put_in_order, key, tokens, layer, kv, tp_rank, tp_size, contexts, reader_host
            )
            future: concurrent.futures.Future[int] = concurrent.futures.Future()
            queued.add_done_callback(functools.partial(_when_landed, future))
            self._unflushed.append(future)
        return future

    def _put_in_order(
        self,
        key: SessionKey | None,
        tokens: Any,
        layer: int,
        kv: Any,
        tp_rank: int,
        tp_size: int,
        contexts: Sequence[bytes] | None,
        reader_host: str,
    ) -> tuple[int, Any]:
        """One async put on the worker: (pages written, its checksums: an array or a future of one)."""
        if key is not None and key in self._async_failed:
            raise KVStoreError(
                ErrorCode.SESSION_NOT_FOUND,
                f"layer {layer} not written: an earlier async put of this sequence failed and aborted its put",
            )
        self._put_local.pipelined, self._put_local.checksums, self._put_local.key = True, None, key
        try:
            pages = self.put_layer(
                tokens, layer, kv, tp_rank, tp_size, contexts=contexts, reader_host=reader_host
            )
            return pages, self._put_local.checksums
        except BaseException:
            if key is not None:
                self._async_failed.add(key)
            raise
        finally:
            self._put_local.pipelined, self._put_local.checksums, self._put_local.key = False, None, None

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every pending :meth:`put_layer_async`; raise the first error among them (in call order)."""
        with self._async_lock:
            pending, self._unflushed = self._unflushed, []
        _, running = concurrent.futures.wait(pending, timeout)
        if running:
            with self._async_lock:
                self._unflushed = [f for f in pending if not f.done()] + self._unflushed
            raise KVStoreError(
                ErrorCode.DEADLINE, f"{len(running)} async put(s) still running after {timeout} s"
            )
        self._async_failed.clear()
        for future in pending:
            error = future.exception()
            if error is not None:
                raise error

    def _finish_async_puts(self) -> None:
        """At close: let the queued async puts run out (their errors stay in their futures)."""
        with self._async_lock:
            worker, self._put_worker = self._put_worker, None
        if worker is not None:
            worker.shutdown(wait=True)
            failed = [f for f in self._unflushed if f.exception() is not None]
            if failed:
                log.info("closing with %d failed async put(s): %s", len(failed), failed[0].exception())

    def abort(
        self, tokens: Any, tp_rank: int = 0, tp_size: int = 1, *, contexts: Sequence[bytes] | None = None
    ) -> int:
        """Give up the open put of ``tokens`` (this tp rank): its unfinished pages are freed.  Returns pages freed."""
        src, num_pages = self._put_tokens(tokens)
        if num_pages == 0:
            return 0
        _, _, key = self._put_session_key(src, num_pages, contexts, tp_rank, tp_size, tokens)
        self._sessions.settle(key, self._timeout_s)  # a put opened ahead and still on its way
        session = self._sessions.drop(key)
        if session is None or not session.has_work:
            return 0
        with session.lock:
            session.unsent = []
            pump = session.pump
        if pump is not None:  # let a commit in flight land first: the abort then frees what it covered
            with contextlib.suppress(KVStoreError, concurrent.futures.CancelledError):
                self._commit_result(pump)
        response = self._master.call("AbortPut", pb.AbortPutRequest(session_id=session.session_id))
        return int(response.pages_freed)

    def _abort_quietly(self, session: PutSession) -> None:
        try:
            self._master.call("AbortPut", pb.AbortPutRequest(session_id=session.session_id))
        except KVStoreError as exc:
            log.debug("abort of put session %d: %s", session.session_id, exc)

    # ------------------------------------------------------------ get
    def _prefix_call(self, method: str, tokens: Any, contexts: Sequence[bytes] | None, **fields: Any) -> int:
        """One prefix RPC (MatchPrefix, PinPrefix, UnpinPrefix) on the full pages; returns tokens it covered."""
        arr, layout, num_pages = self._full_pages(tokens)
        if num_pages == 0:
            return 0
        request = getattr(pb, f"{method}Request")(
            namespace=self.namespace, keys=self._page_keys(arr, num_pages, contexts), **fields
        )
        response = self._master.call(method, request)
        return min(int(response.num_pages), num_pages) * layout.page_size

    def match_prefix(self, tokens: Any, *, contexts: Sequence[bytes] | None = None) -> int:
        """How many leading tokens are stored (whole pages); moves no data and takes no lease."""
        return self._prefix_call("MatchPrefix", tokens, contexts)

    def pin_prefix(self, tokens: Any, ttl_s: float, *, contexts: Sequence[bytes] | None = None) -> int:
        """Keep the stored prefix of ``tokens`` out of eviction and demotion for ``ttl_s`` (tiers).

        Bounded: the master caps the TTL (max_pin_ms).  Takes no lease.  Returns tokens pinned.
        """
        return self._prefix_call("PinPrefix", tokens, contexts, ttl_ms=max(1, int(ttl_s * 1000)))

    def unpin_prefix(self, tokens: Any, *, contexts: Sequence[bytes] | None = None) -> int:
        """End a pin now (tiers); returns tokens unpinned."""
        return self._prefix_call("UnpinPrefix", tokens, contexts)

    def acquire_prefix(
        self, tokens: Any, *, lease_ms: int = 0, contexts: Sequence[bytes] | None = None
    ) -> Lease:
        """Match and lease the stored prefix in one call; the lease id works from any process."""
        arr, layout, num_pages = self._full_pages(tokens)
        if num_pages == 0:
            return Lease("", 0, 0, 0)
        response = self._acquire(self._page_keys(arr, num_pages, contexts), lease_ms)
        count = min(int(response.num_pages), num_pages)
        return Lease(
            response.lease_id, count, count * layout.page_size, int(response.expires_unix_ms), response
        )

    def _acquire(self, page_keys: bytes, lease_ms: int = 0) -> pb.AcquirePrefixResponse:
        return self._master.call(
            "AcquirePrefix",
            pb.AcquirePrefixRequest(
                namespace=self.namespace,
                keys=page_keys,
                lease_ms=lease_ms,
                client_host=self._host,
            ),
        )

    def release(self, lease: LeaseRef) -> bool:
        """End a read lease (a Lease or a lease id from any process); False if it was already gone."""
        self._check_open()
        lease_id = lease.lease_id if isinstance(lease, Lease) else str(lease)
        if not lease_id:
            return False
        try:
            response = self._master.call("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id))
        except KVStoreError as exc:
            if exc.code is ErrorCode.LEASE_NOT_FOUND:
                return False
            raise
        return bool(response.released)

    def get_prefix(
        self,
        tokens: Any,
        layers: Sequence[int] | None = None,
        heads: tuple[int, int] | None = None,
        out: Any = None,
        *,
        lease: LeaseRef | None = None,
        contexts: Sequence[bytes] | None = None,
    ) -> PrefixHit:
        """Read the stored prefix of ``tokens``: ``layers`` (default all) and ``heads`` (default all).

        ``out``, if given, is ``[len(layers), num_full_pages, shard_bytes]``
        bytes (any dtype, writable, C-contiguous) and the hit's data is a view
        of it.  With ``lease`` (from :meth:`acquire_prefix`, here or in another
        process) the leased pages are read and the lease is left to its owner;
        otherwise a lease is taken and released around the read.  A page that
        vanished or changed during the read ends the hit there.
        """
        arr, layout, num_pages = self._full_pages(tokens)
        layer_list = layout.check_layers(None if layers is None else list(layers))
        head_range = layout.check_heads(heads)
        shard = layout.shard_bytes(head_range)
        total = len(layer_list) * num_pages * shard
        side = gpu_plane.caller_side(out, "out", layout, layer_list, head_range, num_pages, writable=True)
        if out is None:
            buffer = np.empty(total, dtype=np.uint8)
        elif side is not None:  # GPU memory or an engine's paged pool
            buffer = side.buffer
        else:
            buffer = byte_view(out, "out", writable=True)
            check_size(
                buffer,
                total,
                "out",
                f"{len(layer_list)} layer(s) x {num_pages} full pages x {shard} bytes "
                f"per shard of heads {head_range[0]}..{head_range[1]}",
            )
        data = buffer.reshape(len(layer_list), num_pages, shard)
        if num_pages == 0:
            return PrefixHit(0, 0, layer_list, head_range, data if side is None else side.hit_data(data, 0))

        page_keys = self._page_keys(arr, num_pages, contexts)
        batches: tuple[list[NodeBatch], int] | None = None
        if lease is None:
            response = self._acquire(page_keys)
            count, owned = int(response.num_pages), response.lease_id
        else:
            response = self._describe(lease)
            owned = ""
            count, batches = self._leased_batches(response, page_keys, num_pages)
        try:
            plan = CopyPlan(
                layout, layer_list, head_range, buffer, num_pages, None if side is None else side.gpu
            )
            found = self._read(response.placements, min(count, num_pages), plan, batches)
        finally:
            if owned:
                self._release_quietly(owned)
        hit_data = data[:, :found] if side is None else side.hit_data(data, found)
        return PrefixHit(found, found * layout.page_size, layer_list, head_range, hit_data)

    def get_prefix_stream(
        self,
        tokens: Any,
        layers: Sequence[int] | None = None,
        heads: tuple[int, int] | None = None,
        out: Any = None,
        *,
        wait_ms: int | None = None,
        contexts: Sequence[bytes] | None = None,
        lease_ms: int = 0,
    ) -> PrefixStream:
        """Read the prefix of ``tokens`` layer by layer while a prefill may still be writing it.

        The master leases the leading pages that are complete or being written
        (waiting up to ``wait_ms``, default the ``stream_wait_ms`` setting, for a
        writer to open page 0) and pushes each layer's progress; this returns
        once that first answer is in (``stream.num_pages``, ``stream.lease_id``).
        Iterating the stream yields a :class:`~kvstore.client.types.LayerReady`
        per wanted layer, in the order they become ready, once its bytes are in
        ``out``; ``stream.wait_layer(layer)`` waits for one.  ``out`` follows
        get_prefix's rule: ``[len(layers), num_full_pages, shard_bytes]`` bytes in
        host or GPU memory (a CUDA array: ``LayerReady.data`` is ``out[index, :num_pages]``),
        or one :class:`~kvstore.gpu.PagedKV` per layer (``LayerReady.data`` is that layer's).
        Pages whose writer went away before committing a wanted layer, or that
        vanished during a read, end the hit there (``num_pages`` only shrinks).
        ``stream.close()`` (or ``with``) cancels it and releases the lease; it
        is released by itself once every layer is read.  Each wait for the next
        update is bounded by ``rpc_timeout_ms``.
        """
        arr, layout, num_pages = self._full_pages(tokens)
        layer_list = layout.check_layers(None if layers is None else list(layers))
        if len(set(layer_list)) != len(layer_list):
            raise KVStoreError(ErrorCode.BAD_RANGE, f"layers repeat: {layer_list}")
        head_range = layout.check_heads(heads)
        shard = layout.shard_bytes(head_range)
        total = len(layer_list) * num_pages * shard
        side = gpu_plane.caller_side(out, "out", layout, layer_list, head_range, num_pages, writable=True)
        if out is None:
            buffer = np.empty(total, dtype=np.uint8)
        elif side is not None:  # GPU memory or an engine's paged pools: read per layer as get_prefix does
            buffer = side.buffer
        else:
            buffer = byte_view(out, "out", writable=True)
            check_size(
                buffer,
                total,
                "out",
                f"{len(layer_list)} layer(s) x {num_pages} full pages x {shard} bytes "
                f"per shard of heads {head_range[0]}..{head_range[1]}",
            )
        if contexts is not None and len(contexts) < num_pages:
            raise KVStoreError(
                ErrorCode.INVALID_ARGUMENT, f"{len(contexts)} page contexts for {num_pages} pages"
            )
        wait = self.config.stream_wait_ms if wait_ms is None else wait_ms
        if wait < 0 or lease_ms < 0:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "wait_ms and lease_ms must not be negative")
        request = pb.StreamPrefixRequest(
            namespace=self.namespace,
            keys=self._page_keys(arr, num_pages, contexts) if num_pages else b"",
            lease_ms=lease_ms,
            client_host=self._host,
            wait_ms=wait,
            layers=np.asarray(layer_list, dtype="<u2").tobytes(),
        )
        return PrefixStream(self, request, layout, layer_list, head_range, buffer, num_pages, side)

    def _describe(self, lease: LeaseRef) -> pb.AcquirePrefixResponse:
        if isinstance(lease, Lease):
            if lease._response is not None:
                return lease._response
            lease = lease.lease_id
        if not lease:
            return pb.AcquirePrefixResponse()
        response: pb.AcquirePrefixResponse = self._master.call(
            "DescribeLease", pb.DescribeLeaseRequest(lease_id=str(lease))
        )
        return response

    def _release_quietly(self, lease_id: str) -> None:
        """End get_prefix's own lease without waiting for the answer.

        The read is done and checked; the round trip would only add latency to
        every get.  A lost release costs nothing but pinning until the lease expires.
        """
        try:
            future = self._submit("ReleaseLease", pb.ReleaseLeaseRequest(lease_id=lease_id))
        except KVStoreError as exc:
            log.info("release of lease %s failed: %s", lease_id, exc)
            return
        future.add_done_callback(functools.partial(_log_release_failure, lease_id))

    def _leased_batches(
        self, response: pb.AcquirePrefixResponse, page_keys: bytes, num_pages: int
    ) -> tuple[int, tuple[list[NodeBatch], int] | None]:
        """(pages of ``page_keys`` the lease covers, their node batches) for a read under a held lease.

        A decoder reads one leased prefix layer by layer: the key compare and the grouping by
        node do not change between those calls, so they are remembered for the last few
        (lease answer, page keys) pairs, found by identity (the memo holds both objects, and a
        lease answer is never modified).  The transports still check every batch per read.
        """
        memo_key = (id(response), id(page_keys), num_pages)
        hit = self._lease_memo.get(memo_key)
        if hit is not None and hit[0] is response and hit[1] is page_keys:
            return hit[2], hit[3]
        count = _common_prefix(response.keys[: int(response.num_pages) * keys.KEY_BYTES], page_keys)
        count = min(count, num_pages)
        batches = node_batches(response.placements, np.arange(count, dtype=np.int64)) if count > 0 else None
        self._lease_memo.put(memo_key, (response, page_keys, count, batches))
        return count, batches

    def _read(
        self,
        placements: pb.Placements,
        count: int,
        plan: CopyPlan,
        grouped: tuple[list[NodeBatch], int] | None = None,
    ) -> int:
        """Read pages [0, count) into the plan's buffer; returns how many leading pages are good.

        ``grouped``: node_batches of exactly those pages, when the caller has them already.
        """
        if count <= 0:
            return 0
        if grouped is None:
            grouped = node_batches(placements, np.arange(count, dtype=np.int64))
        batches, found = grouped
        for batch in batches:
            if int(batch.pages[0]) >= found:
                continue  # everything it holds lies past a miss already
            try:
                transport = self._transports.for_node(batch.node)
                with transport.in_use():
                    intact = transport.read(batch, plan)
            except (KVStoreError, OSError) as exc:
                log.info(
                    "read from node %s failed, counting its pages as misses: %s", batch.node.node_id, exc
                )
                intact = 0
            if intact < len(batch):
                found = min(found, int(batch.pages[intact]))
        return found

    # ------------------------------------------------------------ extras
    def put_extra(self, tokens: Any, name: str, data: Any) -> None:
        """Store a small named blob for the whole sequence (tail included)."""
        self._check_open()
        digest = self._sequence_digest(tokens)
        if not name:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "extra name must not be empty")
        blob = byte_view(data, "extra data").tobytes()
        self._master.call(
            "PutExtra",
            pb.PutExtraRequest(namespace=self.namespace, sequence_digest=digest, name=name, data=blob),
        )

    def get_extra(self, tokens: Any, name: str) -> bytes | None:
        """The blob stored under ``name`` for exactly this sequence, or None."""
        self._check_open()
        digest = self._sequence_digest(tokens)
        if not name:
            raise KVStoreError(ErrorCode.INVALID_ARGUMENT, "extra name must not be empty")
        try:
            response = self._master.call(
                "GetExtra", pb.GetExtraRequest(namespace=self.namespace, sequence_digest=digest, name=name)
            )
        except KVStoreError as exc:
            if exc.code is ErrorCode.EXTRA_NOT_FOUND:
                return None
            raise
        return bytes(response.data)

    def _sequence_digest(self, tokens: Any) -> bytes:
        arr = keys.as_token_array(tokens)
        _ = self.layout  # the root depends on the namespace's salt
        return keys.sequence_digest(self._root, arr)
