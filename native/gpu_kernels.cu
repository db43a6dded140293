// GPU gather/scatter kernels of the kvstore data plane (kvstore/gpu/engine.py).
//
// Compiled at first use by CuPy's RawModule (NVRTC), once per device; the
// wheel ships this file inside the package (setup.py copies it to
// kvstore/gpu/).  Pointers are device pointers: device memory, or host memory
// registered with cudaHostRegister(portable|mapped) (a node's DRAM pool, a
// pinned staging buffer), so one launch moves every segment of a batch across
// PCIe without one cudaMemcpy per segment.
//
// Both kernels walk their op table grid-stride: block b takes ops b, b+grid,
// b+2*grid...; the threads of a block share one op.  16-byte vector loads when
// both sides and the length (or row pitch) are 16-byte aligned, bytes otherwise.
// Four loads are issued before their stores so that enough reads are in flight
// to cover PCIe latency when the source is host memory.

typedef unsigned long long u64;

struct __align__(16) vec16 {
    u64 lo, hi;
};

__device__ __forceinline__ void copy_span(char* dst, const char* src, u64 len) {
    u64 done = 0;
    if ((((u64)dst | (u64)src) & 15) == 0) {
        const u64 nvec = len >> 4;
        vec16* d = (vec16*)dst;
        const vec16* s = (const vec16*)src;
        const u64 step = blockDim.x;
        u64 t = threadIdx.x;
        for (; t + 3 * step < nvec; t += 4 * step) {
            vec16 a = s[t];
            vec16 b = s[t + step];
            vec16 c = s[t + 2 * step];
            vec16 e = s[t + 3 * step];
            d[t] = a;
            d[t + step] = b;
            d[t + 2 * step] = c;
            d[t + 3 * step] = e;
        }
        for (; t < nvec; t += step) d[t] = s[t];
        done = nvec << 4;
    }
    for (u64 i = done + threadIdx.x; i < len; i += blockDim.x) dst[i] = src[i];
}

// ops: n rows of (dst, src, len).  One launch moves a whole layer batch (or many layers).
extern "C" __global__ void kvs_copy_segments(const u64* __restrict__ ops, long long n) {
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const u64* op = ops + 3 * i;
        copy_span((char*)op[0], (const char*)op[1], op[2]);
    }
}

// ops: n rows of (dst, src, row_bytes, rows, dst_pitch, src_pitch): ``rows`` rows of
// ``row_bytes`` each, row r at dst + r * dst_pitch / src + r * src_pitch.  Converts an
// engine's paged pool (token-major: one row per token of one head) to the store's
// head-major segment and back in the same pass as the transfer.
extern "C" __global__ void kvs_copy_rows(const u64* __restrict__ ops, long long n) {
    for (long long i = blockIdx.x; i < n; i += gridDim.x) {
        const u64* op = ops + 6 * i;
        char* dst = (char*)op[0];
        const char* src = (const char*)op[1];
        const u64 row = op[2], rows = op[3], dpitch = op[4], spitch = op[5];
        if (rows == 1 || (row == dpitch && row == spitch)) {
            copy_span(dst, src, row * rows);
            continue;
        }
        const u64 step = blockDim.x;
        if ((((u64)dst | (u64)src | row | dpitch | spitch) & 15) == 0) {
            const u64 per_row = row >> 4, total = per_row * rows;
            const u64 dp = dpitch >> 4, sp = spitch >> 4;
            vec16* d = (vec16*)dst;
            const vec16* s = (const vec16*)src;
            u64 t = threadIdx.x;
            for (; t + 3 * step < total; t += 4 * step) {
                u64 r0 = t / per_row, r1 = (t + step) / per_row;
                u64 r2 = (t + 2 * step) / per_row, r3 = (t + 3 * step) / per_row;
                u64 c0 = t - r0 * per_row, c1 = t + step - r1 * per_row;
                u64 c2 = t + 2 * step - r2 * per_row, c3 = t + 3 * step - r3 * per_row;
                vec16 a = s[r0 * sp + c0];
                vec16 b = s[r1 * sp + c1];
                vec16 c = s[r2 * sp + c2];
                vec16 e = s[r3 * sp + c3];
                d[r0 * dp + c0] = a;
                d[r1 * dp + c1] = b;
                d[r2 * dp + c2] = c;
                d[r3 * dp + c3] = e;
            }
            for (; t < total; t += step) {
                u64 r = t / per_row, c = t - r * per_row;
                d[r * dp + c] = s[r * sp + c];
            }
        } else {
            const u64 total = row * rows;
            for (u64 t = threadIdx.x; t < total; t += step) {
                u64 r = t / row, c = t - r * row;
                dst[r * dpitch + c] = src[r * spitch + c];
            }
        }
    }
}
