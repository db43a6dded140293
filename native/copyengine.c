/*
 * kvstore._native: the batched copy engine.
 *
 * Python hands over one packed table of operations per call (never one call
 * per segment); the GIL is released for the whole batch, and large batches
 * run on a few threads that claim ~1 MiB of whole ops at a time.  Checksums
 * (xxh3_64) are computed inside the copy: each 64-byte stripe is hashed from
 * the registers that store it (fused_copy_xxh3), or, for small or unaligned
 * destinations, each chunk right after it lands, while it is still in cache.
 *
 * Primitives:
 *   copy(ops, hashes=None, threads=1)   ops: u64 triples (dst, src, len)
 *   hash(ops, hashes, threads=1)        ops: u64 pairs (addr, len)
 *   fill(ops, byte)                     ops: u64 pairs (addr, len); used to pre-fault pools
 *   send(fd, ops, hashes=None, timeout_ms=-1)   send the (addr, len) ranges back to back
 *   recv(fd, ops, hashes=None, timeout_ms=-1, staging=None)   receive into the (addr, len) ranges
 *
 * send/recv move a whole table of ranges through a socket with gathered
 * system calls (up to IO_MAX_IOV ranges, IO_GROUP_BYTES per call) and the GIL
 * released; with hashes, each range's xxh3_64 is computed on the bytes each
 * system call just sent or received, while the kernel's copy left them in cache.  The
 * fd may be blocking or not (a Python socket with a timeout): EAGAIN waits in
 * poll() for at most timeout_ms (-1: forever), as socket.settimeout would.
 * recv with a staging buffer lands each system call's bytes there (in cache),
 * hashes them and stream-copies them into the ranges (recv_staged).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_STREAMING_STORES 1
#endif

/* Chunk hashed right after it is copied: small enough to still be in L2. */
#define CHUNK_BYTES (256u * 1024u)
#define MAX_THREADS 16
/* Below this many bytes per batch, threads cost more than they save. */
#define MIN_BYTES_PER_THREAD (8u << 20)

/* Bytes a worker claims at a time (whole ops): small enough that a worker whose core is taken by
 * another process for a while (two cores shared with the master and node) leaves the rest of the
 * batch to the others, large enough that claiming costs nothing. */
#define CLAIM_BYTES (1u << 20)

typedef struct {
    const uint64_t *ops;
    size_t stride;      /* u64 words per op: 3 for copy, 2 for hash */
    size_t nops;
    size_t claim;       /* ops per claim */
    size_t *next;       /* the next unclaimed op, shared by the batch's workers */
    uint64_t *hashes;   /* may be NULL for copy */
    int do_copy;
} work_t;

/* Plain copies of at least this many bytes use streaming (non-temporal) stores. */
#define STREAM_MIN_BYTES (64u * 1024u)
/* The L1-resident buffer a hashed copy into an unaligned destination goes through (copy_and_hash). */
#define STAGE_BYTES (16u * 1024u)

#ifdef HAVE_STREAMING_STORES
/* 64 bytes from src into v, and stream-stored from v into dst (16-byte aligned). */
static inline void stream_64(uint8_t *dst, const uint8_t *src, __m128i v[4]) {
    for (int i = 0; i < 4; i++) v[i] = _mm_loadu_si128((const __m128i *)(src + 16 * i));
    for (int i = 0; i < 4; i++) _mm_stream_si128((__m128i *)(dst + 16 * i), v[i]);
}

/*
 * memcpy with streaming stores: the destination lines are written without
 * being read first (no read-for-ownership) and without evicting the cache.  A
 * bulk copy into a buffer nobody reads right away (a get into an engine's KV
 * buffer) then moves 2 bytes of memory traffic per byte instead of 3: on the
 * development VM 27 GB/s on one thread where glibc's memcpy of the same
 * segments does 21-23.  The caller issues the store fence (one per batch).
 */
static void stream_copy(uint8_t *dst, const uint8_t *src, uint64_t len) {
    uint64_t head = (16 - ((uintptr_t)dst & 15)) & 15;
    if (head > len) head = len;
    memcpy(dst, src, head);
    dst += head;
    src += head;
    len -= head;
    uint64_t blocks = len / 64;
    __m128i v[4];
    for (uint64_t i = 0; i < blocks; i++) {
        stream_64(dst, src, v);
        src += 64;
        dst += 64;
    }
    memcpy(dst, src, len - blocks * 64);
}
#endif

#ifdef HAVE_STREAMING_STORES
/*
 * A hashed copy in one pass: each 64-byte stripe is loaded once, stream-stored into dst and
 * accumulated into XXH3's state from the same registers (XXH3_64bits' long-input loop with the
 * default secret, written out here because libxxhash has no entry point that takes the stripes
 * as they go by).  The hash is of exactly the bytes stored.  64 MiB of 64 KiB segments into a
 * cold destination on the 2-core VM, one thread: 11.2-12.8 GB/s, against 8.1-8.7 for the copy
 * through an L1 buffer with XXH3_64bits_update and 8.8-9.0 for glibc's memcpy (session 7).
 * Needs len > 240 (XXH3's long inputs) and dst 16-byte aligned (the streaming stores).  Used
 * from 4 KiB: 4, 16 and 32 KiB segments ran 7.2, 6.9 and 9.1 GB/s against 6.4, 6.2 and 6.3 for
 * memcpy and then XXH3_64bits of dst while in cache.
 */
