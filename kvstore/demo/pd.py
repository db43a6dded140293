"""Prefill/decode disaggregation through kvstore, with a real transformer (issue 7).

Two worker processes (multiprocessing spawn: gRPC does not survive fork), each
with the same seeded model (:mod:`kvstore.demo.model`) and a KVStoreClient:

- :class:`PrefillWorker` runs the prompt through the model.  A forward hook on
  every decoder layer converts that layer's K/V of the full pages to canonical
  segments (one strided copy per half) and writes them at once
  (``put_layer_async`` where the SDK has it, else ``put_layer``), while the
  next layer computes.  The first generated token goes in as the extra
  ``first_token``, *before* the last layer is written: a decoder that has
  seen every layer committed is sure to find it.  Pages already in the store
  (a shared prefix) are loaded into the cache first and only the rest is
  computed.
- :class:`DecodeWorker` gets the prompt's pages (``get_prefix``, or
  ``get_prefix_stream`` while the prefill still runs, layer by layer) into a
  ``DynamicCache``, recomputes the tail (tokens past the last full page), and
  decodes greedily.  A fully page-aligned prompt has no tail: its first token
  is the extra.  ``recompute`` mode ignores the store (the colocated baseline).

:class:`PDPair` starts both workers against a running cluster; :func:`run_demo`
shows correctness (tokens equal ``generate`` in one process, prefix reuse) and
:func:`run_bench` measures time to first token three ways (see its docstring).
``kvstore demo pd`` and examples/pd_disagg/ call these.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import multiprocessing
import os
import queue
import statistics
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvstore import config as kvconfig
from kvstore.errors import ErrorCode, KVStoreError
from kvstore.keys import TokenSequence

log = logging.getLogger("kvstore.demo")

FIRST_TOKEN = "first_token"
# bf16 random-weight models have near-ties: two bf16 runs may part at a step whose top-2 logit
# margin (in either run) is below this (compare_tokens); float32 on CPU is compared exactly.
BF16_MARGIN_TOLERANCE = 0.125


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process needs (picklable: it crosses the spawn boundary)."""

    master: str
    model: str = "small"
    seed: int = 0
    page_size: int = 16
    device: str = "cpu"
    transport: str = "auto"
    namespace: str = ""  # default: the model spec's (it carries the fingerprint)
    stream_wait_ms: int = 60_000  # how long a streaming decode waits for the prefill's first put
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    log_level: str = "WARNING"


# ---------------------------------------------------------------------------------------------------------
# Workers (run inside the spawned processes; they import torch)


def _sdk_takes_cuda() -> bool:
    """Whether this kvstore has the GPU data plane (put/get straight from/to CUDA tensors)."""
    return importlib.util.find_spec("kvstore.gpu") is not None


