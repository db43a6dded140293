/*
 * kvstore._native: the batched copy engine.
 *
 * Python hands over one packed table of operations per call (never one call
 * per segment); the GIL is released for the whole batch, and large batches
 * are split across a few threads.  Checksums (xxh3_64) are computed inside the
 * copy: each chunk is hashed right after it lands, while it is still in cache,
 * so the bytes are walked once from memory.
 *
 * Primitives:
 *   copy(ops, hashes=None, threads=1)   ops: u64 triples (dst, src, len)
 *   hash(ops, hashes, threads=1)        ops: u64 pairs (addr, len)
 *   fill(ops, byte)                     ops: u64 pairs (addr, len); used to pre-fault pools
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

/* Chunk hashed right after it is copied: small enough to still be in L2. */
#define CHUNK_BYTES (256u * 1024u)
#define MAX_THREADS 16
/* Below this many bytes per batch, threads cost more than they save. */
#define MIN_BYTES_PER_THREAD (8u << 20)

typedef struct {
    const uint64_t *ops;
    size_t stride;      /* u64 words per op: 3 for copy, 2 for hash */
    size_t begin, end;  /* op range of this worker */
    uint64_t *hashes;   /* may be NULL for copy */
    int do_copy;
} work_t;

static uint64_t copy_and_hash(uint8_t *dst, const uint8_t *src, uint64_t len, int want_hash) {
    if (!want_hash) {
        memcpy(dst, src, len);
        return 0;
    }
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    uint64_t done = 0;
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
    for (size_t i = w->begin; i < w->end; i++) {
        const uint64_t *op = w->ops + i * w->stride;
        if (w->do_copy) {
            uint64_t h = copy_and_hash((uint8_t *)(uintptr_t)op[0], (const uint8_t *)(uintptr_t)op[1], op[2],
                                       w->hashes != NULL);
            if (w->hashes) w->hashes[i] = h;
        } else {
            w->hashes[i] = XXH3_64bits((const void *)(uintptr_t)op[0], (size_t)op[1]);
        }
    }
    return NULL;
}

/* Split ops into contiguous ranges of roughly equal bytes and run them. */
static int run_batch(const uint64_t *ops, size_t nops, size_t stride, size_t len_index, uint64_t *hashes,
                     int do_copy, int threads) {
    uint64_t total = 0;
    for (size_t i = 0; i < nops; i++) total += ops[i * stride + len_index];
    int nthreads = threads;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if ((uint64_t)nthreads > total / MIN_BYTES_PER_THREAD) nthreads = (int)(total / MIN_BYTES_PER_THREAD);
    if ((size_t)nthreads > nops) nthreads = (int)nops;
    if (nthreads <= 1) {
        work_t w = {ops, stride, 0, nops, hashes, do_copy};
        run_work(&w);
        return 0;
    }
    work_t work[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    uint64_t share = total / (uint64_t)nthreads, acc = 0;
    size_t start = 0;
    int t = 0;
    for (size_t i = 0; i < nops && t < nthreads - 1; i++) {
        acc += ops[i * stride + len_index];
        if (acc >= share * (uint64_t)(t + 1)) {
            work[t] = (work_t){ops, stride, start, i + 1, hashes, do_copy};
            start = i + 1;
            t++;
        }
    }
    work[t] = (work_t){ops, stride, start, nops, hashes, do_copy};
    int launched = 0;
    for (int k = 1; k <= t; k++) {
        if (pthread_create(&tids[k], NULL, run_work, &work[k]) != 0) break;
        launched = k;
    }
    run_work(&work[0]);
    for (int k = 1; k <= launched; k++) pthread_join(tids[k], NULL);
    for (int k = launched + 1; k <= t; k++) run_work(&work[k]); /* thread creation failed: do it here */
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

static PyObject *py_copy(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"ops", "hashes", "threads", NULL};
    PyObject *ops_obj, *hashes_obj = Py_None;
    int threads = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|Oi", kwlist, &ops_obj, &hashes_obj, &threads)) return NULL;
    Py_buffer ops, hashes;
    size_t nops;
    if (get_ops(ops_obj, &ops, 3, &nops) != 0) return NULL;
    uint64_t *hash_ptr = NULL;
    if (hashes_obj != Py_None) {
        if (get_hashes(hashes_obj, &hashes, nops) != 0) {
            PyBuffer_Release(&ops);
            return NULL;
        }
        hash_ptr = (uint64_t *)hashes.buf;
    }
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

static PyMethodDef methods[] = {
    {"copy", (PyCFunction)(void (*)(void))py_copy, METH_VARARGS | METH_KEYWORDS,
     "copy(ops, hashes=None, threads=1): ops is packed u64 (dst, src, len) triples; "
     "hashes, if given, receives xxh3_64 of each copied range."},
    {"hash", (PyCFunction)(void (*)(void))py_hash, METH_VARARGS | METH_KEYWORDS,
     "hash(ops, hashes, threads=1): ops is packed u64 (addr, len) pairs; writes xxh3_64 of each range."},
    {"fill", py_fill, METH_VARARGS, "fill(ops, byte): memset each (addr, len) range."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "kvstore batched copy engine", -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