#define FUSED_MIN_BYTES 4096u
#define FH_STRIPE 64u
#define FH_STRIPES_PER_BLOCK 16u /* (default secret 192 - 64) / 8 */
#define FH_BLOCK (FH_STRIPE * FH_STRIPES_PER_BLOCK)

static inline void fh_accumulate(__m128i acc[4], const __m128i v[4], const uint8_t *secret) {
    for (int i = 0; i < 4; i++) {
        __m128i key = _mm_loadu_si128((const __m128i *)(secret + 16 * i));
        __m128i dk = _mm_xor_si128(v[i], key);
        __m128i dk_lo = _mm_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
        __m128i product = _mm_mul_epu32(dk, dk_lo);
        __m128i swap = _mm_shuffle_epi32(v[i], _MM_SHUFFLE(1, 0, 3, 2));
        acc[i] = _mm_add_epi64(product, _mm_add_epi64(acc[i], swap));
    }
}

static inline void fh_scramble(__m128i acc[4], const uint8_t *secret) {
    const __m128i prime32 = _mm_set1_epi32((int)0x9E3779B1U);
    for (int i = 0; i < 4; i++) {
        __m128i x = _mm_xor_si128(acc[i], _mm_srli_epi64(acc[i], 47));
        __m128i dk = _mm_xor_si128(x, _mm_loadu_si128((const __m128i *)(secret + 16 * i)));
        __m128i hi = _mm_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
        acc[i] = _mm_add_epi64(_mm_mul_epu32(dk, prime32), _mm_slli_epi64(_mm_mul_epu32(hi, prime32), 32));
    }
}

static inline uint64_t fh_read64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline uint64_t fh_fold64(uint64_t a, uint64_t b) {
    __uint128_t p = (__uint128_t)a * b;
    return (uint64_t)p ^ (uint64_t)(p >> 64);
}

static inline uint64_t fh_merge(const __m128i acc[4], const uint8_t *secret, uint64_t start) {
    uint64_t a[8];
    memcpy(a, acc, 64);
    uint64_t h = start;
    for (int i = 0; i < 4; i++)
        h += fh_fold64(a[2 * i] ^ fh_read64(secret + 16 * i), a[2 * i + 1] ^ fh_read64(secret + 16 * i + 8));
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
}

/* One stripe: loaded once, stored (streaming) and accumulated; ``keep`` also gets the 64 bytes. */
static inline void fh_stripe(__m128i acc[4], uint8_t *dst, const uint8_t *src, const uint8_t *secret, uint8_t *keep) {
    __m128i v[4];
    stream_64(dst, src, v);
    if (keep)
        for (int i = 0; i < 4; i++) _mm_storeu_si128((__m128i *)(keep + 16 * i), v[i]);
    fh_accumulate(acc, v, secret);
}

/* Copies len (> 240, dst 16-byte aligned) bytes with streaming stores and returns XXH3_64bits of
 * exactly the bytes stored. */
static uint64_t fused_copy_xxh3(uint8_t *dst, const uint8_t *src, uint64_t len) {
    const uint8_t *secret = XXH3_kSecret; /* the default secret: 192 bytes */
    static const uint64_t init[8] = {0xC2B2AE3DULL,         0x9E3779B185EBCA87ULL, 0xC2B2AE3D27D4EB4FULL,
                                     0x165667B19E3779F9ULL, 0x85EBCA77C2B2AE63ULL, 0x85EBCA77ULL,
                                     0x27D4EB2F165667C5ULL, 0x9E3779B1ULL}; /* XXH3_INIT_ACC */
    __m128i acc[4];
    memcpy(acc, init, sizeof acc);
    /* last[64..128): the last stripe stored; with the tail behind it, last[tail..tail+64) is the
     * input's final 64 bytes, which XXH3 accumulates once more (a stripe overlapping stored ones) */
    uint8_t last[2 * FH_STRIPE] __attribute__((aligned(16)));
    uint64_t nb_blocks = (len - 1) / FH_BLOCK, pos = 0;
    for (uint64_t n = 0; n < nb_blocks; n++) {
        for (unsigned s = 0; s < FH_STRIPES_PER_BLOCK; s++, pos += FH_STRIPE)
            fh_stripe(acc, dst + pos, src + pos, secret + 8 * s,
                      s == FH_STRIPES_PER_BLOCK - 1 ? last + FH_STRIPE : NULL);
        fh_scramble(acc, secret + 192 - FH_STRIPE);
    }
    uint64_t stripes = ((len - 1) - FH_BLOCK * nb_blocks) / FH_STRIPE; /* >= 3 when there is no block */
    for (unsigned s = 0; s < stripes; s++, pos += FH_STRIPE)
        fh_stripe(acc, dst + pos, src + pos, secret + 8 * s, s == stripes - 1 ? last + FH_STRIPE : NULL);
    uint64_t tail = len - pos; /* 1..64 bytes: read once, stored and hashed from ``last`` */
    memcpy(last, last + FH_STRIPE, FH_STRIPE);
    memcpy(last + FH_STRIPE, src + pos, tail);
    memcpy(dst + pos, last + FH_STRIPE, tail);
    __m128i final[4];
    for (int i = 0; i < 4; i++) final[i] = _mm_loadu_si128((const __m128i *)(last + tail + 16 * i));
    fh_accumulate(acc, final, secret + 192 - FH_STRIPE - 7);
    return fh_merge(acc, secret + 11, len * 0x9E3779B185EBCA87ULL);
}