class _Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        import torch

        from kvstore.client import KVStoreClient
        from kvstore.demo.model import ModelSpec, build_model, cache_argument

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.spec = ModelSpec(settings.model, settings.seed, settings.page_size)
        self.device = torch.device(settings.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # the SDK's kernels and streams follow the current device
        # Any: transformers' own annotations differ between the versions this runs with
        self.model: Any = build_model(self.spec, settings.device)
        self.client = KVStoreClient(
            settings.master, namespace=settings.namespace or self.spec.namespace, transport=settings.transport
        )
        self.client.create_namespace(**self.spec.namespace_args())
        self.gpu_direct = self.device.type == "cuda" and _sdk_takes_cuda()
        if self.device.type == "cuda" and not self.gpu_direct:
            log.warning("this kvstore has no GPU data plane: KV goes through host memory (.cpu())")
        # Streams read into CUDA tensors too where the SDK takes them (get_prefix_stream with a GPU
        # ``out``); an SDK whose streams refuse them falls back to host memory for streams alone.
        self.gpu_stream = self.gpu_direct
        self._cache_kw = cache_argument(self.model)
        self.computed_tokens = 0  # tokens the model was given since the last reset (a pre-hook counts them)
        self.read_s = 0.0  # the last load_prefix's store read (lease, copy, release), synchronised
        self.model.model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)

    def info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "device": str(self.device),
            "namespace": self.client.namespace,
            "gpu_direct": self.gpu_direct,
            "async_put": hasattr(self.client, "put_layer_async"),
            "streaming": hasattr(self.client, "get_prefix_stream"),
        }

    def close(self) -> None:
        self.client.close()

    def _count_tokens(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is not None:
            self.computed_tokens += int(ids.shape[-1])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def _forward(self, ids: np.ndarray, cache: Any) -> Any:
        """Run ``ids`` on top of ``cache`` (extended in place); the last position's logits."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self.device)[None]
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        return out.logits[0, -1]

    def _read_buffer(self, num_pages: int, direct: bool | None = None) -> Any:
        """Where get_prefix lands the pages: a CUDA tensor when the SDK takes one, else host memory (None)."""
        if not (self.gpu_direct if direct is None else direct) or num_pages == 0:
            return None
        import torch

        layout = self.client.layout
        return torch.empty(
            (layout.num_layers, num_pages, layout.segment_bytes), dtype=torch.uint8, device=self.device
        )

    def _fill_layer(self, cache: Any, layer: int, pages: Any) -> None:
        from kvstore.demo.model import from_pages

        key, value = from_pages(pages, self.spec, self.device)
        cache.update(key, value, layer)

    def _with_host_fallback(self, read: Any, out: Any, flag: str = "gpu_direct") -> tuple[Any, Any]:
        """``read(out)``; where ``out`` is a CUDA tensor this SDK does not take, ``read(None)`` (host memory).

        Returns (what read returned, the buffer it read into: ``out`` or None).
        """
        try:
            return read(out), out
        except (TypeError, KVStoreError) as exc:
            if out is None or (isinstance(exc, KVStoreError) and exc.code is not ErrorCode.INVALID_ARGUMENT):
                raise
            log.warning("the SDK did not take a CUDA tensor (%s): reading to host memory", exc)
            setattr(self, flag, False)
            return read(None), None

    def load_prefix(self, ids: np.ndarray) -> tuple[Any, int]:
        """A cache holding the stored full pages of ``ids`` (get_prefix); (cache, pages loaded)."""
        from kvstore.demo.model import new_cache

        cache = new_cache(self.model)
        self.read_s = 0.0
        num_pages = len(ids) // self.spec.page_size
        if num_pages == 0:
            return cache, 0
        buffer = self._read_buffer(num_pages)
        started = time.monotonic()
        try:
            hit, out = self._with_host_fallback(
                lambda buffer: self.client.get_prefix(ids, out=buffer), buffer
            )
        except KVStoreError as exc:
            log.warning("reading the prefix failed, recomputing it: %s", exc)
            return cache, 0
        self._sync()
        self.read_s = time.monotonic() - started  # the store's part of the load: lease, copy, release
        for layer in range(self.spec.num_layers):
            pages = hit.layer(layer) if out is None else out[layer, : hit.num_pages]
            if hit.num_pages:
                self._fill_layer(cache, layer, pages)
        return cache, int(hit.num_pages)


@dataclass
class _PrefillJob:
    tokens: TokenSequence  # converted and hashed once for all the layers' puts
    cache: Any
    num_pages: int
    futures: list[Any] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    keep: list[Any] = field(default_factory=list)  # buffers an asynchronous put may still be reading
    deferred: Any = None  # the last layer: written after the first_token extra
    failed: BaseException | None = None
    put_s: float = 0.0  # time spent in put calls on the compute thread


class PrefillWorker(_Worker):
    """Computes prompts and writes their KV layer by layer as each layer finishes."""

    def __init__(self, settings: WorkerSettings) -> None:
        super().__init__(settings)
        self._job: _PrefillJob | None = None
        self._async = hasattr(self.client, "put_layer_async")
        self._cuda_put_checked = False
        for index, layer in enumerate(self.model.model.layers):
            layer.register_forward_hook(functools.partial(self._layer_done, index))

    def _layer_done(self, index: int, _module: Any, _args: Any, _output: Any) -> None:
        from kvstore.demo.model import cache_layer, to_pages

        job = self._job
        if job is None or job.num_pages == 0 or job.failed is not None:
            return
        key, value = cache_layer(job.cache, index)
        pages = to_pages(key, value, job.num_pages, self.spec.page_size)
        if index == self.spec.num_layers - 1:
            job.deferred = pages
        else:
            self._put(job, index, pages)

    def _put(self, job: _PrefillJob, layer: int, pages: Any) -> None:
        started = time.monotonic()
        try:
            data = self._for_store(pages)
            try:
                self._put_call(job, layer, data)
            except (TypeError, KVStoreError) as exc:
                if data is not pages or not pages.is_cuda:
                    raise
                if isinstance(exc, KVStoreError) and exc.code is not ErrorCode.INVALID_ARGUMENT:
                    raise
                log.warning("put_layer did not take a CUDA tensor (%s): staging through host memory", exc)
                self.gpu_direct = False
                self._put_call(job, layer, self._for_store(pages))
        except KVStoreError as exc:
            # The client aborted the sequence's put; the decode side recomputes what is missing.
            log.warning("writing layer %d failed, the rest of this prompt is not stored: %s", layer, exc)
            job.failed = exc
        finally:
            job.put_s += time.monotonic() - started

    def _for_store(self, pages: Any) -> Any:
        if pages.device.type == "cpu":
            return pages.numpy()
        if self.gpu_direct:
            # The SDK copies on its own stream or the host: the layer's kernels must have finished.
            self._sync()
            return pages
        return pages.cpu().numpy()

    def _put_call(self, job: _PrefillJob, layer: int, data: Any) -> None:
        # The first CUDA tensor goes in synchronously: if this SDK cannot take one, put_layer says so
        # here (before any RPC), where _put can still stage it through host memory.
        probe = not self._cuda_put_checked and not isinstance(data, np.ndarray)
        if self._async and not probe:
            job.keep.append(data)  # until its future is done (the SDK reads it later)
            job.futures.append(self.client.put_layer_async(job.tokens, layer, data))
        else:
            job.written.append(int(self.client.put_layer(job.tokens, layer, data)))
            self._cuda_put_checked = self._cuda_put_checked or probe

    def _finish(self, job: _PrefillJob) -> None:
        for future in job.futures:
            try:
                job.written.append(int(future.result()))
            except KVStoreError as exc:
                log.warning("an asynchronous layer put failed: %s", exc)
                job.failed = job.failed or exc
        if job.futures:
            # flush also clears the client's memory of this sequence's failure (a retry may then put it)
            with contextlib.suppress(KVStoreError):
                self.client.flush()
        job.keep.clear()

    def prefill(
        self, tokens: Sequence[int], *, reuse: bool = True, t0: float | None = None
    ) -> dict[str, Any]:
        """Compute ``tokens`` (after loading whatever full pages the store has, with ``reuse``) and store their KV."""
        import torch

        arrival = time.monotonic()
        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        if len(ids) == 0:
            raise ValueError("an empty prompt has nothing to prefill")
        page_size = self.spec.page_size
        num_pages = len(ids) // page_size
        # At least the last token is computed: its logits give the first generated token.
        reusable = (len(ids) - 1) // page_size * page_size if reuse else 0
        with torch.inference_mode():
            cache, loaded_pages = self.load_prefix(ids[:reusable])
            loaded = loaded_pages * page_size
            loaded_at = time.monotonic()
            job = _PrefillJob(TokenSequence(ids), cache, num_pages)
            self._job, self.computed_tokens = job, 0
            if num_pages and hasattr(self.client, "open_put"):
                # the master allocates the pages while the first layers compute
                self.client.open_put(job.tokens, from_gpu=self.gpu_direct)
            try:
                first = int(self._forward(ids[loaded:], cache).argmax())
                computed_at = time.monotonic()
                self.client.put_extra(ids, FIRST_TOKEN, np.array([first], dtype="<i4"))
                if job.deferred is not None and job.failed is None:
                    self._put(job, self.spec.num_layers - 1, job.deferred)
                self._finish(job)
            finally:
                self._job = None
        done = time.monotonic()
        return {
            "first_token": first,
            "prompt_tokens": len(ids),
            "reused_tokens": loaded,
            "computed_tokens": self.computed_tokens,
            "pages": num_pages,
            "pages_written": job.written[0] if job.written else 0,
            "stored": job.failed is None,
            "t0": arrival if t0 is None else t0,
            "t_arrival": arrival,
            "read_s": self.read_s,
            "t_loaded": loaded_at,
            "t_computed": computed_at,
            "t_done": done,
            "put_s": job.put_s,
        }


class DecodeWorker(_Worker):
    """Continues prompts from their stored KV (or recomputes them) and decodes greedily."""

    def stream_prefix(self, ids: np.ndarray) -> tuple[Any, int]:
        """Like :meth:`load_prefix`, but layer by layer as the prefill commits them (get_prefix_stream)."""
        from kvstore.demo.model import new_cache

        num_pages = len(ids) // self.spec.page_size
        if num_pages == 0:
            return new_cache(self.model), 0
        cache = new_cache(self.model)
        ready_pages: list[int] = []
        views: list[Any] = []  # each layer's pages, in the read buffer
        arrived: dict[int, Any] = {}
        try:
            opened, out = self._with_host_fallback(
                lambda buffer: self.client.get_prefix_stream(
                    ids, out=buffer, wait_ms=self.settings.stream_wait_ms
                ),
                self._read_buffer(num_pages, self.gpu_stream),
                "gpu_stream",
            )
            with opened as stream:
                if stream.num_pages == 0:
                    return cache, 0
                for ready in stream:
                    arrived[ready.layer] = ready
                    # DynamicCache takes layers in order; they are committed in order anyway
                    while len(ready_pages) in arrived:
                        layer = len(ready_pages)
                        item = arrived.pop(layer)
                        pages = item.data if out is None else out[item.index, : item.num_pages]
                        ready_pages.append(int(item.num_pages))
                        views.append(pages)
                        if item.num_pages:
                            self._fill_layer(cache, layer, pages)
        except KVStoreError as exc:
            log.warning("streaming the prefix failed, recomputing it: %s", exc)
            return new_cache(self.model), 0
        found = min(ready_pages) if len(ready_pages) == self.spec.num_layers else 0
        if found == 0:
            return new_cache(self.model), 0
        if max(ready_pages) > found:  # a page went missing under some layers: keep what all layers have
            cache = new_cache(self.model)
            for layer, pages in enumerate(views):
                self._fill_layer(cache, layer, pages[:found])
        return cache, found

    def decode(
        self,
        tokens: Sequence[int],
        *,
        mode: str = "load",
        max_new_tokens: int = 16,
        t0: float | None = None,
        reference: bool = False,
    ) -> dict[str, Any]:
        """Continue ``tokens``: ``mode`` is "load" (get_prefix), "stream" (get_prefix_stream) or "recompute".

        With ``reference``, also run plain ``generate`` here (the colocated run) and
        compare: its tokens, its per-step top-2 logit margins, and whether the
        loaded KV bytes equal its cache's bit for bit.
        """
        import torch

        from kvstore.demo.model import drop_last_tokens, new_cache, top2_margin

        arrival = time.monotonic()
        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        if len(ids) == 0:
            raise ValueError("an empty prompt has nothing to continue")
        page_size = self.spec.page_size
        full = len(ids) // page_size * page_size
        self.computed_tokens = 0
        first_from = "computed"
        with torch.inference_mode():
            if mode == "recompute":
                cache, loaded_pages = new_cache(self.model), 0
            elif mode == "load":
                cache, loaded_pages = self.load_prefix(ids[:full])
            elif mode == "stream":
                cache, loaded_pages = self.stream_prefix(ids[:full])
            else:
                raise ValueError(f"unknown decode mode {mode!r}")
            loaded = loaded_pages * page_size
            self._sync()
            loaded_at = time.monotonic()
            first: int | None = None
            margins: list[float] = []
            if loaded == len(ids):  # page-aligned and all stored: no tail to compute
                extra = self.client.get_extra(ids, FIRST_TOKEN)
                if extra is not None:
                    first, first_from = int(np.frombuffer(extra, dtype="<i4")[0]), "extra"
                    margins.append(float("inf"))  # the prefill's logits: no margin seen here
                else:  # no extra (the prefill died first, or a prefix of a stored prompt): recompute the last token
                    drop_last_tokens(cache, 1)
                    loaded = len(ids) - 1
            if first is None:
                logits = self._forward(ids[loaded:], cache)
                first = int(logits.argmax())
                margins.append(top2_margin(logits))
            first_at = time.monotonic()
            generated = [first]
            for _ in range(max_new_tokens - 1):
                logits = self._forward(np.array([generated[-1]]), cache)
                generated.append(int(logits.argmax()))
                margins.append(top2_margin(logits))
        done = time.monotonic()
        result: dict[str, Any] = {
            "mode": mode,
            "tokens": generated,
            "margins": margins,
            "first_from": first_from,
            "prompt_tokens": len(ids),
            "loaded_tokens": loaded_pages * page_size,
            "computed_prompt_tokens": len(ids) - loaded if first_from == "computed" else 0,
            "t0": arrival if t0 is None else t0,
            "t_arrival": arrival,
            "read_s": self.read_s,
            "t_loaded": loaded_at,
            "t_first": first_at,
            "t_done": done,
        }
        if reference:
            # the loaded positions of the decode cache still hold the bytes read from the store
            result.update(self.reference(ids, max_new_tokens, cache, loaded_pages * page_size))
        return result

    def _same_bytes(self, cache: Any, other: Any, tokens: int) -> bool:
        """Whether the first ``tokens`` positions of every layer of two caches are equal bit for bit."""
        import torch

        from kvstore.demo.model import cache_layer

        for layer in range(self.spec.num_layers):
            for mine, theirs in zip(cache_layer(cache, layer), cache_layer(other, layer), strict=True):
                a = mine[:, :, :tokens].contiguous().view(-1).view(torch.uint8)
                b = theirs[:, :, :tokens].contiguous().view(-1).view(torch.uint8)
                if not bool((a == b).all()):
                    return False
        return True

    def reference(
        self,
        tokens: Sequence[int] | np.ndarray,
        max_new_tokens: int,
        loaded_cache: Any = None,
        loaded_tokens: int = 0,
    ) -> dict[str, Any]:
        """Plain ``model.generate`` (greedy) in this process: the colocated run.

        With ``loaded_cache``, also whether its first ``loaded_tokens`` positions
        (the KV read from the store) equal the colocated cache's bit for bit.
        """
        import torch

        from kvstore.demo.model import new_cache, top2_margin

        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        with torch.inference_mode():
            x = torch.from_numpy(ids).to(self.device)[None]
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                output_logits=True,
            )
            result: dict[str, Any] = {
                "reference_tokens": out.sequences[0, len(ids) :].tolist(),
                "reference_margins": [top2_margin(step[0]) for step in out.logits],
            }
            if loaded_cache is not None and loaded_tokens:
                # the generate output's cache: ``cache`` from transformers 5.24 on, ``past_key_values`` before
                colocated = getattr(out, "cache", None)
                if colocated is None:
                    colocated = out.past_key_values
                result["kv_identical"] = self._same_bytes(loaded_cache, colocated, loaded_tokens)
                result["kv_bytes_compared"] = loaded_tokens * self.spec.kv_bytes_per_token
                del out, colocated
                # and against one plain forward, the call the prefill worker makes (generate may take
                # another attention path; if only this one matches, that is where the bits part)
                forward = new_cache(self.model)
                self._forward(ids, forward)
                result["kv_identical_forward"] = self._same_bytes(loaded_cache, forward, loaded_tokens)
        return result


def compare_tokens(
    got: Sequence[int],
    want: Sequence[int],
    margins: Sequence[Sequence[float]] = (),
    tolerance: float = 0.0,
) -> dict[str, Any]:
    """Compare two greedy runs step by step; a divergence is accepted only at a near-tie.

    The runs are equal up to their first differing step.  That step is rounding
    (accepted) if its top-2 logit margin, in any run that has one there, is
    below ``tolerance``: both runs saw the same tokens up to it, so only
    rounding separates them, and a gap that small is within bf16 rounding of
    the logits.  Later steps are not compared (the runs now continue different
    texts).  With tolerance 0 (float32) any difference fails.  This checks at
    least what "compare up to the first step whose margin is below the
    tolerance" checks, and more where that near-tie did not flip.
    Returns ``{"match", "steps_compared", "diverged_at", "diverged_margin"}``.
    """
    steps = min(len(got), len(want))
    mismatch = next((i for i in range(steps) if got[i] != want[i]), None)
    if mismatch is None:
        return {
            "match": len(got) == len(want),
            "steps_compared": steps,
            "diverged_at": None,
            "diverged_margin": None,
        }
    margin = min((float(m[mismatch]) for m in margins if mismatch < len(m)), default=float("inf"))
    return {
        "match": margin < tolerance,
        "steps_compared": mismatch,
        "diverged_at": mismatch,
        "diverged_margin": margin,
    }


def _worker_main(role: str, settings: WorkerSettings, requests: Any, replies: Any) -> None:
    """Body of a worker process: build, answer ("ready", info), then serve requests until None."""
    from kvstore import logs

    logs.setup(settings.log_level, component=f"pd-{role}")
    worker: _Worker
    try:
        worker = PrefillWorker(settings) if role == "prefill" else DecodeWorker(settings)
    except BaseException:  # noqa: BLE001 - reported to the driver
        replies.put(("error", traceback.format_exc()))
        return
    replies.put(("ok", worker.info()))
    try:
        while True:
            request = requests.get()
            if request is None:
                return
            op, kwargs = request
            try:
                replies.put(("ok", getattr(worker, op)(**kwargs)))
            except Exception:  # noqa: BLE001 - one bad request does not end the worker
                replies.put(("error", traceback.format_exc()))
    finally:
        worker.close()


# ---------------------------------------------------------------------------------------------------------
# Driver side (no torch needed here)


class WorkerError(RuntimeError):
    """A worker process failed a request, or died."""


class WorkerProcess:
    """One spawned worker: ``send`` a request, ``receive`` its answer (requests are served in order)."""

    def __init__(self, role: str, settings: WorkerSettings) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.role = role
        self._requests: Any = ctx.Queue()
        self._replies: Any = ctx.Queue()
        self.process = ctx.Process(
            target=_worker_main,
            args=(role, settings, self._requests, self._replies),
            name=f"pd-{role}",
            daemon=True,
        )
        self.info: dict[str, Any] = {}

    def start(self) -> WorkerProcess:
        self.process.start()
        return self

    def send(self, op: str, **kwargs: Any) -> None:
        self._requests.put((op, kwargs))

    def receive(self, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, value = self._replies.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise WorkerError(
                        f"{self.role} worker died (exit code {self.process.exitcode})"
                    ) from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"{self.role} worker gave no answer in {timeout:.0f} s") from None
        if status == "error":
            raise WorkerError(f"{self.role} worker failed:\n{value}")
        return value

    def call(self, op: str, timeout: float = 600.0, **kwargs: Any) -> Any:
        self.send(op, **kwargs)
        return self.receive(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self._requests.put(None)
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)


class PDPair:
    """A prefill and a decode worker process against the cluster at ``prefill.master`` (a context manager)."""

    def __init__(
        self, prefill: WorkerSettings, decode: WorkerSettings | None = None, startup_timeout: float = 600.0
    ) -> None:
        self.prefill = WorkerProcess("prefill", prefill)
        self.decode = WorkerProcess("decode", decode or prefill)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> PDPair:
        try:
            self.prefill.start()
            self.decode.start()  # both build their models at the same time
            self.prefill.info = self.prefill.receive(self.startup_timeout)
            self.decode.info = self.decode.receive(self.startup_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.prefill.stop()
        self.decode.stop()

    @property
    def streaming(self) -> bool:
        return bool(self.decode.info.get("streaming"))

    def run_prefill(self, tokens: Sequence[int], reuse: bool = True) -> dict[str, Any]:
        return dict(self.prefill.call("prefill", tokens=list(map(int, tokens)), reuse=reuse))

    def run_decode(self, tokens: Sequence[int], mode: str = "load", **kwargs: Any) -> dict[str, Any]:
        return dict(self.decode.call("decode", tokens=list(map(int, tokens)), mode=mode, **kwargs))

    def timed(
        self, tokens: Sequence[int], mode: str, max_new_tokens: int = 1, **kwargs: Any
    ) -> dict[str, Any]:
        """One request, timed from the driver's clock (CLOCK_MONOTONIC: one clock for every process of the host).

        - ``recompute``: the decode worker gets the prompt and computes it whole.
          ``ttft`` = its first token - the request's send time.
        - ``load``: the prefill worker computes and stores the prompt; when it has
          answered, the decode worker gets the prompt and loads it.
          ``ttft`` = first token - send time of the decode request (the load alone);
          ``e2e`` = first token - send time of the prefill request.
        - ``stream``: both get the prompt at once; the decode streams layers as the
          prefill commits them.  ``e2e`` = first token - send time of both requests.
        """
        prompt = list(map(int, tokens))
        prefill: dict[str, Any] | None = None
        if mode == "recompute":
            t0 = time.monotonic()
            decode = self.run_decode(prompt, "recompute", max_new_tokens=max_new_tokens, t0=t0, **kwargs)
            return {
                "mode": mode,
                "ttft": decode["t_first"] - t0,
                "e2e": decode["t_first"] - t0,
                "decode": decode,
            }
        if mode == "load":
            t_prefill = time.monotonic()
            prefill = self.run_prefill(prompt)
            t0 = time.monotonic()
            decode = self.run_decode(prompt, "load", max_new_tokens=max_new_tokens, t0=t0, **kwargs)
            return {
                "mode": mode,
                "ttft": decode["t_first"] - t0,
                "read_s": decode["read_s"],
                "e2e": decode["t_first"] - t_prefill,
                "prefill_s": prefill["t_done"] - t_prefill,
                "prefill": prefill,
                "decode": decode,
            }
        if mode == "stream":
            t0 = time.monotonic()
            self.decode.send(
                "decode", tokens=prompt, mode="stream", max_new_tokens=max_new_tokens, t0=t0, **kwargs
            )
            self.prefill.send("prefill", tokens=prompt, reuse=True)
            prefill = self.prefill.receive(600.0)
            decode = self.decode.receive(600.0)
            return {
                "mode": mode,
                "ttft": decode["t_first"] - decode["t_arrival"],
                "e2e": decode["t_first"] - t0,
                "prefill_s": prefill["t_done"] - t0,
                "after_prefill_s": decode["t_first"] - prefill["t_done"],
                "prefill": prefill,
                "decode": decode,
            }
        raise ValueError(f"unknown mode {mode!r}")


# ---------------------------------------------------------------------------------------------------------
# Cluster for the driver


@contextlib.contextmanager
def cluster_for(master: str | None, dram: str | int, shm_dir: str = "", vram: str = "") -> Iterator[str]:
    """``master`` if given (a running cluster), else a single-machine cluster of our own; yields the address.

    ``vram`` (``SIZE:GPU``) gives our node a VRAM region too: puts from CUDA tensors then land there
    and same-host GPU readers use CUDA IPC (DESIGN.md, transports).
    """
    if master:
        yield master
        return
    from kvstore.testing import Cluster

    with Cluster(
        1,
        dram=dram,
        shm_dir=shm_dir or None,
        inherit_settings_env=True,
        startup_timeout=60.0,
        vram=vram or None,
    ) as cluster:
        yield cluster.master_address


def evict_namespace(master: str, namespace: str) -> int:
    """Evict the namespace's unleased pages (between benchmark runs, so prompts do not fill the pool)."""
    from kvstore._proto import kvstore_pb2 as pb
    from kvstore.cli.admin import Master

    with Master(kvconfig.load({"master": master})) as admin:
        reply = admin.admin("Evict", pb.EvictRequest(namespace=namespace))
    return int(reply.pages_evicted)


# ---------------------------------------------------------------------------------------------------------
# The demo and the benchmark


def _prompt(settings: WorkerSettings, seed: int, length: int) -> list[int]:
    from kvstore.demo.model import MODEL_SPECS

    vocab = int(MODEL_SPECS[settings.model]["vocab_size"])
    # A seed of its own per (run, length): a fresh prompt is never already stored by an earlier one.
    rng = np.random.default_rng([settings.seed, seed, length])
    return [int(t) for t in rng.integers(0, vocab, length)]


def _tolerance(settings: WorkerSettings) -> float:
    from kvstore.demo.model import MODEL_SPECS

    return 0.0 if MODEL_SPECS[settings.model]["dtype"] == "float32" else BF16_MARGIN_TOLERANCE


def _verdict_text(verdict: dict[str, Any], new_tokens: int) -> str:
    if verdict["diverged_at"] is None:
        return f"{verdict['steps_compared']}/{new_tokens} tokens equal to generate"
    where = f"step {verdict['diverged_at']} (top-2 margin {verdict['diverged_margin']:.4f})"
    if verdict["match"]:
        return (
            f"{verdict['steps_compared']}/{new_tokens} tokens equal to generate, then a near-tie at {where}"
        )
    return f"tokens DIFFER from generate at {where}"


def _kv_text(decode: dict[str, Any]) -> str:
    if "kv_identical" not in decode:
        return "no KV loaded"
    return "KV bytes " + ("identical" if decode["kv_identical"] else "DIFFER") + " to the colocated cache"


def run_demo(
    pair: PDPair,
    settings: WorkerSettings,
    lengths: Sequence[int],
    max_new_tokens: int = 16,
    out: Any = None,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """Show the three things issue 7 asks for, checking each; returns a report (``ok`` is the verdict).

    1. Disaggregated decode (load, and stream where the SDK has it) gives the
       tokens of ``generate`` in one process, for each prompt length (page-aligned
       or not), and the KV bytes it read are those of the colocated cache.
    2. A request sharing the first pages of an earlier one computes only its suffix.
    """
    say = functools.partial(print, file=out or sys.stdout, flush=True)
    tolerance = _tolerance(settings) if tolerance is None else tolerance
    page = settings.page_size
    report: dict[str, Any] = {"requests": [], "ok": True}
    modes = ["load"] + (["stream"] if pair.streaming else [])
    say(
        f"model {settings.model} (seed {settings.seed}) on {settings.device}; page size {page}; "
        f"modes {', '.join(modes)}; tokens compared "
        + ("exactly" if tolerance == 0 else f"up to a divergence at a top-2 logit margin below {tolerance}")
    )
    for i, length in enumerate(lengths):
        for mode in modes:
            prompt = _prompt(settings, 1000 + i * 10 + modes.index(mode), length)
            run = pair.timed(prompt, mode, max_new_tokens=max_new_tokens, reference=True)
            decode = run["decode"]
            verdict = compare_tokens(
                decode["tokens"],
                decode["reference_tokens"],
                [decode["margins"], decode["reference_margins"]],
                tolerance,
            )
            kv_ok = decode.get("kv_identical", True)
            if not kv_ok:
                say(f"    KV bytes equal to a plain forward's: {decode.get('kv_identical_forward')}")
            ok = verdict["match"] and kv_ok
            report["ok"] &= ok
            report["requests"].append({"length": length, "mode": mode, **verdict, "kv_identical": kv_ok})
            say(
                f"  {length:6d} tokens ({length // page} pages + {length % page} tail) {mode:6s}: "
                f"loaded {decode['loaded_tokens']}, computed {decode['computed_prompt_tokens']} "
                f"(first token from {decode['first_from']}); {_verdict_text(verdict, max_new_tokens)}; "
                f"{_kv_text(decode)}  [{'ok' if ok else 'FAIL'}]"
            )
    # Prefix reuse: B shares A's first pages, then differs.
    length = max(lengths)
    shared_pages = max(1, length // page // 2)
    a = _prompt(settings, 2000, length)
    b = a[: shared_pages * page] + _prompt(settings, 2001, length - shared_pages * page + page // 2)
    pair.run_prefill(a)
    prefill_b = pair.run_prefill(b)
    decode_b = pair.run_decode(b, "load", max_new_tokens=max_new_tokens, reference=True)
    verdict = compare_tokens(
        decode_b["tokens"],
        decode_b["reference_tokens"],
        [decode_b["margins"], decode_b["reference_margins"]],
        tolerance,
    )
    computed_rest = prefill_b["computed_tokens"] == len(b) - shared_pages * page
    ok = verdict["match"] and computed_rest and prefill_b["reused_tokens"] == shared_pages * page
    report["ok"] &= ok
    report["prefix_reuse"] = {
        "prompt_tokens": len(b),
        "shared_tokens": shared_pages * page,
        "reused_tokens": prefill_b["reused_tokens"],
        "computed_tokens": prefill_b["computed_tokens"],
        **verdict,
    }
    say(
        f"  prefix reuse: B ({len(b)} tokens) shares {shared_pages * page} with A; B's prefill loaded "
        f"{prefill_b['reused_tokens']} and computed {prefill_b['computed_tokens']} tokens; "
        f"B: {_verdict_text(verdict, max_new_tokens)}  [{'ok' if ok else 'FAIL'}]"
    )
    say("all checks passed" if report["ok"] else "SOME CHECKS FAILED")
    return report


def run_bench(
    pair: PDPair,
    settings: WorkerSettings,
    lengths: Sequence[int],
    runs: int = 3,
    evict: bool = True,
    out: Any = None,
) -> dict[str, Any]:
    """Time to first token at the decode side, three ways, medians of ``runs`` (see :meth:`PDPair.timed`).

    Every run uses a fresh prompt (nothing of it stored before); one warm-up run
    per length and mode is discarded.  Columns: ``recompute`` (decode computes the
    whole prompt: the colocated TTFT), ``load`` (decode loads the prompt's KV after
    the prefill finished: the load alone), ``prefill`` (the prefill worker, request to
    last layer committed), ``load e2e`` (prefill request to first token, load
    after prefill), ``stream e2e`` (prefill request to first token, decode
    streaming layers while the prefill runs), ``stream after prefill`` (that
    first token - the prefill's end in the same run: what is left of the load
    once streaming hid the rest behind the prefill).
    """
    say = functools.partial(print, file=out or sys.stdout, flush=True)
    modes = ["recompute", "load"] + (["stream"] if pair.streaming else [])
    if not pair.streaming:
        say("note: this kvstore has no get_prefix_stream: the stream column is left out")
    rows: list[dict[str, Any]] = []
    for length in lengths:
        samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for run in range(runs + 1):  # run 0 warms up
            for mode in modes:
                result = pair.timed(_prompt(settings, 10_000 + run * 10 + modes.index(mode), length), mode)
                if run:
                    samples[mode].append(result)
                if evict and mode != "recompute":
                    evict_namespace(settings.master, pair.decode.info["namespace"])

        def median(mode: str, key: str, samples: dict[str, list[dict[str, Any]]] = samples) -> float | None:
            values = [s[key] for s in samples.get(mode, []) if key in s]
            return statistics.median(values) if values else None

        row = {
            "tokens": length,
            "kv_bytes": length // settings.page_size * settings.page_size * _kv_bytes_per_token(settings),
            "recompute_ttft_s": median("recompute", "ttft"),
            "load_ttft_s": median("load", "ttft"),
            "load_read_s": median("load", "read_s"),
            "prefill_s": median("load", "prefill_s"),
            "load_e2e_s": median("load", "e2e"),
            "stream_e2e_s": median("stream", "e2e"),
            "stream_prefill_s": median("stream", "prefill_s"),
            "stream_after_prefill_s": median("stream", "after_prefill_s"),
            "runs": runs,
        }
        rows.append(row)
        say(_row_text(row))
    return {
        "what": "time to first token at the decode side, medians (kvstore.demo.pd.run_bench)",
        "model": settings.model,
        "device": settings.device,
        "page_size": settings.page_size,
        "transport": settings.transport,
        "prefill_info": pair.prefill.info,
        "decode_info": pair.decode.info,
        "rows": rows,
    }


def _kv_bytes_per_token(settings: WorkerSettings) -> int:
    from kvstore.demo.model import ModelSpec

    return ModelSpec(settings.model, settings.seed, settings.page_size).kv_bytes_per_token


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


TABLE_HEADERS = [
    "tokens",
    "KV MiB",
    "recompute TTFT ms",
    "load TTFT ms",
    "speedup",
    "KV read GB/s",
    "prefill ms",
    "load e2e ms",
    "stream e2e ms",
    "stream after prefill ms",
]


def _row_cells(row: dict[str, Any]) -> list[str]:
    speedup = (
        f"{row['recompute_ttft_s'] / row['load_ttft_s']:.1f}x"
        if row["recompute_ttft_s"] and row["load_ttft_s"]
        else "-"
    )
    return [
        str(row["tokens"]),
        f"{row['kv_bytes'] / 2**20:.1f}",
        _ms(row["recompute_ttft_s"]),
        _ms(row["load_ttft_s"]),
        speedup,
        f"{row['kv_bytes'] / row['load_read_s'] / 1e9:.1f}" if row.get("load_read_s") else "-",
        _ms(row["prefill_s"]),
        _ms(row["load_e2e_s"]),
        _ms(row["stream_e2e_s"]),
        _ms(row["stream_after_prefill_s"]),
    ]


def _row_text(row: dict[str, Any]) -> str:
    return "  " + "  ".join(f"{h}={c}" for h, c in zip(TABLE_HEADERS, _row_cells(row), strict=True))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
    lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line (kvstore demo pd, examples/pd_disagg/*.py)

DEFAULT_LENGTHS = {"small": "5,16,37,64,100", "small-bf16": "5,16,37,64,100", "8b": "2048,8192,32768"}
DEFAULT_BENCH_LENGTHS = {"small": "256,1024,2048", "small-bf16": "256,1024,2048", "8b": "2048,8192,32768"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bench", action="store_true", help="measure time to first token (three ways)")
    parser.add_argument(
        "--model", choices=["small", "small-bf16", "8b"], default="small", help="model shape [small]"
    )
    parser.add_argument("--device", default="cpu", help="torch device of both workers (cpu, cuda) [cpu]")
    parser.add_argument("--prefill-device", default="", help="device of the prefill worker (e.g. cuda:0)")
    parser.add_argument("--decode-device", default="", help="device of the decode worker (e.g. cuda:1)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed [0]")
    parser.add_argument("--page-size", type=int, default=16, help="tokens per page [16]")
    parser.add_argument("--lengths", default="", help="prompt lengths, comma separated [depends on --model]")
    parser.add_argument("--runs", type=int, default=3, help="benchmark runs per length (medians) [3]")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens to decode per request (demo) [16]")
    parser.add_argument("--transport", default="auto", help="client transport (auto, shm, tcp) [auto]")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker [torch default]")
    parser.add_argument(
        "--own-cluster",
        action="store_true",
        help="start a single-machine cluster for the run instead of using --master",
    )
    parser.add_argument(
        "--dram", dest="demo_dram", default="", help="with --own-cluster: node DRAM [sized from the lengths]"
    )
    parser.add_argument(
        "--vram",
        dest="demo_vram",
        default="",
        help="with --own-cluster: also a VRAM region on the node, SIZE:GPU (e.g. 16GiB:0) [none]",
    )
    parser.add_argument(
        "--margin-tolerance",
        type=float,
        default=None,
        help="accept a divergence from generate at a step whose top-2 logit margin is below this "
        f"[0 (exact) for float32, {BF16_MARGIN_TOLERANCE} for bf16]",
    )
    parser.add_argument("--out", default="", help="write the results as JSON to this file")


def run_cli(args: argparse.Namespace, cfg: kvconfig.Config) -> int:
    lengths_text = args.lengths or (DEFAULT_BENCH_LENGTHS if args.bench else DEFAULT_LENGTHS)[args.model]
    lengths = [int(x) for x in lengths_text.split(",") if x.strip()]
    base = WorkerSettings(
        master="",
        model=args.model,
        seed=args.seed,
        page_size=args.page_size,
        device=args.device,
        transport=args.transport,
        threads=args.threads,
        log_level=cfg.log_level,
    )
    per_token = _kv_bytes_per_token(base)
    # The largest prompt's KV twice (two stored modes), with room to spare; runs are evicted as they end.
    dram = args.demo_dram or max(256 << 20, int(4 * max(lengths) * per_token) + (64 << 20))
    with cluster_for(None if args.own_cluster else cfg.master, dram, cfg.shm_dir, args.demo_vram) as master:
        prefill_settings = dataclasses.replace(base, master=master, device=args.prefill_device or args.device)
        decode_settings = dataclasses.replace(base, master=master, device=args.decode_device or args.device)
        print(f"kvstore at {master}; starting the prefill and decode workers...", flush=True)
        with PDPair(prefill_settings, decode_settings) as pair:
            print(
                f"prefill worker pid {pair.prefill.info['pid']} on {pair.prefill.info['device']}, decode worker "
                f"pid {pair.decode.info['pid']} on {pair.decode.info['device']}; namespace "
                f"{pair.decode.info['namespace']}; async put {pair.prefill.info['async_put']}, streaming "
                f"{pair.streaming}, GPU data plane {pair.decode.info['gpu_direct']}",
                flush=True,
            )
            if args.bench:
                result = run_bench(pair, prefill_settings, lengths, runs=args.runs)
                print(markdown_table(result["rows"]))
                ok = True
            else:
                result = run_demo(
                    pair,
                    prefill_settings,
                    lengths,
                    max_new_tokens=args.new_tokens,
                    tolerance=args.margin_tolerance,
                )
                ok = bool(result["ok"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        print(f"wrote {args.out}")
    return 0 if ok else 1
