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

// ---------------------------------------------------------------------------------------------
// XXH3_64bits (seed 0, default secret) of many ranges, bit-identical to xxhash.h's, so that a
// GPU writer's checksums are computed where its bytes are (HBM) instead of on the host.
//
// Ranges up to 240 bytes take xxhash's short paths on one thread.  Longer ranges: XXH3's
// accumulation is a sum per lane over each 1 KiB block (16 stripes of 64 bytes) followed by a
// non-linear scramble, so the block sums are computed in parallel by a team of threads and
// eight of them then chain the sums in order through the scrambles.

#define XXH_BLOCK_THREADS 256

__constant__ unsigned char kvs_xxh3_secret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

#define XXH_P32_1 0x9E3779B1ULL
#define XXH_P32_2 0x85EBCA77ULL
#define XXH_P32_3 0xC2B2AE3DULL
#define XXH_P64_1 0x9E3779B185EBCA87ULL
#define XXH_P64_2 0xC2B2AE3D27D4EB4FULL
#define XXH_P64_3 0x165667B19E3779F9ULL
#define XXH_P64_4 0x85EBCA77C2B2AE63ULL
#define XXH_P64_5 0x27D4EB2F165667C5ULL

__device__ __forceinline__ u64 xxh_read64(const unsigned char* p) {
    if (((u64)p & 7) == 0) return *(const u64*)p;
    u64 v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

__device__ __forceinline__ unsigned int xxh_read32(const unsigned char* p) {
    return (unsigned int)p[0] | ((unsigned int)p[1] << 8) | ((unsigned int)p[2] << 16) |
           ((unsigned int)p[3] << 24);
}

__device__ __forceinline__ u64 xxh_secret64(int offset) {
    u64 v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | kvs_xxh3_secret[offset + i];
    return v;
}

__device__ __forceinline__ u64 xxh_fold64(u64 a, u64 b) { return (a * b) ^ __umul64hi(a, b); }

__device__ __forceinline__ u64 xxh_rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

__device__ __forceinline__ u64 xxh3_avalanche(u64 h) {
    h ^= h >> 37;
    h *= 0x165667919E3779F9ULL;
    return h ^ (h >> 32);
}

__device__ __forceinline__ u64 xxh64_avalanche(u64 h) {
    h ^= h >> 33;
    h *= XXH_P64_2;
    h ^= h >> 29;
    h *= XXH_P64_3;
    return h ^ (h >> 32);
}

__device__ __forceinline__ u64 xxh3_mix16(const unsigned char* p, int secret) {
    return xxh_fold64(xxh_read64(p) ^ xxh_secret64(secret), xxh_read64(p + 8) ^ xxh_secret64(secret + 8));
}

__device__ u64 xxh3_short(const unsigned char* p, u64 len) {
    if (len > 128) {
        u64 acc = len * XXH_P64_1;
        const int rounds = (int)len / 16;
        for (int i = 0; i < 8; i++) acc += xxh3_mix16(p + 16 * i, 16 * i);
        acc = xxh3_avalanche(acc);
        for (int i = 8; i < rounds; i++) acc += xxh3_mix16(p + 16 * i, 16 * (i - 8) + 3);
        acc += xxh3_mix16(p + len - 16, 136 - 17);
        return xxh3_avalanche(acc);
    }
    if (len > 16) {
        u64 acc = len * XXH_P64_1;
        if (len > 32) {
            if (len > 64) {
                if (len > 96) {
                    acc += xxh3_mix16(p + 48, 96);
                    acc += xxh3_mix16(p + len - 64, 112);
                }
                acc += xxh3_mix16(p + 32, 64);
                acc += xxh3_mix16(p + len - 48, 80);
            }
            acc += xxh3_mix16(p + 16, 32);
            acc += xxh3_mix16(p + len - 32, 48);
        }
        acc += xxh3_mix16(p, 0);
        acc += xxh3_mix16(p + len - 16, 16);
        return xxh3_avalanche(acc);
    }
    if (len > 8) {
        const u64 lo = xxh_read64(p) ^ (xxh_secret64(24) ^ xxh_secret64(32));
        const u64 hi = xxh_read64(p + len - 8) ^ (xxh_secret64(40) ^ xxh_secret64(48));
        const u64 swapped = ((u64)__byte_perm((unsigned int)lo, 0, 0x0123) << 32) |
                            __byte_perm((unsigned int)(lo >> 32), 0, 0x0123);  // XXH_swap64(lo)
        return xxh3_avalanche(len + swapped + hi + xxh_fold64(lo, hi));
    }
    if (len >= 4) {
        const u64 in1 = xxh_read32(p), in2 = xxh_read32(p + len - 4);
        const u64 bitflip = xxh_secret64(8) ^ xxh_secret64(16);
        u64 h = (in2 + (in1 << 32)) ^ bitflip;
        h ^= xxh_rotl64(h, 49) ^ xxh_rotl64(h, 24);
        h *= 0x9FB21C651E98DF25ULL;
        h ^= (h >> 35) + len;
        h *= 0x9FB21C651E98DF25ULL;
        return h ^ (h >> 28);
    }
    if (len > 0) {
        const unsigned int c1 = p[0], c2 = p[len >> 1], c3 = p[len - 1];
        const unsigned int combined = (c1 << 16) | (c2 << 24) | c3 | ((unsigned int)len << 8);
        const u64 bitflip = (xxh_secret64(0) ^ (xxh_secret64(0) >> 32)) & 0xffffffffULL;  // LE32(secret) ^ LE32(secret + 4)
        return xxh64_avalanche((u64)combined ^ bitflip);
    }
    return xxh64_avalanche(xxh_secret64(56) ^ xxh_secret64(64));
}

template <int TEAM>
__device__ __forceinline__ void xxh_team_sync() {
    if (TEAM == 32) __syncwarp(); else __syncthreads();
}

// One range hashed by a team of TEAM threads (a warp, or the whole block): thread r of the
// team sums lane r % 8 of block r / 8 of each round of TEAM / 8 blocks, then the team's
// first eight threads chain the sums through the scrambles.
template <int TEAM>
__device__ void xxh3_long(const unsigned char* p, u64 len, int r, const u64* keys, const u64* last_keys,
                          u64 (*sums)[8], u64* accs, u64* out) {
    const int lane = r & 7, group = r >> 3;
    const u64 full_blocks = (len - 1) / 1024;
    const int tail_stripes = (int)(((len - 1) - 1024 * full_blocks) / 64);
    u64 acc = 0;
    if (r < 8) {
        const u64 init[8] = {XXH_P32_3, XXH_P64_1, XXH_P64_2, XXH_P64_3, XXH_P64_4, XXH_P32_2, XXH_P64_5, XXH_P32_1};
        acc = init[r];
    }
    const bool aligned = ((u64)p & 7) == 0;
    for (u64 first = 0; first <= full_blocks; first += TEAM / 8) {
        const u64 block = first + group;  // block == full_blocks: the partial block
        const int stripes = block < full_blocks ? 16 : (block == full_blocks ? tail_stripes : 0);
        u64 sum = 0;
        const unsigned char* base = p + block * 1024 + 8 * lane;
#pragma unroll
        for (int s = 0; s < 16; s++) {
            u64 v = 0;
            if (s < stripes) v = aligned ? *(const u64*)(base + 64 * s) : xxh_read64(base + 64 * s);
            // lane l adds its neighbour's (l ^ 1) word, as XXH3's swap of adjacent lanes does
            const u64 neighbour = __shfl_xor_sync(0xffffffffu, v, 1);
            if (s < stripes) {
                const u64 key = v ^ keys[s + lane];
                sum += neighbour + (key & 0xffffffffULL) * (key >> 32);
            }
        }
        sums[group][lane] = sum;
        xxh_team_sync<TEAM>();
        if (r < 8) {
            for (int g = 0; g < TEAM / 8; g++) {
                const u64 b = first + g;
                if (b > full_blocks) break;
                acc += sums[g][r];
                if (b < full_blocks) {  // a scramble follows every full block
                    acc ^= acc >> 47;
                    acc ^= keys[16 + r];
                    acc *= XXH_P32_1;
                }
            }
        }
        xxh_team_sync<TEAM>();
    }
    if (r < 8) {
        const unsigned char* last = p + len - 64;
        const u64 v = xxh_read64(last + 8 * r);
        const u64 key = v ^ last_keys[r];
        acc += xxh_read64(last + 8 * (r ^ 1)) + (key & 0xffffffffULL) * (key >> 32);
        accs[r] = acc;
    }
    xxh_team_sync<TEAM>();
    if (r == 0) {
        u64 h = len * XXH_P64_1;
        for (int i = 0; i < 4; i++)
            h += xxh_fold64(accs[2 * i] ^ xxh_secret64(11 + 16 * i), accs[2 * i + 1] ^ xxh_secret64(19 + 16 * i));
        *out = xxh3_avalanche(h);
    }
    xxh_team_sync<TEAM>();
}

// ops: n rows of (address, len); out[i]: XXH3_64bits of row i.  Teams of TEAM threads, one
// range per team at a time, grid-stride: TEAM = 32 (a warp per range) suits ranges of a few
// KiB, TEAM = 256 (the block) long ones.  Every team loops uniformly: its barriers are met.
template <int TEAM>
__device__ void xxh3_ranges(const u64* __restrict__ ops, long long n, u64* __restrict__ out) {
    __shared__ u64 keys[24];      // secret words at 8-byte steps: stripe s of lane l uses keys[s + l]
    __shared__ u64 last_keys[8];  // the last stripe's (secret + 121)
    __shared__ u64 sums[XXH_BLOCK_THREADS / 8][8];
    __shared__ u64 accs[XXH_BLOCK_THREADS / TEAM][8];
    const int t = threadIdx.x, team = t / TEAM, r = t % TEAM;
    if (t < 24) keys[t] = xxh_secret64(8 * t);
    if (t < 8) last_keys[t] = xxh_secret64(121 + 8 * t);
    __syncthreads();
    const long long teams = (long long)gridDim.x * (XXH_BLOCK_THREADS / TEAM);
    for (long long op = (long long)blockIdx.x * (XXH_BLOCK_THREADS / TEAM) + team; op < n; op += teams) {
        const unsigned char* p = (const unsigned char*)ops[2 * op];
        const u64 len = ops[2 * op + 1];
        if (len <= 240) {
            if (r == 0) out[op] = xxh3_short(p, len);
            continue;  // uniform across the team: no barrier is skipped by some of its threads only
        }
        xxh3_long<TEAM>(p, len, r, keys, last_keys, sums + team * (TEAM / 8), accs[team], out + op);
    }
}

extern "C" __global__ void __launch_bounds__(XXH_BLOCK_THREADS)
kvs_xxh3_64(const u64* __restrict__ ops, long long n, u64* __restrict__ out) {
    xxh3_ranges<XXH_BLOCK_THREADS>(ops, n, out);
}

extern "C" __global__ void __launch_bounds__(XXH_BLOCK_THREADS)
kvs_xxh3_64_warp(const u64* __restrict__ ops, long long n, u64* __restrict__ out) {
    xxh3_ranges<32>(ops, n, out);
}

// ---------------------------------------------------------------------------------------------
// Copy and hash in one pass: ops are n rows of (dst, src, len), the addresses dst_base + dst and
// src_base + src (a put session's table is kept on the device and reused for each layer and
// caller array: only the bases change), all multiples of 16 and len > 240; out[i] is
// XXH3_64bits of row i's bytes (as kvs_xxh3_64 computes it).  With ``gens`` (a region's u32
// generation table, mapped host memory), row i is copied only while gens[checks[2i]] equals
// checks[2i + 1]; a row whose slot moved is skipped, and out[n] (zeroed by the caller) counts them.
// The copy keeps the copy kernel's access pattern (contiguous 16-byte vectors across the
// block, four in flight per thread); the hash is summed from the same registers: thread t of
// a 4 KiB step holds the 16 bytes of stripe (t / 4) % 16, lanes 2 (t % 4) and 2 (t % 4) + 1,
// of XXH3 block t / 64 of the step.  Warp shuffles and shared memory add up each block's lane
// sums; eight threads then chain them through the scrambles, in block order.

#define XXH_FUSED_THREADS 256
#define XXH_FUSED_UNROLL 4  // steps of 4 KiB per round: 16 XXH3 blocks

extern "C" __global__ void __launch_bounds__(XXH_FUSED_THREADS)
kvs_copy_hash_segments(const u64* __restrict__ ops, long long n, u64* __restrict__ out, u64 dst_base,
                       u64 src_base, const long long* __restrict__ checks, const unsigned int* gens) {
    __shared__ u64 keys[24];
    __shared__ u64 last_keys[8];
    // [block of the round][half of the XXH3 block (a warp each)][lane]
    __shared__ u64 sums[XXH_FUSED_UNROLL * 4][2][8];
    __shared__ u64 accs[8];
    const int t = threadIdx.x;
    if (t < 24) keys[t] = xxh_secret64(8 * t);
    if (t < 8) last_keys[t] = xxh_secret64(121 + 8 * t);
    __syncthreads();
    __shared__ int moved;
    const int k = t & 3, stripe = (t >> 2) & 15, xblock = t >> 6, half = (t >> 5) & 1;
    for (long long op = blockIdx.x; op < n; op += gridDim.x) {
        if (gens != nullptr) {
            // the slot must still be at the generation the put was given, read from the region's
            // table (host memory, updated by the node) right before its bytes move
            if (t == 0) moved = ((volatile const unsigned int*)gens)[checks[2 * op]] != (unsigned int)checks[2 * op + 1];
            __syncthreads();
            const int skip = moved;
            __syncthreads();
            if (skip) {
                if (t == 0) {
                    out[op] = 0;
                    atomicAdd(out + n, 1ULL);
                }
                continue;
            }
        }
        vec16* dst = (vec16*)(dst_base + ops[3 * op]);
        const vec16* src = (const vec16*)(src_base + ops[3 * op + 1]);
        const u64 len = ops[3 * op + 2];
        const u64 full_blocks = (len - 1) / 1024;
        const u64 tail_stripes = ((len - 1) - 1024 * full_blocks) / 64;
        const u64 nvec = len >> 4;
        u64 acc = 0;
        if (t < 8) {
            const u64 init[8] = {XXH_P32_3, XXH_P64_1, XXH_P64_2, XXH_P64_3, XXH_P64_4, XXH_P32_2, XXH_P64_5, XXH_P32_1};
            acc = init[t];
        }
        for (u64 base = 0; base < nvec; base += XXH_FUSED_UNROLL * XXH_FUSED_THREADS) {
            vec16 v[XXH_FUSED_UNROLL];
#pragma unroll
            for (int j = 0; j < XXH_FUSED_UNROLL; j++) {
                const u64 i = base + j * XXH_FUSED_THREADS + t;
                if (i < nvec) v[j] = src[i];
                else v[j].lo = v[j].hi = 0;
            }
#pragma unroll
            for (int j = 0; j < XXH_FUSED_UNROLL; j++) {
                const u64 i = base + j * XXH_FUSED_THREADS + t;
                if (i < nvec) dst[i] = v[j];
            }
#pragma unroll
            for (int j = 0; j < XXH_FUSED_UNROLL; j++) {
                const u64 b = (base + j * XXH_FUSED_THREADS) / 64 + xblock;  // XXH3 block of this vector
                const bool counts = b < full_blocks || (b == full_blocks && (u64)stripe < tail_stripes);
                u64 even = 0, odd = 0;
                if (counts) {
                    const u64 ke = v[j].lo ^ keys[stripe + 2 * k], ko = v[j].hi ^ keys[stripe + 2 * k + 1];
                    even = v[j].hi + (ke & 0xffffffffULL) * (ke >> 32);
                    odd = v[j].lo + (ko & 0xffffffffULL) * (ko >> 32);
                }
                // the 8 stripes of this warp with the same k: lanes t, t^4, t^8, t^16
#pragma unroll
                for (int m = 4; m < 32; m <<= 1) {
                    even += __shfl_xor_sync(0xffffffffu, even, m);
                    odd += __shfl_xor_sync(0xffffffffu, odd, m);
                }
                if ((t & 31) < 4) {
                    sums[j * 4 + xblock][half][2 * k] = even;
                    sums[j * 4 + xblock][half][2 * k + 1] = odd;
                }
            }
            __syncthreads();
            if (t < 8) {
                for (int g = 0; g < XXH_FUSED_UNROLL * 4; g++) {
                    const u64 b = base / 64 + g;
                    if (b > full_blocks) break;
                    acc += sums[g][0][t] + sums[g][1][t];
                    if (b < full_blocks) {
                        acc ^= acc >> 47;
                        acc ^= keys[16 + t];
                        acc *= XXH_P32_1;
                    }
                }
            }
            __syncthreads();
        }
        if (t < 8) {
            const unsigned char* last = (const unsigned char*)src + len - 64;
            const u64 w = xxh_read64(last + 8 * t);
            const u64 key = w ^ last_keys[t];
            acc += xxh_read64(last + 8 * (t ^ 1)) + (key & 0xffffffffULL) * (key >> 32);
            accs[t] = acc;
        }
        __syncthreads();
        if (t == 0) {
            u64 h = len * XXH_P64_1;
            for (int i = 0; i < 4; i++)
                h += xxh_fold64(accs[2 * i] ^ xxh_secret64(11 + 16 * i), accs[2 * i + 1] ^ xxh_secret64(19 + 16 * i));
            out[op] = xxh3_avalanche(h);
        }
        __syncthreads();
    }
}