#endif

static uint64_t copy_and_hash(uint8_t *dst, const uint8_t *src, uint64_t len, int want_hash) {
    if (!want_hash) {
#ifdef HAVE_STREAMING_STORES
        if (len >= STREAM_MIN_BYTES) {
            stream_copy(dst, src, len);
            return 0;
        }
#endif
        memcpy(dst, src, len);
        return 0;
    }
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    uint64_t done = 0;
#ifdef HAVE_STREAMING_STORES
    if (len >= FUSED_MIN_BYTES && ((uintptr_t)dst & 15) == 0) return fused_copy_xxh3(dst, src, len);
    if (len >= STREAM_MIN_BYTES) {
        /* An unaligned dst: through a small buffer that stays in L1: hashed there and stream-stored into dst, so dst is
         * only written (no read-for-ownership, no read back for the hash) and the hash is of exactly
         * the bytes stored, whatever the caller does to src meanwhile.  256 MiB of 64 KiB segments
         * into a cold 1 GiB buffer on the 2-core VM: 5.7 -> 6.3 GB/s on one thread, 10.9 -> 12.3 on
         * two, against memcpy and then hashing dst while in L2 (4, 8, 32 KiB buffers: slower). */
        uint8_t stage[STAGE_BYTES] __attribute__((aligned(64)));
        while (done < len) {
            uint64_t n = len - done;
            if (n > STAGE_BYTES) n = STAGE_BYTES;
            memcpy(stage, src + done, n);
            XXH3_64bits_update(&state, stage, n);
            stream_copy(dst + done, stage, n);
            done += n;
        }
        return XXH3_64bits_digest(&state);
    }
#endif
    while (done < len) {
        uint64_t n = len - done;
        if (n > CHUNK_BYTES) n = CHUNK_BYTES;
        memcpy(dst + done, src + done, n);
        XXH3_64bits_update(&state, dst + done, n);
        done += n;
    }
    return XXH3_64bits_digest(&state);
}

static void *run_work(void *arg) {
    work_t *w = (work_t *)arg;
    for (;;) {
        size_t begin = __atomic_fetch_add(w->next, w->claim, __ATOMIC_RELAXED);
        if (begin >= w->nops) break;
        size_t end = begin + w->claim < w->nops ? begin + w->claim : w->nops;
        for (size_t i = begin; i < end; i++) {
            const uint64_t *op = w->ops + i * w->stride;
            if (w->do_copy) {
                uint64_t h = copy_and_hash((uint8_t *)(uintptr_t)op[0], (const uint8_t *)(uintptr_t)op[1],
                                           op[2], w->hashes != NULL);
                if (w->hashes) w->hashes[i] = h;
            } else {
                w->hashes[i] = XXH3_64bits((const void *)(uintptr_t)op[0], (size_t)op[1]);
            }
        }
    }
#ifdef HAVE_STREAMING_STORES
    if (w->do_copy) _mm_sfence(); /* streaming stores are visible to everyone once this thread is done */
#endif
    return NULL;
}

/* Run ops on up to ``threads`` workers (the caller's thread is one), each claiming about
 * CLAIM_BYTES of whole ops at a time until none are left. */
static int run_batch(const uint64_t *ops, size_t nops, size_t stride, size_t len_index, uint64_t *hashes,
                     int do_copy, int threads) {
    uint64_t total = 0;
    for (size_t i = 0; i < nops; i++) total += ops[i * stride + len_index];
    int nthreads = threads;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((uint64_t)nthreads > total / MIN_BYTES_PER_THREAD) nthreads = (int)(total / MIN_BYTES_PER_THREAD);
    if ((size_t)nthreads > nops) nthreads = (int)nops;
    size_t next = 0;
    size_t claim = nops;
    if (nthreads > 1 && total > 0) {
        uint64_t per_op = total / nops;
        claim = per_op >= CLAIM_BYTES ? 1 : (size_t)(CLAIM_BYTES / (per_op ? per_op : 1));
    }
    work_t work = {ops, stride, nops, claim, &next, hashes, do_copy};
    if (nthreads <= 1) {
        run_work(&work);
        return 0;
    }
    pthread_t tids[MAX_THREADS];
    int launched = 0;
    for (int k = 1; k < nthreads; k++) {
        if (pthread_create(&tids[k], NULL, run_work, &work) != 0) break; /* fewer workers: still correct */
        launched = k;
    }
    run_work(&work);
    for (int k = 1; k <= launched; k++) pthread_join(tids[k], NULL);
    return 0;
}

static int get_ops(PyObject *obj, Py_buffer *view, size_t stride, size_t *nops) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) != 0) return -1;
    if (view->len % (Py_ssize_t)(stride * 8) != 0) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "ops buffer length %zd is not a multiple of %zu bytes", view->len, stride * 8);
        return -1;
    }
    *nops = (size_t)view->len / (stride * 8);
    return 0;
}

static int get_hashes(PyObject *obj, Py_buffer *view, size_t nops) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) return -1;
    if ((size_t)view->len < nops * 8) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "hashes buffer holds %zd bytes, %zu needed", view->len, nops * 8);
        return -1;
    }
    return 0;
}

/* The ops buffer and, unless hashes_obj is None, the hashes buffer (*hash_ptr stays NULL without one).
   On failure nothing is held and a Python error is set. */
static int get_ops_and_hashes(PyObject *ops_obj, PyObject *hashes_obj, size_t stride, Py_buffer *ops,
                              Py_buffer *hashes, size_t *nops, uint64_t **hash_ptr) {
    *hash_ptr = NULL;
    if (get_ops(ops_obj, ops, stride, nops) != 0) return -1;
    if (hashes_obj != Py_None) {
        if (get_hashes(hashes_obj, hashes, *nops) != 0) {
            PyBuffer_Release(ops);
            return -1;
        }
        *hash_ptr = (uint64_t *)hashes->buf;
    }
    return 0;
}

static PyObject *py_copy(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"ops", "hashes", "threads", NULL};
    PyObject *ops_obj, *hashes_obj = Py_None;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Oi", kwlist, &ops_obj, &hashes_obj, &threads)) return NULL;
    Py_buffer ops, hashes;
    size_t nops;
    uint64_t *hash_ptr;
    if (get_ops_and_hashes(ops_obj, hashes_obj, 3, &ops, &hashes, &nops, &hash_ptr) != 0) return NULL;
    Py_BEGIN_ALLOW_THREADS
    run_batch((const uint64_t *)ops.buf, nops, 3, 2, hash_ptr, 1, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ops);
    if (hash_ptr) PyBuffer_Release(&hashes);
    Py_RETURN_NONE;
}

static PyObject *py_hash(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"ops", "hashes", "threads", NULL};
    PyObject *ops_obj, *hashes_obj;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|i", kwlist, &ops_obj, &hashes_obj, &threads)) return NULL;
    Py_buffer ops, hashes;
    size_t nops;
    if (get_ops(ops_obj, &ops, 2, &nops) != 0) return NULL;
    if (get_hashes(hashes_obj, &hashes, nops) != 0) {
        PyBuffer_Release(&ops);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run_batch((const uint64_t *)ops.buf, nops, 2, 1, (uint64_t *)hashes.buf, 0, threads);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ops);
    PyBuffer_Release(&hashes);
    Py_RETURN_NONE;
}

static PyObject *py_fill(PyObject *self, PyObject *args) {
    PyObject *ops_obj;
    int byte;
    if (!PyArg_ParseTuple(args, "Oi", &ops_obj, &byte)) return NULL;
    Py_buffer ops;
    size_t nops;
    if (get_ops(ops_obj, &ops, 2, &nops) != 0) return NULL;
    const uint64_t *o = (const uint64_t *)ops.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < nops; i++) memset((void *)(uintptr_t)o[2 * i], byte, (size_t)o[2 * i + 1]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ops);
    Py_RETURN_NONE;
}


/* ---------------------------------------------------------------- socket I/O */

/* Bytes per gathered system call.  A send hashes each group right after the kernel copied it out, so a
 * group must still be in L2 then: with 4 MiB groups the hash read memory again (as much CPU as the copy). */
#ifndef IO_GROUP_BYTES
#define IO_GROUP_BYTES (512u << 10)
#endif
#define IO_MAX_IOV 64

typedef struct {
    const uint64_t *ops; /* (addr, len) pairs */
    size_t n;
    size_t idx;   /* current range */
    uint64_t off; /* bytes of it already done */
} cursor_t;

/* Advance the cursor by `bytes`, hashing them (if hashes) and writing each range's digest once its
 * last byte is in.  src NULL: the bytes are in place, in the ranges; else they are at src, back to back,
 * and are copied into the ranges as they are hashed (streaming stores: see recv_staged). */
static void hash_advance(cursor_t *c, XXH3_state_t *st, uint64_t *hashes, const uint8_t *src, uint64_t bytes) {
    for (;;) {
        while (c->idx < c->n && c->off == c->ops[2 * c->idx + 1]) {
            if (hashes) {
                hashes[c->idx] = XXH3_64bits_digest(st);
                XXH3_64bits_reset(st);
            }
            c->idx++;
            c->off = 0;
        }
        if (bytes == 0 || c->idx >= c->n) return;
        uint64_t left = c->ops[2 * c->idx + 1] - c->off;
        uint64_t take = bytes < left ? bytes : left;
        uint8_t *dst = (uint8_t *)(uintptr_t)c->ops[2 * c->idx] + c->off;
        if (hashes) XXH3_64bits_update(st, src ? src : dst, (size_t)take);
        if (src) {
#ifdef HAVE_STREAMING_STORES
            stream_copy(dst, src, take);
#else
            memcpy(dst, src, take);
#endif
            src += take;
        }
        c->off += take;
        bytes -= take;
    }
}

static void io_advance(cursor_t *c, uint64_t bytes) {
    while (c->idx < c->n) {
        uint64_t left = c->ops[2 * c->idx + 1] - c->off;
        if (bytes < left) {
            c->off += bytes;
            return;
        }
        bytes -= left;
        c->idx++;
        c->off = 0;
    }
}

/* iovecs for the next group at the cursor; returns the group's byte count (0: nothing left). */
static uint64_t io_group(const cursor_t *c, struct iovec *iov, int *count) {
    uint64_t group = 0;
    size_t i = c->idx;
    uint64_t off = c->off;
    int k = 0;
    while (i < c->n && k < IO_MAX_IOV && group < IO_GROUP_BYTES) {
        uint64_t left = c->ops[2 * i + 1] - off;
        if (left) {
            uint64_t take = left < IO_GROUP_BYTES - group ? left : IO_GROUP_BYTES - group;
            iov[k].iov_base = (void *)(uintptr_t)(c->ops[2 * i] + off);
            iov[k].iov_len = (size_t)take;
            k++;
            group += take;
            if (take < left) break;
        }
        i++;
        off = 0;
    }
    *count = k;
    return group;
}

static int wait_fd(int fd, short events, int timeout_ms) {
    struct pollfd p = {fd, events, 0};
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r > 0) return 0;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (errno != EINTR) return -1;
    }
}

/* After a send or recv that failed: 1 to try again (interrupted, or the socket became ready within
 * timeout_ms), 0 to give up with errno set (ETIMEDOUT when the wait ran out). */
static int io_retry(int fd, short events, int timeout_ms) {
    if (errno == EINTR) return 1;
    return (errno == EAGAIN || errno == EWOULDBLOCK) && wait_fd(fd, events, timeout_ms) == 0;
}

/* 0 on success; -1 with errno set; -2 when the peer closed the connection (recv). */
static int transfer(int fd, const uint64_t *ops, size_t n, uint64_t *hashes, int timeout_ms, int sending,
                    uint64_t *moved) {
    cursor_t io = {ops, n, 0, 0}, hc = {ops, n, 0, 0};
    XXH3_state_t st;
    uint64_t done = 0, hashed = 0;
    if (hashes) XXH3_64bits_reset(&st);
    for (;;) {
        struct iovec iov[IO_MAX_IOV];
        int count;
        uint64_t group = io_group(&io, iov, &count);
        if (group == 0) break;
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)count;
        ssize_t r = sending ? sendmsg(fd, &msg, MSG_NOSIGNAL) : recvmsg(fd, &msg, 0);
        if (r < 0) {
            if (io_retry(fd, sending ? POLLOUT : POLLIN, timeout_ms)) continue;
            *moved = done;
            return -1;
        }
        if (r == 0 && !sending) {
            *moved = done;
            return -2;
        }
        io_advance(&io, (uint64_t)r);
        done += (uint64_t)r;
        if (hashes) { /* hash what just went out or landed: the kernel's copy left it in cache */
            hash_advance(&hc, &st, hashes, NULL, done - hashed);
            hashed = done;
        }
    }
    if (hashes) hash_advance(&hc, &st, hashes, NULL, 0); /* digests of trailing empty ranges */
    *moved = done;
    return 0;
}

/* Receive through `stage` (a small buffer that stays in cache): each recv lands there, is hashed there
 * and is stream-copied into the ranges.  The kernel's copy into cold destination memory reads every
 * line before writing it; this way the destination is only written.  Same results as transfer(). */
static int recv_staged(int fd, const uint64_t *ops, size_t n, uint64_t *hashes, int timeout_ms, uint8_t *stage,
                       size_t stage_len, uint64_t *moved) {
    cursor_t c = {ops, n, 0, 0};
    XXH3_state_t st;
    uint64_t total = 0, done = 0;
    int rc = 0;
    for (size_t i = 0; i < n; i++) total += ops[2 * i + 1];
    if (hashes) XXH3_64bits_reset(&st);
    while (done < total) {
        size_t want = total - done < stage_len ? (size_t)(total - done) : stage_len;
        ssize_t r = recv(fd, stage, want, 0);
        if (r < 0) {
            if (io_retry(fd, POLLIN, timeout_ms)) continue;
            rc = -1;
            break;
        }
        if (r == 0) {
            rc = -2;
            break;
        }
        hash_advance(&c, &st, hashes, stage, (uint64_t)r);
        done += (uint64_t)r;
    }
    if (rc == 0) hash_advance(&c, &st, hashes, NULL, 0); /* digests of trailing empty ranges */
#ifdef HAVE_STREAMING_STORES
    _mm_sfence();
#endif
    *moved = done;
    return rc;
}

static PyObject *py_transfer(PyObject *args, PyObject *kwargs, int sending) {
    static char *kwlist[] = {"fd", "ops", "hashes", "timeout_ms", "staging", NULL};
    int fd, timeout_ms = -1;
    PyObject *ops_obj, *hashes_obj = Py_None, *stage_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iO|OiO", kwlist, &fd, &ops_obj, &hashes_obj, &timeout_ms,
                                     &stage_obj))
        return NULL;
    Py_buffer ops, hashes, stage = {0};
    size_t nops;
    uint64_t *hash_ptr;
    if (stage_obj != Py_None) {
        if (sending) {
            PyErr_SetString(PyExc_ValueError, "send takes no staging buffer");
            return NULL;
        }
        if (PyObject_GetBuffer(stage_obj, &stage, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) return NULL;
        if (stage.len <= 0) {
            PyBuffer_Release(&stage);
            PyErr_SetString(PyExc_ValueError, "the staging buffer is empty");
            return NULL;
        }
    }
    if (get_ops_and_hashes(ops_obj, hashes_obj, 2, &ops, &hashes, &nops, &hash_ptr) != 0) {
        if (stage.buf) PyBuffer_Release(&stage);
        return NULL;
    }
    int rc, err = 0;
    uint64_t moved = 0;
    Py_BEGIN_ALLOW_THREADS
    if (stage.buf)
        rc = recv_staged(fd, (const uint64_t *)ops.buf, nops, hash_ptr, timeout_ms, (uint8_t *)stage.buf,
                         (size_t)stage.len, &moved);
    else
        rc = transfer(fd, (const uint64_t *)ops.buf, nops, hash_ptr, timeout_ms, sending, &moved);
    err = errno;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ops);
    if (hash_ptr) PyBuffer_Release(&hashes);
    if (stage.buf) PyBuffer_Release(&stage);
    if (rc == -2) {
        PyErr_Format(PyExc_ConnectionError, "peer closed the connection after %llu payload bytes",
                     (unsigned long long)moved);
        return NULL;
    }
    if (rc != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError); /* maps errno to its subclass (TimeoutError, ...) */
    }
    return PyLong_FromUnsignedLongLong(moved);
}

static PyObject *py_send(PyObject *self, PyObject *args, PyObject *kwargs) { return py_transfer(args, kwargs, 1); }

static PyObject *py_recv(PyObject *self, PyObject *args, PyObject *kwargs) { return py_transfer(args, kwargs, 0); }

/* ---------------------------------------------------------------- control-plane helpers
 * Per-item loops that numpy can only express as many passes over small arrays: the page-key
 * chain of a put (client) and the probing of the master's key table.  Short and GIL-held.
 */

/* key_chain(root, tokens, page_size, out): key[i] = xxh3_128(key[i-1] + u32le(0) + tokens of
 * page i), key[-1] = root (keys.py, format v1, pages without context), written to out as the
 * canonical (big-endian) 16-byte digests python-xxhash's digest() returns. */
static PyObject *py_key_chain(PyObject *self, PyObject *args) {
    Py_buffer root, tokens, out;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "y*y*nw*", &root, &tokens, &page_size, &out)) return NULL;
    PyObject *result = NULL;
    size_t stride = (size_t)page_size * 4;
    size_t pages = page_size > 0 ? (size_t)tokens.len / stride : 0;
    unsigned char *msg = NULL;
    if (page_size <= 0 || root.len != 16 || (size_t)out.len < pages * 16) {
        PyErr_SetString(PyExc_ValueError, "key_chain: root must be 16 bytes, page_size > 0, out 16 bytes per page");
        goto done;
    }
    msg = PyMem_Malloc(20 + stride);
    if (!msg) {
        PyErr_NoMemory();
        goto done;
    }
    const unsigned char *tok = (const unsigned char *)tokens.buf;
    unsigned char *dst = (unsigned char *)out.buf;
    memcpy(msg, root.buf, 16);
    memset(msg + 16, 0, 4);
    for (size_t i = 0; i < pages; i++) {
        memcpy(msg + 20, tok + i * stride, stride);
        XXH128_canonical_t canon;
        XXH128_canonicalFromHash(&canon, XXH3_128bits(msg, 20 + stride));
        memcpy(dst + 16 * i, canon.digest, 16);
        memcpy(msg, canon.digest, 16);
    }
    result = PyLong_FromSize_t(pages);
done:
    PyMem_Free(msg);
    PyBuffer_Release(&root);
    PyBuffer_Release(&tokens);
    PyBuffer_Release(&out);
    return result;
}

/* Blocks of TOKEN_BLOCK tokens are converted by branch-free loops the compiler vectorises; only a
 * block with a token out of range is walked again to find the first one (~10x faster than a
 * per-token switch at 256K tokens). */
#define TOKEN_BLOCK 4096
#define TOKENS_LOOP(T, OUT_OF_RANGE)                                      \
    do {                                                                  \
        const T *s = (const T *)buf;                                      \
        for (Py_ssize_t b = 0; b < n; b += TOKEN_BLOCK) {                 \
            Py_ssize_t e = b + TOKEN_BLOCK < n ? b + TOKEN_BLOCK : n;     \
            int any = 0;                                                  \
            for (Py_ssize_t i = b; i < e; i++) {                          \
                T v = s[i];                                               \
                any |= (OUT_OF_RANGE);                                    \
                dst[i] = (int32_t)v;                                      \
            }                                                             \
            if (any)                                                      \
                for (Py_ssize_t i = b; i < e; i++) {                      \
                    T v = s[i];                                           \
                    (void)v;                                              \
                    if (OUT_OF_RANGE) return i;                           \
                }                                                         \
        }                                                                 \
        return -1;                                                        \
    } while (0)

/* Token ids of any integer width into int32 ``dst``; returns the first index outside [0, 2^31), or -1. */
static Py_ssize_t tokens_to_i32(const void *buf, Py_ssize_t n, int itemsize, int is_signed, int32_t *dst) {
    switch (itemsize * 2 + (is_signed != 0)) {
        case 2: TOKENS_LOOP(uint8_t, 0);
        case 3: TOKENS_LOOP(int8_t, v < 0);
        case 4: TOKENS_LOOP(uint16_t, 0);
        case 5: TOKENS_LOOP(int16_t, v < 0);
        case 8: TOKENS_LOOP(uint32_t, v > (uint32_t)INT32_MAX);
        case 9: TOKENS_LOOP(int32_t, v < 0);
        case 16: TOKENS_LOOP(uint64_t, v > (uint64_t)INT32_MAX);
        default: TOKENS_LOOP(int64_t, (uint64_t)v > (uint64_t)INT32_MAX);
    }
}

/* tokens_i32(src, itemsize, signed, out): token ids of any integer width into little-endian
 * int32 ``out`` in one pass, checking each lies in [0, 2^31).  Returns the index of the first
 * token out of range, or -1 when all are in range (keys.as_token_array). */
static PyObject *py_tokens_i32(PyObject *self, PyObject *args) {
    Py_buffer src, out;
    Py_ssize_t itemsize;
    int is_signed;
    if (!PyArg_ParseTuple(args, "y*npw*", &src, &itemsize, &is_signed, &out)) return NULL;
    PyObject *result = NULL;
    if ((itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) || src.len % itemsize ||
        out.len < (src.len / itemsize) * 4) {
        PyErr_SetString(PyExc_ValueError, "tokens_i32: itemsize 1, 2, 4 or 8 and out 4 bytes per token");
        goto done;
    }
    Py_ssize_t n = src.len / itemsize, bad = -1;
    int32_t *dst = (int32_t *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    bad = tokens_to_i32(src.buf, n, (int)itemsize, is_signed, dst);
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

/* table_find(slots, keys, words, home, out): open addressing with linear probing over ``slots``
 * (i32 row numbers, -1 empty, -2 deleted; power-of-two length); a row matches when its two u64
 * words in ``keys`` equal the searched ones.  out[i] = the row of words[i], or -1. */
static PyObject *py_table_find(PyObject *self, PyObject *args) {
    Py_buffer slots, keys, words, home, out;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*", &slots, &keys, &words, &home, &out)) return NULL;
    PyObject *result = NULL;
    size_t nslots = (size_t)slots.len / 4, nkeys = (size_t)keys.len / 16, n = (size_t)home.len / 8;
    if (nslots == 0 || (nslots & (nslots - 1)) || (size_t)words.len < n * 16 || (size_t)out.len < n * 8) {
        PyErr_SetString(PyExc_ValueError, "table_find: bad table shapes");
        goto done;
    }
    const int32_t *sl = (const int32_t *)slots.buf;
    const uint64_t *k = (const uint64_t *)keys.buf, *w = (const uint64_t *)words.buf;
    const int64_t *h = (const int64_t *)home.buf;
    int64_t *o = (int64_t *)out.buf;
    size_t mask = nslots - 1;
    for (size_t i = 0; i < n; i++) {
        size_t p = (size_t)h[i] & mask;
        int64_t found = -1;
        for (size_t step = 0; step < nslots; step++, p = (p + 1) & mask) {
            int32_t row = sl[p];
            if (row == -1) break;
            if (row >= 0 && (size_t)row < nkeys && k[2 * (size_t)row] == w[2 * i] && k[2 * (size_t)row + 1] == w[2 * i + 1]) {
                found = row;
                break;
            }
        }
        o[i] = found;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&slots);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&words);
    PyBuffer_Release(&home);
    PyBuffer_Release(&out);
    return result;
}

/* table_place(slots, rows, home): put each row (i64) at the first free (empty or deleted) slot
 * from its home position on; returns how many deleted slots were reused.  The caller keeps the
 * table under its load limit, so a free slot always exists. */
static PyObject *py_table_place(PyObject *self, PyObject *args) {
    Py_buffer slots, rows, home;
    if (!PyArg_ParseTuple(args, "w*y*y*", &slots, &rows, &home)) return NULL;
    PyObject *result = NULL;
    size_t nslots = (size_t)slots.len / 4, n = (size_t)home.len / 8;
    if (nslots == 0 || (nslots & (nslots - 1)) || (size_t)rows.len < n * 8) {
        PyErr_SetString(PyExc_ValueError, "table_place: bad table shapes");
        goto done;
    }
    int32_t *sl = (int32_t *)slots.buf;
    const int64_t *r = (const int64_t *)rows.buf, *h = (const int64_t *)home.buf;
    size_t mask = nslots - 1, reused = 0;
    for (size_t i = 0; i < n; i++) {
        size_t p = (size_t)h[i] & mask, step = 0;
        while (sl[p] >= 0 && step++ < nslots) p = (p + 1) & mask;
        if (sl[p] >= 0) {
            PyErr_SetString(PyExc_RuntimeError, "table_place: the table is full");
            goto done;
        }
        if (sl[p] == -2) reused++;
        sl[p] = (int32_t)r[i];
    }
    result = PyLong_FromSize_t(reused);
done:
    PyBuffer_Release(&slots);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&home);
    return result;
}

/* first_moved(table, units, expected): the first i where table[units[i]] != expected[i] (u32
 * generations; an index outside the table counts as moved), or -1.  The one-sided transports'
 * generation check before a write and after a read of a whole batch. */
static PyObject *py_first_moved(PyObject *self, PyObject *args) {
    Py_buffer table, units, expected;
    if (!PyArg_ParseTuple(args, "y*y*y*", &table, &units, &expected)) return NULL;
    PyObject *result = NULL;
    const Py_ssize_t size = table.len / 4, n = units.len / 8;
    if (expected.len < n * 4) {
        PyErr_SetString(PyExc_ValueError, "first_moved: expected needs a u32 per unit");
        goto done;
    }
    const uint32_t *gens = (const uint32_t *)table.buf, *want = (const uint32_t *)expected.buf;
    const int64_t *at = (const int64_t *)units.buf;
    Py_ssize_t moved = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (at[i] < 0 || at[i] >= size || gens[at[i]] != want[i]) {
            moved = i;
            break;
        }
    }
    result = PyLong_FromSsize_t(moved);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&units);
    PyBuffer_Release(&expected);
    return result;
}

/* tokens_digest(prefix, src, itemsize, signed, count): XXH3_128 (canonical bytes) of ``prefix``
 * followed by the first ``count`` tokens of ``src`` as int32 little-endian, every token checked to
 * lie in [0, 2^31) on the way.  Returns (first bad index or -1, digest).  The tokens are converted
 * in blocks that stay in L1: no int32 copy of the prompt is made (keys.sequence_digest). */
static PyObject *py_tokens_digest(PyObject *self, PyObject *args) {
    Py_buffer prefix, src;
    Py_ssize_t itemsize, count;
    int is_signed;
    if (!PyArg_ParseTuple(args, "y*y*npn", &prefix, &src, &itemsize, &is_signed, &count)) return NULL;
    PyObject *result = NULL;
    if ((itemsize != 1 && itemsize != 2 && itemsize != 4 && itemsize != 8) || src.len % itemsize || count < 0 ||
        count > src.len / itemsize) {
        PyErr_SetString(PyExc_ValueError, "tokens_digest: itemsize 1, 2, 4 or 8 and count within the tokens");
        goto done;
    }
    const Py_ssize_t n = src.len / itemsize;
    Py_ssize_t bad = -1;
    XXH3_state_t state;
    XXH3_128bits_reset(&state);
    XXH3_128bits_update(&state, prefix.buf, (size_t)prefix.len);
    int32_t block[TOKEN_BLOCK];
    for (Py_ssize_t b = 0; b < n && bad < 0; b += TOKEN_BLOCK) {
        const Py_ssize_t e = b + TOKEN_BLOCK < n ? b + TOKEN_BLOCK : n;
        bad = tokens_to_i32((const char *)src.buf + b * itemsize, e - b, (int)itemsize, is_signed, block);
        if (bad >= 0) bad += b;
        else if (b < count) XXH3_128bits_update(&state, block, (size_t)((e < count ? e : count) - b) * 4);
    }
    XXH128_canonical_t canonical;
    XXH128_canonicalFromHash(&canonical, XXH3_128bits_digest(&state));
    result = Py_BuildValue("ny#", bad, (const char *)canonical.digest, (Py_ssize_t)sizeof(canonical.digest));
done:
    PyBuffer_Release(&prefix);
    PyBuffer_Release(&src);
    return result;
}

static PyMethodDef methods[] = {
    {"tokens_digest", py_tokens_digest, METH_VARARGS,
     "tokens_digest(prefix, src, itemsize, signed, count): (first bad token index or -1, XXH3_128 of prefix + the "
     "first count tokens as int32 le)."},
    {"first_moved", py_first_moved, METH_VARARGS,
     "first_moved(table, units, expected): first i with table[units[i]] != expected[i] (u32), or -1."},
    {"copy", (PyCFunction)(void (*)(void))py_copy, METH_VARARGS | METH_KEYWORDS,
     "copy(ops, hashes=None, threads=1): ops is packed u64 (dst, src, len) triples; "
     "hashes, if given, receives xxh3_64 of each copied range."},
    {"hash", (PyCFunction)(void (*)(void))py_hash, METH_VARARGS | METH_KEYWORDS,
     "hash(ops, hashes, threads=1): ops is packed u64 (addr, len) pairs; writes xxh3_64 of each range."},
    {"fill", py_fill, METH_VARARGS, "fill(ops, byte): memset each (addr, len) range."},
    {"send", (PyCFunction)(void (*)(void))py_send, METH_VARARGS | METH_KEYWORDS,
     "send(fd, ops, hashes=None, timeout_ms=-1): send each (addr, len) range in order; hashes, if given, "
     "receives xxh3_64 of each range.  Returns the bytes sent."},
    {"recv", (PyCFunction)(void (*)(void))py_recv, METH_VARARGS | METH_KEYWORDS,
     "recv(fd, ops, hashes=None, timeout_ms=-1, staging=None): fill each (addr, len) range in order from the "
     "socket; hashes, if given, receives xxh3_64 of each range; staging, a writable buffer, receives each "
     "system call's bytes first, which are then stream-copied out.  Returns the bytes received."},
    {"key_chain", py_key_chain, METH_VARARGS,
     "key_chain(root, tokens, page_size, out): page keys v1 (no page context) into out, 16 bytes each; "
     "returns the number of pages."},
    {"tokens_i32", py_tokens_i32, METH_VARARGS,
     "tokens_i32(src, itemsize, signed, out): integer tokens into int32 out, checked to lie in [0, 2^31); "
     "returns the first bad index or -1."},
    {"table_find", py_table_find, METH_VARARGS,
     "table_find(slots, keys, words, home, out): linear-probing lookup of [n, 2] u64 words; out[i] = row or -1."},
    {"table_place", py_table_place, METH_VARARGS,
     "table_place(slots, rows, home): insert rows by linear probing; returns deleted slots reused."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "kvstore batched copy engine", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
