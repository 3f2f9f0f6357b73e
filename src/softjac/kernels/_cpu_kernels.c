/* softjac CPU kernels: the softmax VJP  J v = p * (v - <p, v>)  with J = diag(p) - p p^T,
 * from probabilities or from logits, and the fused cross-entropy forward/backward.
 *
 * Plain C (no Python headers), compiled at first use by softjac/kernels/_cbuild.py with
 * `cc -O3 -march=native -fopenmp -shared -fPIC` and loaded with ctypes.
 *
 * One row at a time, rows split across OpenMP threads.  Per row (K entries):
 *   pass 1 (the only read from DRAM):  s = sum_j p_j v_j,  m = max_j p_j,  i* = first argmax
 *   pass 2 (from cache, L2 or for very long rows L3):  out_j = p_j (v_j - s)  and
 *     t = sum_{j != i*} p_j (v_{i*} - v_j);  then  out_{i*} = p_{i*} t  (no cancellation,
 *     the same formula as softjac._core.vjp_last).
 * The _logits variants recompute p_j = exp(z_j - lse) on the fly (σ is never stored).
 * Accumulation is float for float/half/bfloat16 data, double for double data.
 * Rows with every p_j = 0 (masked) give zeros because every output is a multiple of p_j.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* The builder compiles this file as two units at once (-DSOFTJAC_PART=1 and 2, linked into
 * one library) to halve the first-use build time on two cores; each unit instantiates its
 * half of the exported kernels and the compiler drops the helpers it does not use.  Without
 * SOFTJAC_PART, one unit has everything. */
#ifndef SOFTJAC_PART
#define SOFTJAC_PART 0
#endif
#define SJ_PART(p) (SOFTJAC_PART == 0 || SOFTJAC_PART == (p))

/* Fresh outputs of tens of MB come straight from mmap, and on a VM the 4 KiB page faults
 * (with the kernel zeroing each page) cost more than the kernel itself.  Asking for
 * transparent huge pages on the 2 MiB-aligned interior of a large output, before the first
 * write, cuts the number of faults by 512.  A no-op where THP is off or unsupported. */
static void advise_huge(void *ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (nbytes < (int64_t)(4 * huge)) return;
    uintptr_t a = ((uintptr_t)ptr + huge - 1) & ~(huge - 1);
    uintptr_t b = ((uintptr_t)ptr + (uintptr_t)nbytes) & ~(huge - 1);
    if (b > a) madvise((void *)a, b - a, MADV_HUGEPAGE);
#else
    (void)ptr;
    (void)nbytes;
#endif
}

typedef uint16_t bf16_t;
typedef uint16_t f16_t;

static inline float bf16_load(const bf16_t *x) {
    uint32_t b = ((uint32_t)(*x)) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline void bf16_store(bf16_t *x, float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) { /* NaN: keep it a quiet NaN */
        *x = (bf16_t)((b >> 16) | 0x0040u);
        return;
    }
    b += 0x7fffu + ((b >> 16) & 1u); /* round to nearest, ties to even */
    *x = (bf16_t)(b >> 16);
}

static inline float f16_load(const f16_t *x) {
    _Float16 h;
    memcpy(&h, x, 2);
    return (float)h;
}

static inline void f16_store(f16_t *x, float f) {
    _Float16 h = (_Float16)f;
    memcpy(x, &h, 2);
}

/* exp(x) for float, vectorisable (no libm call): x = n ln2 + r with |r| <= ln2/2, exp(r) by
 * its degree-7 Taylor polynomial (truncation error < 3e-9 relative, below float rounding),
 * 2^n put into the exponent bits.  Results below 2^-126 (x < -87.33, including x = -inf) are
 * flushed to 0: such a probability contributes less than 1.2e-38 to any entry. */
/* exp(xc - n ln2) for the n = rint(xc log2 e) of the caller: the two-part (Cody-Waite)
 * reduction and the polynomial, shared by exp_f32 and exp_full_f32. */
static inline float exp_reduced_f32(float xc, float n) {
    float r = __builtin_fmaf(n, -0.693145751953125f, xc);
    r = __builtin_fmaf(n, -1.428606765330187045e-06f, r);
    float q = 1.0f / 5040.0f;
    q = __builtin_fmaf(q, r, 1.0f / 720.0f);
    q = __builtin_fmaf(q, r, 1.0f / 120.0f);
    q = __builtin_fmaf(q, r, 1.0f / 24.0f);
    q = __builtin_fmaf(q, r, 1.0f / 6.0f);
    q = __builtin_fmaf(q, r, 0.5f);
    q = __builtin_fmaf(q, r, 1.0f);
    return __builtin_fmaf(q, r, 1.0f);
}

static inline float exp_f32(float x) {
    const float lo = -87.33f;
    const float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    const float q = exp_reduced_f32(xc, n);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < lo ? 0.0f : q * scale;
}

static inline double exp_f64(double x) { return __builtin_exp(x); }

/* One row of J v.  PROB(j, LOAD, EXP) gives p_j: the stored probability, or exp(z_j - lse) recomputed
 * (twice: in both passes, which is cheaper than a scratch row for the SIMD exp above).
 *   pass 1 (the only read from DRAM): s = <p, v> and m = max p, remembering the first block
 *     whose maximum is m; i* is then found inside that block;
 *   pass 2 (from cache): out_j = p_j (v_j - s) and t = sum_j p_j (v* - v_j), whose i* term
 *     is exactly 0; finally out_{i*} = m t.
 * Sums are blocked: SIMD partial sums over BLK entries, the blocks added in double. */
#define BLK 512

#define VJP_ROW_BODY(T, ACC, LOAD, STORE, EXP, PROB)                                                     \
    double s_acc = 0;                                                                             \
    ACC m = 0;                                                                                    \
    int64_t mblock = -1;                                                                          \
    for (int64_t b = 0; b < k; b += BLK) {                                                        \
        const int64_t e = b + BLK < k ? b + BLK : k;                                              \
        ACC sb = 0, mb = 0;                                                                       \
        _Pragma("omp simd reduction(+ : sb) reduction(max : mb)")                                \
        for (int64_t j = b; j < e; ++j) {                                                         \
            const ACC pj = PROB(j, LOAD, EXP), vj = LOAD(v + j);                                             \
            sb += pj * vj;                                                                        \
            mb = pj > mb ? pj : mb;                                                               \
        }                                                                                         \
        s_acc += (double)sb;                                                                      \
        if (mb > m) {                                                                             \
            m = mb;                                                                               \
            mblock = b;                                                                           \
        }                                                                                         \
    }                                                                                             \
    const ACC s = (ACC)s_acc;                                                                     \
    int64_t istar = -1;                                                                           \
    if (mblock >= 0) {                                                                            \
        const int64_t e = mblock + BLK < k ? mblock + BLK : k;                                    \
        int64_t j = mblock;                                                                       \
        for (; j + 16 <= e; j += 16) {                                                            \
            int hit = 0;                                                                          \
            _Pragma("omp simd reduction(| : hit)")                                               \
            for (int l = 0; l < 16; ++l) hit |= PROB(j + l, LOAD, EXP) == m;                     \
            if (hit) break;                                                                       \
        }                                                                                         \
        for (; j < e; ++j) {                                                                      \
            if (PROB(j, LOAD, EXP) == m) {                                                        \
                istar = j;                                                                        \
                break;                                                                            \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    const ACC vs = istar >= 0 ? LOAD(v + istar) : (ACC)0;                                         \
    double t_acc = 0;                                                                             \
    for (int64_t b = 0; b < k; b += BLK) {                                                        \
        const int64_t e = b + BLK < k ? b + BLK : k;                                              \
        ACC tb = 0;                                                                               \
        _Pragma("omp simd reduction(+ : tb)")                                                    \
        for (int64_t j = b; j < e; ++j) {                                                         \
            const ACC pj = PROB(j, LOAD, EXP), vj = LOAD(v + j);                                             \
            STORE(out + j, pj * (vj - s));                                                        \
            tb += pj * (vs - vj);                                                                 \
        }                                                                                         \
        t_acc += (double)tb;                                                                      \
    }                                                                                             \
    if (istar >= 0) STORE(out + istar, m * (ACC)t_acc);

/* float32 probabilities (the common case) with GCC/clang vector types of 8 lanes (256-bit;
 * 16 lanes measured no faster on Ice Lake, and 8 are native on AVX2-only CPUs).  The generic
 * body above leaves gcc's `omp simd` reductions with lane arrays in memory, long prologues and
 * epilogues, an in-order lane-by-lane final sum (16 dependent additions) and a scalar argmax
 * search, which at K of a few hundred cost more than the loop itself.  Same passes, same
 * blocked sums (2 x 8 float lanes per BLK block, the blocks added in double), same i* and the
 * same formulas; only the order of the float additions inside a block differs. */
#if defined(__GNUC__) || defined(__clang__)
#define SOFTJAC_VEC 1
#define VL 8
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));

static inline vf vld(const float *x) {
    vf r;
    memcpy(&r, x, sizeof r);
    return r;
}

static inline void vst(float *x, vf r) { memcpy(x, &r, sizeof r); }

/* Horizontal reductions as a tree over halves (register shuffles where the compiler has
 * __builtin_shufflevector: gcc >= 12, clang; else through a lane array). */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SJ_SHUFFLE 1
#endif
#endif

static inline vf4 lo4(vf x) {
#ifdef SJ_SHUFFLE
    return __builtin_shufflevector(x, x, 0, 1, 2, 3);
#else
    vf4 r;
    memcpy(&r, &x, sizeof r);
    return r;
#endif
}

static inline vf4 hi4(vf x) {
#ifdef SJ_SHUFFLE
    return __builtin_shufflevector(x, x, 4, 5, 6, 7);
#else
    vf4 r;
    memcpy(&r, (const char *)&x + sizeof r, sizeof r);
    return r;
#endif
}

/* Horizontal reductions as shuffle trees (per row, they matter for short rows):
 * sum = (x0 + x4 + x2 + x6) + (x1 + x5 + x3 + x7) in that association. */
static inline float hsum(vf x) {
    const vf4 h = lo4(x) + hi4(x);
#ifdef SJ_SHUFFLE
    const vf4 g = h + __builtin_shufflevector(h, h, 2, 3, 0, 1);
    return g[0] + g[1]; /* (h0 + h2) + (h1 + h3) */
#else
    return (h[0] + h[2]) + (h[1] + h[3]);
#endif
}

static inline float max2(float a, float b) { return a > b ? a : b; }

static inline vf4 max4(vf4 a, vf4 b) { return (vf4)(((vi4)a & (a > b)) | ((vi4)b & ~(a > b))); }

static inline float hmax(vf x) {
    const vf4 h = max4(lo4(x), hi4(x));
#ifdef SJ_SHUFFLE
    const vf4 g = max4(h, __builtin_shufflevector(h, h, 2, 3, 0, 1));
    return max2(g[0], g[1]);
#else
    return max2(max2(h[0], h[2]), max2(h[1], h[3]));
#endif
}

static inline int32_t hmin_i(vi x) {
#ifdef SJ_SHUFFLE
    const vi4 a = __builtin_shufflevector(x, x, 0, 1, 2, 3);
    const vi4 b = __builtin_shufflevector(x, x, 4, 5, 6, 7);
    const vi4 lt = a < b, h = (a & lt) | (b & ~lt);
    const vi4 g = __builtin_shufflevector(h, h, 2, 3, 0, 1), lt2 = h < g;
    const vi4 f2 = (h & lt2) | (g & ~lt2);
    return f2[0] < f2[1] ? f2[0] : f2[1];
#else
    int32_t r = x[0];
    for (int l = 1; l < VL; ++l) r = x[l] < r ? x[l] : r;
    return r;
#endif
}

/* Rows of at least STREAM_MIN_K floats (512 KiB: more than half of L2, so the output line
 * would be evicted before it is read again anyway) write J v with non-temporal stores, which
 * skip reading the output lines into cache first, and prefetch pass 2's operands from L3;
 * measured 5-10 % faster there, and no faster or slower for shorter rows. */
#define STREAM_MIN_K ((int64_t)1 << 17)
#if defined(__AVX__)
#include <immintrin.h>
#define SJ_STREAM 1
static inline void vst_stream(float *x, vf r) { _mm256_stream_ps(x, (__m256)r); }
#else
static inline void vst_stream(float *x, vf r) { vst(x, r); }
#endif

/* Pass 1 also tracks, per lane, the first index of that lane's maximum (a strict > keeps the
 * first), so i* = the least such index among the lanes that hold m: no search.  Two
 * accumulators per sum break the FMA latency chain.  `stream`: the long-row variant above
 * (needs `out` 32-byte aligned). */
static inline __attribute__((always_inline)) void vjp_row_f32_body(const float *p, const float *v,
                                                                  float *out, int64_t k,
                                                                  const int stream) {
    const vf zero = {0};
    vi lane;
    for (int l = 0; l < VL; ++l) lane[l] = l;
    double s_acc = 0;
    vf mv0 = zero, mv1 = zero;
    vi iv0 = lane * 0 - 1, iv1 = iv0, jv = lane;
    int64_t j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        vf sv0 = zero, sv1 = zero;
        for (; j + 2 * VL <= e; j += 2 * VL) {
            /* one cache line of each stream 2 KiB ahead (into the next rows for short ones):
             * 10-20 % faster at K <= 1024 from L3 than the hardware prefetcher alone; a
             * prefetch never faults, so running past the end of the data is harmless */
            __builtin_prefetch(p + j + 512);
            __builtin_prefetch(v + j + 512);
            const vf p0 = vld(p + j), p1 = vld(p + j + VL);
            sv0 += p0 * vld(v + j);
            sv1 += p1 * vld(v + j + VL);
            const vi g0 = p0 > mv0, g1 = p1 > mv1;
            mv0 = (vf)(((vi)p0 & g0) | ((vi)mv0 & ~g0));
            mv1 = (vf)(((vi)p1 & g1) | ((vi)mv1 & ~g1));
            iv0 = (jv & g0) | (iv0 & ~g0);
            iv1 = ((jv + VL) & g1) | (iv1 & ~g1);
            jv += 2 * VL;
        }
        if (j + VL <= e) {
            const vf p0 = vld(p + j);
            sv0 += p0 * vld(v + j);
            const vi g0 = p0 > mv0;
            mv0 = (vf)(((vi)p0 & g0) | ((vi)mv0 & ~g0));
            iv0 = (jv & g0) | (iv0 & ~g0);
            jv += VL;
            j += VL;
        }
        float sb = hsum(sv0 + sv1);
        for (int64_t t = j; t < e; ++t) sb += p[t] * v[t];
        s_acc += (double)sb;
    }
    /* j is now the start of the scalar tail (only the last block has one: BLK % VL == 0) */
    const vi g = mv1 > mv0;
    float m = hmax((vf)(((vi)mv1 & g) | ((vi)mv0 & ~g)));
    int64_t istar = -1;
    if (m > 0) { /* the least index among the lanes (of both trackers) that hold m */
        const vi big = lane * 0 + 0x7fffffff, h0 = mv0 == (zero + m), h1 = mv1 == (zero + m);
        const vi c0 = (iv0 & h0) | (big & ~h0), c1 = (iv1 & h1) | (big & ~h1);
        const vi lt = c1 < c0;
        istar = hmin_i((c1 & lt) | (c0 & ~lt));
    }
    for (int64_t t = j; t < k; ++t) {
        if (p[t] > m) {
            m = p[t];
            istar = t;
        }
    }
    const float s = (float)s_acc;
    const float vs = istar >= 0 ? v[istar] : 0.0f;
    const vf ss = zero + s, vss = zero + vs;
    double t_acc = 0;
    j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        vf tv0 = zero, tv1 = zero;
        for (; j + 2 * VL <= e; j += 2 * VL) {
            if (stream) {
                __builtin_prefetch(p + j + 256);
                __builtin_prefetch(v + j + 256);
            }
            const vf p0 = vld(p + j), v0 = vld(v + j);
            const vf p1 = vld(p + j + VL), v1 = vld(v + j + VL);
            if (stream) {
                vst_stream(out + j, p0 * (v0 - ss));
                vst_stream(out + j + VL, p1 * (v1 - ss));
            } else {
                vst(out + j, p0 * (v0 - ss));
                vst(out + j + VL, p1 * (v1 - ss));
            }
            tv0 += p0 * (vss - v0);
            tv1 += p1 * (vss - v1);
        }
        if (j + VL <= e) {
            const vf p0 = vld(p + j), v0 = vld(v + j);
            vst(out + j, p0 * (v0 - ss));
            tv0 += p0 * (vss - v0);
            j += VL;
        }
        float tb = hsum(tv0 + tv1);
        for (; j < e; ++j) {
            out[j] = p[j] * (v[j] - s);
            tb += p[j] * (vs - v[j]);
        }
        t_acc += (double)tb;
    }
#ifdef SJ_STREAM
    if (stream) _mm_sfence(); /* the streamed stores land before the argmax entry's */
#endif
    if (istar >= 0) out[istar] = m * (float)t_acc;
}

/* Short rows (k <= 8 NV, NV = 1, 2, 4 or 8 vectors): the whole row in NV vectors, the partial ones
 * loaded and stored under lane masks, and none of the per-block bookkeeping above: one SIMD
 * block, so s = sum p v and t = sum p (v* - v) are single float sums (what the blocked code
 * gives for one block), m by a max tree and i* as the first lane equal to m (a compare and a
 * bit scan) instead of per-lane index tracking.  Measured with rows in L1 (1 thread): 10 ns
 * a row at k = 16, 16 at k = 32, 29 at k = 64, where the long-row code took 24, 27 and 34
 * (PyTorch's native backward: about 10, 16 and 30). */
#if defined(__AVX2__)
#define SJ_SHORT 1
static inline __attribute__((always_inline)) void vjp_row_f32_short(const float *p, const float *v,
                                                                   float *out, int64_t k,
                                                                   const int NV) {
    const vf zero = {0};
    vi lane;
    for (int l = 0; l < VL; ++l) lane[l] = l;
    /* vectors q < nfull are whole; the others are loaded and stored under the mask of their
     * lanes below k (possibly none) */
    const int nfull = (int)(k / VL), nv = (int)((k + VL - 1) / VL); /* nv <= NV */
    vi valid[8];
    vf pv[8], vv[8];
    for (int q = 0; q < NV; ++q) {
        valid[q] = lane < (lane * 0 + (int32_t)(k - (int64_t)q * VL));
        if (q < nfull) {
            pv[q] = vld(p + q * VL);
            vv[q] = vld(v + q * VL);
        } else if (q < nv) {
            pv[q] = (vf)_mm256_maskload_ps(p + q * VL, (__m256i)valid[q]);
            vv[q] = (vf)_mm256_maskload_ps(v + q * VL, (__m256i)valid[q]);
        } else { /* wholly past k: zeros, and pass 2 stops before them */
            pv[q] = zero;
            vv[q] = zero;
        }
    }
    vf acc = pv[0] * vv[0], mx = pv[0];
    for (int q = 1; q < NV; ++q) {
        acc += pv[q] * vv[q];
        const vi g = pv[q] > mx;
        mx = (vf)(((vi)pv[q] & g) | ((vi)mx & ~g));
    }
    const float s = hsum(acc);
    const float m = hmax(mx);
    int64_t istar = -1;
    if (m > 0) { /* bit q VL + l of `bits`: lane l of vector q equals m (no branch per vector) */
        const vf mm = zero + m;
        uint64_t bits = 0;
        for (int q = 0; q < NV; ++q)
            bits |= (uint64_t)(unsigned)_mm256_movemask_ps((__m256)(vf)(pv[q] == mm)) << (q * VL);
        istar = __builtin_ctzll(bits);
    }
    const float vs = istar >= 0 ? v[istar] : 0.0f;
    const vf ss = zero + s, vss = zero + vs;
    vf tv = zero;
    for (int q = 0; q < NV && q < nv; ++q) {
        const vf o = pv[q] * (vv[q] - ss);
        vf d = pv[q] * (vss - vv[q]);
        if (q < nfull) {
            vst(out + q * VL, o);
        } else {
            _mm256_maskstore_ps(out + q * VL, (__m256i)valid[q], (__m256)o);
            d = (vf)((vi)d & valid[q]); /* lanes past k add nothing, not even NaN */
        }
        tv += d;
    }
    if (istar >= 0) out[istar] = m * hsum(tv);
}
#endif

static void vjp_row_f32_vec(const float *p, const float *v, float *out, int64_t k) {
#ifdef SJ_SHORT
    if (k <= 8 * VL) {
        if (k <= VL)
            vjp_row_f32_short(p, v, out, k, 1);
        else if (k <= 2 * VL)
            vjp_row_f32_short(p, v, out, k, 2);
        else if (k <= 4 * VL)
            vjp_row_f32_short(p, v, out, k, 4);
        else
            vjp_row_f32_short(p, v, out, k, 8);
        return;
    }
#endif
    if (k >= STREAM_MIN_K && ((uintptr_t)out & 31) == 0)
        vjp_row_f32_body(p, v, out, k, 1);
    else
        vjp_row_f32_body(p, v, out, k, 0);
}

/* The cross-entropy rows are compute bound (one exp per element), so they use 16 lanes where
 * AVX-512 is available (about 1.5x the 8-lane speed there), else the 8 lanes above. */
#if defined(__AVX512F__)
#define CVL 16
typedef float cvf __attribute__((vector_size(4 * CVL)));
typedef int32_t cvi __attribute__((vector_size(4 * CVL)));

static inline cvf cvld(const float *x) {
    cvf r;
    memcpy(&r, x, sizeof r);
    return r;
}

static inline void cvst(float *x, cvf r) { memcpy(x, &r, sizeof r); }

static inline vf lo8(cvf x) {
#ifdef SJ_SHUFFLE
    return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
#else
    vf r;
    memcpy(&r, &x, sizeof r);
    return r;
#endif
}

static inline vf hi8(cvf x) {
#ifdef SJ_SHUFFLE
    return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf r;
    memcpy(&r, (const char *)&x + sizeof r, sizeof r);
    return r;
#endif
}

static inline float chsum(cvf x) { return hsum(lo8(x) + hi8(x)); }
static inline float chmax(cvf x) { return max2(hmax(lo8(x)), hmax(hi8(x))); }
#else
#define CVL VL
typedef vf cvf;
typedef vi cvi;
#define cvld vld
#define cvst vst
#define chsum hsum
#define chmax hmax
#endif

/* The first n < CVL lanes of x, the others `fill` (chosen so that they add nothing: -inf
 * before an exp or a max, 0 before a product), and the matching store of n lanes: masked
 * loads/stores where the ISA has them, so a short row or a row's last few entries stay in
 * vector code (a scalar exp per entry made K = 21 rows 1.5x slower than PyTorch). */
static inline cvf cvld_part(const float *x, int64_t n, float fill) {
#if CVL == 16 && defined(__AVX512F__)
    return (cvf)_mm512_mask_loadu_ps(_mm512_set1_ps(fill), (__mmask16)((1u << n) - 1u), x);
#elif CVL == 8 && defined(__AVX2__)
    vi lane;
    for (int l = 0; l < VL; ++l) lane[l] = l;
    const vi m = lane < (lane * 0 + (int32_t)n);
    const vf r = (vf)_mm256_maskload_ps(x, (__m256i)m);
    return (cvf)(((vi)r & m) | ((vi)((vf){0} + fill) & ~m));
#else
    float tmp[CVL];
    for (int l = 0; l < CVL; ++l) tmp[l] = l < n ? x[l] : fill;
    return cvld(tmp);
#endif
}

static inline void cvst_part(float *x, cvf v, int64_t n) {
#if CVL == 16 && defined(__AVX512F__)
    _mm512_mask_storeu_ps(x, (__mmask16)((1u << n) - 1u), (__m512)v);
#elif CVL == 8 && defined(__AVX2__)
    vi lane;
    for (int l = 0; l < VL; ++l) lane[l] = l;
    _mm256_maskstore_ps(x, (__m256i)(lane < (lane * 0 + (int32_t)n)), (__m256)v);
#else
    float tmp[CVL];
    cvst(tmp, v);
    memcpy(x, tmp, (size_t)n * sizeof(float));
#endif
}

static inline cvf cvmax(cvf a, cvf b) {
    const cvi g = a > b;
    return (cvf)(((cvi)a & g) | ((cvi)b & ~g));
}

/* Cross-entropy rows for float32 logits with the vector types above.  `omp simd` leaves gcc's
 * loops around exp_f32 with lane arrays in memory and long prologues/epilogues, which at K of
 * a few hundred cost more than the arithmetic.  vexp is exp_f32 lane by lane (same clamp, same
 * rounding of n: adding and subtracting 1.5 * 2^23 rounds to nearest even like rintf for
 * |x log2 e| < 2^22, the same FMA polynomial); n may differ by one from rintf's in a near-tie
 * where the product is fused into the rounding add, which leaves |r| a hair above ln2/2 and the
 * result as accurate.  Same passes and formulas; only the order of the float additions inside
 * a BLK block differs. */
/* exp_reduced_f32 lane by lane. */
static inline cvf vexp_reduced(cvf xc, cvf n) {
    cvf r = n * -0.693145751953125f + xc;
    r = n * -1.428606765330187045e-06f + r;
    cvf q = (cvf){0} + 1.0f / 5040.0f;
    q = q * r + 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    return q * r + 1.0f;
}

static inline cvf vexp(cvf x) {
    const cvf zero = {0};
    const cvf lo = zero - 87.33f, hi = zero + 88.0f, magic = zero + 12582912.0f;
    const cvi under = x < lo;
    cvf xc = (cvf)(((cvi)lo & under) | ((cvi)x & ~under));
    const cvi over = xc > hi;
    xc = (cvf)(((cvi)hi & over) | ((cvi)xc & ~over));
    const cvf n = (xc * 1.44269504088896341f + magic) - magic;
    const cvf q = vexp_reduced(xc, n);
    const cvi bits = (__builtin_convertvector(n, cvi) + 127) << 23;
    return (cvf)((cvi)(q * (cvf)bits) & ~under);
}

/* One forward row: lse (returned) and, through *loss_out, the row loss (formula at DEFINE_CE). */
static float ce_fwd_row_f32_vec(const float *zr, int64_t y, const float *w, float w_sum,
                                int64_t k, int64_t ignore_index, float eps, float *loss_out) {
    const float ninf = -__builtin_inff();
    const cvf zero = {0};
    cvf mv0 = zero + ninf, mv1 = zero + ninf;
    int64_t j = 0;
    for (; j + 2 * CVL <= k; j += 2 * CVL) {
        mv0 = cvmax(cvld(zr + j), mv0);
        mv1 = cvmax(cvld(zr + j + CVL), mv1);
    }
    for (; j + CVL <= k; j += CVL) mv0 = cvmax(cvld(zr + j), mv0);
    if (j < k) mv1 = cvmax(cvld_part(zr + j, k - j, ninf), mv1);
    const float m = max2(chmax(mv0), chmax(mv1));
    const float ms = m == ninf ? 0.0f : m;
    const cvf msv = zero + ms;
    double se = 0, swz = 0;
    j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        cvf s0 = zero, s1 = zero, w0 = zero, w1 = zero;
        for (; j + 2 * CVL <= e; j += 2 * CVL) {
            const cvf a = cvld(zr + j), c = cvld(zr + j + CVL);
            s0 += vexp(a - msv);
            s1 += vexp(c - msv);
            if (eps > 0) {
                w0 += w ? cvld(w + j) * a : a;
                w1 += w ? cvld(w + j + CVL) * c : c;
            }
        }
        for (; j < e; j += CVL) { /* at most one whole vector, then the masked rest */
            const int64_t n = e - j < CVL ? e - j : CVL;
            s1 += vexp((n == CVL ? cvld(zr + j) : cvld_part(zr + j, n, ninf)) - msv);
            if (eps > 0) {
                const cvf a = n == CVL ? cvld(zr + j) : cvld_part(zr + j, n, 0.0f);
                w1 += w ? (n == CVL ? cvld(w + j) : cvld_part(w + j, n, 0.0f)) * a : a;
            }
        }
        se += chsum(s0 + s1);
        swz += chsum(w0 + w1);
    }
    const float l = ms + (float)__builtin_log(se);
    if (y == ignore_index || y < 0 || y >= k) {
        *loss_out = 0.0f;
        return l;
    }
    const float wy = w ? w[y] : 1.0f;
    float li = (1.0f - eps) * wy * (l - zr[y]);
    if (eps > 0) li += (eps / (float)k) * (w_sum * l - (float)swz);
    *loss_out = li;
    return l;
}

/* One backward row of a valid target (formula at DEFINE_CE); `orow` may be `zr`. */
static void ce_bwd_row_f32_vec(const float *zr, float *orow, int64_t y, const float *w, float l,
                               float coef, float sm, float gy, int64_t k) {
    const cvf zero = {0}, lv = zero + l, cv = zero + coef, smv = zero + sm;
    const float zy = zr[y];
    int64_t j = 0;
    for (; j + 2 * CVL <= k; j += 2 * CVL) {
        const cvf a = vexp(cvld(zr + j) - lv), b = vexp(cvld(zr + j + CVL) - lv);
        cvst(orow + j, a * cv - (w ? smv * cvld(w + j) : smv));
        cvst(orow + j + CVL, b * cv - (w ? smv * cvld(w + j + CVL) : smv));
    }
    for (; j < k; j += CVL) { /* at most one whole vector, then the masked rest */
        const int64_t n = k - j < CVL ? k - j : CVL;
        const float ninf = -__builtin_inff();
        const cvf a = vexp((n == CVL ? cvld(zr + j) : cvld_part(zr + j, n, ninf)) - lv);
        const cvf ws = w ? smv * (n == CVL ? cvld(w + j) : cvld_part(w + j, n, 0.0f)) : smv;
        if (n == CVL)
            cvst(orow + j, a * cv - ws);
        else
            cvst_part(orow + j, a * cv - ws, n);
    }
    orow[y] = exp_f32(zy - l) * coef - sm * (w ? w[y] : 1.0f) - gy;
}
#endif

/* softjac_vjp_<dt>(p, v, out, n, k, row strides of p, v, out, threads) and
 * softjac_vjp_logits_<dt>(z, lse, v, out, n, k, strides of z, v, out, threads); lse is one
 * value per row (float, or double for double data). */
#define DEFINE_VJP(SUFFIX, T, ACC, LOAD, STORE, EXP)                                             \
    static void vjp_row_##SUFFIX(const T *p, const T *v, T *out, int64_t k) {                   \
        VJP_ROW_BODY(T, ACC, LOAD, STORE, EXP, PROB_STORED)                                            \
    }                                                                                             \
    static void vjp_logits_row_##SUFFIX(const T *z, ACC lse, const T *v, T *out, int64_t k) {   \
        VJP_ROW_BODY(T, ACC, LOAD, STORE, EXP, PROB_LOGITS)                                            \
    }                                                                                             \
    int softjac_vjp_##SUFFIX(const T *p, const T *v, T *out, int64_t n, int64_t k, int64_t sp,  \
                             int64_t sv, int64_t so, int nthreads) {                             \
        nthreads = clamp_threads(nthreads, n, k);                                                    \
        if (so == k) advise_huge(out, n * k * (int64_t)sizeof(T));                                \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t i = 0; i < n; ++i) VJP_ROW_FN(SUFFIX)(p + i * sp, v + i * sv, out + i * so, k); \
        return 0;                                                                                 \
    }                                                                                             \
    int softjac_vjp_logits_##SUFFIX(const T *z, const ACC *lse, const T *v, T *out, int64_t n,   \
                                    int64_t k, int64_t sz, int64_t sv, int64_t so,               \
                                    int nthreads) {                                               \
        nthreads = clamp_threads(nthreads, n, k);                                                    \
        if (so == k) advise_huge(out, n * k * (int64_t)sizeof(T));                                \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t i = 0; i < n; ++i)                                                           \
            vjp_logits_row_##SUFFIX(z + i * sz, lse[i], v + i * sv, out + i * so, k);             \
        return 0;                                                                                 \
    }

/* softjac_vjp_inner_<dt>(p, v, out, b, k, m, threads): the same J v for data laid out as
 * contiguous (b, k, m) with the class dim in the middle (softmax over dim != -1 of a
 * contiguous tensor, e.g. the channels of NCHW): row (i, c) is p[i, :, c], with stride m.
 * Instead of transposing (two extra copies), each task takes a tile of up to IT columns c and
 * sweeps j = 0..k-1, loading IT contiguous entries per j (SIMD across c); per column the same
 * two passes, blocked sums (float partials over BLK entries of j, added in double), first
 * argmax and argmax entry as the row kernels.  Tiles are as wide as possible (all m columns
 * up to IT, so that a tile is one contiguous block and the prefetchers see long streams) while
 * the k x tile block of p and v stays within 8 MiB (pass 2 then reads it from L3): measured
 * 1.3-2.6x native at (b, k, m) = (64, 1000, 256) ... (8, 64, 65536) with 2 threads, where
 * tiles sized for L2 (16-64 columns: short strided streams) were 1.1-1.6x and transposing
 * to rows and back 3-6x slower than the tiles. */
#define IT 256

static inline int64_t inner_tile(int64_t k, int64_t m, int64_t elem) {
    int64_t t = ((int64_t)1 << 23) / (2 * elem * (k > 0 ? k : 1)); /* 8 MiB of p and v */
    t = t < 16 ? 16 : (t > IT ? IT : t & ~(int64_t)15);
    return t < m ? t : m;
}

#define DEFINE_VJP_INNER(SUFFIX, T, ACC, LOAD, STORE)                                            \
    static void vjp_inner_tile_##SUFFIX(const T *p, const T *v, T *out, int64_t k, int64_t m,   \
                                        int64_t w) {                                             \
        double s_acc[IT], t_acc[IT];                                                              \
        ACC mx[IT], part[IT], vs[IT];                                                             \
        int32_t im[IT]; /* k < 2^31 (the caller checks) */                                        \
        for (int64_t c = 0; c < w; ++c) {                                                         \
            s_acc[c] = 0;                                                                         \
            t_acc[c] = 0;                                                                         \
            mx[c] = 0;                                                                            \
            im[c] = -1;                                                                           \
        }                                                                                         \
        for (int64_t b = 0; b < k; b += BLK) {                                                    \
            const int64_t e = b + BLK < k ? b + BLK : k;                                          \
            for (int64_t c = 0; c < w; ++c) part[c] = 0;                                          \
            for (int64_t j = b; j < e; ++j) {                                                     \
                const T *pj = p + j * m, *vj = v + j * m;                                         \
                _Pragma("omp simd")                                                               \
                for (int64_t c = 0; c < w; ++c) {                                                 \
                    const ACC pc = LOAD(pj + c);                                                  \
                    part[c] += pc * LOAD(vj + c);                                                 \
                    const int g = pc > mx[c];                                                     \
                    mx[c] = g ? pc : mx[c];                                                       \
                    im[c] = g ? (int32_t)j : im[c];                                               \
                }                                                                                 \
            }                                                                                     \
            for (int64_t c = 0; c < w; ++c) s_acc[c] += (double)part[c];                          \
        }                                                                                         \
        for (int64_t c = 0; c < w; ++c) {                                                         \
            vs[c] = im[c] >= 0 ? LOAD(v + (int64_t)im[c] * m + c) : (ACC)0;                       \
            part[c] = (ACC)s_acc[c]; /* now s per column */                                       \
        }                                                                                         \
        ACC tb[IT];                                                                               \
        for (int64_t b = 0; b < k; b += BLK) {                                                    \
            const int64_t e = b + BLK < k ? b + BLK : k;                                          \
            for (int64_t c = 0; c < w; ++c) tb[c] = 0;                                            \
            for (int64_t j = b; j < e; ++j) {                                                     \
                const T *pj = p + j * m, *vj = v + j * m;                                         \
                T *oj = out + j * m;                                                              \
                _Pragma("omp simd")                                                               \
                for (int64_t c = 0; c < w; ++c) {                                                 \
                    const ACC pc = LOAD(pj + c), vc = LOAD(vj + c);                               \
                    STORE(oj + c, pc * (vc - part[c]));                                           \
                    tb[c] += pc * (vs[c] - vc);                                                   \
                }                                                                                 \
            }                                                                                     \
            for (int64_t c = 0; c < w; ++c) t_acc[c] += (double)tb[c];                            \
        }                                                                                         \
        for (int64_t c = 0; c < w; ++c)                                                           \
            if (im[c] >= 0) STORE(out + (int64_t)im[c] * m + c, mx[c] * (ACC)t_acc[c]);           \
    }                                                                                             \
    int softjac_vjp_inner_##SUFFIX(const T *p, const T *v, T *out, int64_t nb, int64_t k,       \
                                   int64_t m, int nthreads) {                                     \
        const int64_t tile = inner_tile(k, m, (int64_t)sizeof(T));                                \
        const int64_t per_b = (m + tile - 1) / tile, ntask = nb * per_b;                          \
        nthreads = clamp_threads(nthreads, ntask, k * tile);                                      \
        advise_huge(out, nb * k * m * (int64_t)sizeof(T));                                        \
        _Pragma("omp parallel for schedule(guided) num_threads(nthreads) if (nthreads > 1)")     \
        for (int64_t task = 0; task < ntask; ++task) {                                            \
            const int64_t i = task / per_b, c0 = (task % per_b) * tile;                           \
            const int64_t w = m - c0 < tile ? m - c0 : tile;                                      \
            const int64_t off = i * k * m + c0;                                                   \
            vjp_inner_tile_##SUFFIX(p + off, v + off, out + off, k, m, w);                        \
        }                                                                                         \
        return 0;                                                                                 \
    }

/* Rows are handed out with OpenMP's guided schedule: each thread first takes a large
 * contiguous block (remaining / threads), then smaller ones down to about 64K elements, so a
 * core slowed by other work does not hold up the rest (a static split waits for the slowest
 * thread), while the threads write far apart.  That matters for fresh outputs: each 2 MiB
 * huge page of the output is zeroed by the OS on first touch, and when two threads touch one
 * page at once (as with small dynamic tasks over adjacent rows) one waits for the other's
 * fault.  Measured with fresh outputs of 64-128 MiB (2 threads, interleaved rounds): dynamic
 * tasks of 64K elements 1.4-1.85x native, guided 1.75-2.1x.  Dynamic tasks of 1M elements
 * (two huge pages) had steadier worst rounds on the loaded VM (a preempted core holds no
 * half of the rows: 1.55-1.76x against 0.8-0.96x) but lower medians (1.8-1.9x against
 * 2.0-2.1x), so guided stays. */
/* The parallel row loop of every row kernel (the schedule discussed above), over tasks of at
 * least `chunk` rows with `nthreads` threads; one thread runs without a team. */
#define SJ_PARALLEL_ROWS                                                                          \
    _Pragma("omp parallel for schedule(guided, chunk) num_threads(nthreads) if (nthreads > 1)")

static inline int64_t rows_per_task(int64_t k) {
    const int64_t r = ((int64_t)1 << 16) / (k > 0 ? k : 1);
    return r > 0 ? r : 1;
}

/* Threads for n rows of k: at most one per row and one per GRAIN elements (waking a thread
 * team costs more than a small problem, and far more on a loaded machine). */
#define GRAIN ((int64_t)1 << 15)

static inline int clamp_threads(int nthreads, int64_t n, int64_t k) {
    const int64_t by_size = (n * (k > 0 ? k : 1) + GRAIN - 1) / GRAIN;
    if (nthreads < 1) nthreads = 1;
    if (by_size < nthreads) nthreads = (int)(by_size > 0 ? by_size : 1);
    if (n < nthreads) nthreads = (int)(n > 0 ? n : 1);
    return nthreads;
}

#define PROB_STORED(j, LOAD, EXP) LOAD(p + (j))
#define PROB_LOGITS(j, LOAD, EXP) EXP(LOAD(z + (j)) - lse)

#define LOAD_F32(ptr) (*(ptr))
#define STORE_F32(ptr, val) (*(ptr) = (val))
#define LOAD_F64(ptr) (*(ptr))
#define STORE_F64(ptr, val) (*(ptr) = (val))
#define LOAD_BF16(ptr) bf16_load(ptr)
#define STORE_BF16(ptr, val) bf16_store((ptr), (val))
#define LOAD_F16(ptr) f16_load(ptr)
#define STORE_F16(ptr, val) f16_store((ptr), (val))

/* The row function each softjac_vjp_<dt> uses. */
#define VJP_ROW_FN(SUFFIX) vjp_row_fast_##SUFFIX
#ifdef SOFTJAC_VEC /* lane indices are int32: rows of 2^31 or more entries take the generic body */
#define vjp_row_fast_f32(p, v, out, k) \
    ((k) < ((int64_t)1 << 31) ? vjp_row_f32_vec(p, v, out, k) : vjp_row_f32(p, v, out, k))
#else
#define vjp_row_fast_f32 vjp_row_f32
#endif
#define vjp_row_fast_f64 vjp_row_f64
#define vjp_row_fast_bf16 vjp_row_bf16
#define vjp_row_fast_f16 vjp_row_f16

#if SJ_PART(1)
DEFINE_VJP(f32, float, float, LOAD_F32, STORE_F32, exp_f32)
DEFINE_VJP(f64, double, double, LOAD_F64, STORE_F64, exp_f64)
DEFINE_VJP(bf16, bf16_t, float, LOAD_BF16, STORE_BF16, exp_f32)
DEFINE_VJP(f16, f16_t, float, LOAD_F16, STORE_F16, exp_f32)
DEFINE_VJP_INNER(f32, float, float, LOAD_F32, STORE_F32)
DEFINE_VJP_INNER(f64, double, double, LOAD_F64, STORE_F64)
DEFINE_VJP_INNER(bf16, bf16_t, float, LOAD_BF16, STORE_BF16)
DEFINE_VJP_INNER(f16, f16_t, float, LOAD_F16, STORE_F16)
#endif

/* softjac_jac_<dt>(p, out, n, k, sp, threads): dense J = diag(p) - p p^T for n rows of k,
 * out contiguous (n, k, k).  A pure write stream (n k^2 entries from n k inputs): per row, i*
 * (first argmax) and r = sum_{j != i*} p_j (= 1 - p_{i*} without cancellation) in one pass,
 * then each output row a is -p_a p (vectorised) with the diagonal p_a (1 - p_a), the argmax's
 * as p_{i*} r: the formula of softjac._core.jacobian_last (the same single roundings for the
 * products and 1 - p_a; r is summed in double, so it can differ from torch's float sum by a
 * rounding; blocked like the VJP's sums).  Output rows of at least
 * 16 KiB go out with non-temporal stores (the output is far larger than any cache and is
 * never read back here).  Work is split over output rows (a), across all n k of them. */
#define DEFINE_JAC(SUFFIX, T, ACC, LOAD, STORE)                                                  \
    int softjac_jac_##SUFFIX(const T *p, T *out, int64_t n, int64_t k, int64_t sp,              \
                             int nthreads) {                                                      \
        int64_t *istar = (int64_t *)malloc((size_t)n * sizeof(int64_t));                         \
        ACC *rc = (ACC *)malloc((size_t)n * sizeof(ACC));                                         \
        if (!istar || !rc) {                                                                      \
            free(istar);                                                                          \
            free(rc);                                                                             \
            return 1;                                                                             \
        }                                                                                         \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            const T *pr = p + i * sp;                                                             \
            ACC m = LOAD(pr);                                                                     \
            int64_t is = 0;                                                                       \
            for (int64_t j = 1; j < k; ++j) {                                                     \
                const ACC pj = LOAD(pr + j);                                                      \
                if (pj > m) {                                                                     \
                    m = pj;                                                                       \
                    is = j;                                                                       \
                }                                                                                 \
            }                                                                                     \
            double r = 0; /* blocked: ACC partial sums over BLK entries, added in double */       \
            for (int64_t b = 0; b < k; b += BLK) {                                                \
                const int64_t e = b + BLK < k ? b + BLK : k;                                      \
                ACC rb = 0;                                                                       \
                for (int64_t j = b; j < e; ++j) rb += j != is ? LOAD(pr + j) : (ACC)0;            \
                r += (double)rb;                                                                  \
            }                                                                                     \
            istar[i] = is;                                                                        \
            rc[i] = (ACC)r;                                                                       \
        }                                                                                         \
        const int64_t rows = n * k;                                                               \
        nthreads = clamp_threads(nthreads, rows, k);                                              \
        advise_huge(out, rows * k * (int64_t)sizeof(T));                                          \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t ra = 0; ra < rows; ++ra) {                                                   \
            const int64_t i = ra / k, a = ra % k;                                                 \
            const T *pr = p + i * sp;                                                             \
            T *o = out + ra * k;                                                                  \
            const ACC pa = LOAD(pr + a);                                                          \
            JAC_ROW_##SUFFIX                                                                      \
            const ACC om = a == istar[i] ? rc[i] : (ACC)1 - pa;                                   \
            STORE(o + a, pa * om);                                                                \
        }                                                                                         \
        free(istar);                                                                              \
        free(rc);                                                                                 \
        return 0;                                                                                 \
    }

/* The off-diagonal row -p_a p_j: a generic loop, and for float32 one with non-temporal
 * stores where the row is long and 32-byte aligned. */
#define JAC_ROW_GENERIC(LOAD, STORE)                                                              \
    _Pragma("omp simd") for (int64_t j = 0; j < k; ++j) STORE(o + j, -(pa * LOAD(pr + j)));
#ifdef SJ_STREAM
#define JAC_ROW_f32                                                                               \
    if (k >= 4096 && ((uintptr_t)o & 31) == 0) {                                                  \
        const vf npa = (vf){0} - pa;                                                              \
        int64_t j = 0;                                                                            \
        for (; j + VL <= k; j += VL) vst_stream(o + j, npa * vld(pr + j));                        \
        for (; j < k; ++j) o[j] = -(pa * pr[j]);                                                  \
        _mm_sfence();                                                                             \
    } else {                                                                                      \
        JAC_ROW_GENERIC(LOAD_F32, STORE_F32)                                                      \
    }
#else
#define JAC_ROW_f32 JAC_ROW_GENERIC(LOAD_F32, STORE_F32)
#endif
#define JAC_ROW_f64 JAC_ROW_GENERIC(LOAD_F64, STORE_F64)
#define JAC_ROW_bf16 JAC_ROW_GENERIC(LOAD_BF16, STORE_BF16)
#define JAC_ROW_f16 JAC_ROW_GENERIC(LOAD_F16, STORE_F16)

#if SJ_PART(2)
DEFINE_JAC(f32, float, float, LOAD_F32, STORE_F32)
DEFINE_JAC(f64, double, double, LOAD_F64, STORE_F64)
DEFINE_JAC(bf16, bf16_t, float, LOAD_BF16, STORE_BF16)
DEFINE_JAC(f16, f16_t, float, LOAD_F16, STORE_F16)
#endif

/* Cross-entropy with class-index targets, float32 math (float/half/bfloat16 logits).
 *   forward, per row (read once from DRAM, the second pass from cache):
 *     m = max z;  S = sum exp(z - m);  lse = m + log S;  Z_w = sum_c w_c z_c (smoothing only)
 *     loss = (1 - eps) w_y (lse - z_y) + (eps / K) (W lse - Z_w),  W = sum_c w_c;  0 if ignored
 *   backward, per element (one read, one write; `out` may be `z` itself):
 *     g [exp(z_j - lse) ((1 - eps) w_y + (eps / K) W) - (1 - eps) w_y [j = y] - (eps / K) w_j]
 * `w` is NULL for unit weights. */
#define DEFINE_CE(SUFFIX, T, LOAD, STORE)                                                        \
    int softjac_ce_fwd_##SUFFIX(const T *z, const int64_t *tgt, const float *w, float w_sum,     \
                                float *loss, float *lse_out, int64_t n, int64_t k, int64_t sz,   \
                                int64_t ignore_index, float eps, int nthreads) {                 \
        nthreads = clamp_threads(nthreads, n, k);                                                    \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            const T *zr = z + i * sz;                                                             \
            CE_FWD_FAST_##SUFFIX                                                                  \
            float m = -__builtin_inff();                                                          \
            _Pragma("omp simd reduction(max : m)")                                               \
            for (int64_t j = 0; j < k; ++j) {                                                     \
                const float zj = LOAD(zr + j);                                                    \
                m = zj > m ? zj : m;                                                              \
            }                                                                                     \
            const float ms = m == -__builtin_inff() ? 0.0f : m;                                   \
            double se = 0, swz = 0;                                                               \
            for (int64_t b = 0; b < k; b += BLK) {                                                \
                const int64_t e = b + BLK < k ? b + BLK : k;                                      \
                float sb = 0, wb = 0;                                                             \
                if (eps > 0) {                                                                    \
                    _Pragma("omp simd reduction(+ : sb, wb)")                                    \
                    for (int64_t j = b; j < e; ++j) {                                             \
                        const float zj = LOAD(zr + j);                                            \
                        sb += exp_f32(zj - ms);                                                   \
                        wb += (w ? w[j] : 1.0f) * zj;                                             \
                    }                                                                             \
                } else {                                                                          \
                    _Pragma("omp simd reduction(+ : sb)")                                        \
                    for (int64_t j = b; j < e; ++j) sb += exp_f32(LOAD(zr + j) - ms);             \
                }                                                                                 \
                se += sb;                                                                         \
                swz += wb;                                                                        \
            }                                                                                     \
            const float l = ms + (float)__builtin_log(se);                                        \
            lse_out[i] = l;                                                                       \
            const int64_t y = tgt[i];                                                             \
            if (y == ignore_index || y < 0 || y >= k) {                                           \
                loss[i] = 0.0f;                                                                   \
                continue;                                                                         \
            }                                                                                     \
            const float wy = w ? w[y] : 1.0f;                                                     \
            float li = (1.0f - eps) * wy * (l - LOAD(zr + y));                                    \
            if (eps > 0) li += (eps / (float)k) * (w_sum * l - (float)swz);                       \
            loss[i] = li;                                                                         \
        }                                                                                         \
        return 0;                                                                                 \
    }                                                                                             \
    int softjac_ce_bwd_##SUFFIX(const T *z, const int64_t *tgt, const float *w, float w_sum,     \
                                const float *lse, const float *grad, T *out, int64_t n,          \
                                int64_t k, int64_t sz, int64_t so, int64_t ignore_index,         \
                                float eps, int nthreads) {                                        \
        nthreads = clamp_threads(nthreads, n, k);                                                    \
        if (so == k && (const void *)out != (const void *)z)                                      \
            advise_huge(out, n * k * (int64_t)sizeof(T));                                         \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            const T *zr = z + i * sz;                                                             \
            T *orow = out + i * so;                                                               \
            const int64_t y = tgt[i];                                                             \
            const int valid = !(y == ignore_index || y < 0 || y >= k);                            \
            const float g = valid ? grad[i] : 0.0f;                                               \
            const float wy = valid ? (w ? w[y] : 1.0f) : 0.0f;                                    \
            const float coef = g * ((1.0f - eps) * wy + (eps / (float)k) * w_sum);                \
            const float sm = g * eps / (float)k;                                                  \
            const float l = lse[i];                                                               \
            if (!valid) {                                                                         \
                for (int64_t j = 0; j < k; ++j) STORE(orow + j, 0.0f);                            \
                continue;                                                                         \
            }                                                                                     \
            CE_BWD_FAST_##SUFFIX                                                                  \
            const float zy = LOAD(zr + y);                                                        \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < k; ++j) {                                                     \
                const float pj = exp_f32(LOAD(zr + j) - l);                                       \
                STORE(orow + j, pj * coef - sm * (w ? w[j] : 1.0f));                              \
            }                                                                                     \
            const float py = exp_f32(zy - l);                                                     \
            STORE(orow + y, py * coef - sm * (w ? w[y] : 1.0f) - g * (1.0f - eps) * wy);          \
        }                                                                                         \
        return 0;                                                                                 \
    }

/* Float32 rows take the vector-type row functions; the loops below serve half logits. */
#ifdef SOFTJAC_VEC
#define CE_FWD_FAST_f32                                                                           \
    lse_out[i] = ce_fwd_row_f32_vec(zr, tgt[i], w, w_sum, k, ignore_index, eps, loss + i);        \
    continue;
#define CE_BWD_FAST_f32                                                                           \
    ce_bwd_row_f32_vec(zr, orow, y, w, l, coef, sm, g * (1.0f - eps) * wy, k);                    \
    continue;
#else
#define CE_FWD_FAST_f32
#define CE_BWD_FAST_f32
#endif
#define CE_FWD_FAST_bf16
#define CE_BWD_FAST_bf16
#define CE_FWD_FAST_f16
#define CE_BWD_FAST_f16

#if SJ_PART(2)
DEFINE_CE(f32, float, LOAD_F32, STORE_F32)
DEFINE_CE(bf16, bf16_t, LOAD_BF16, STORE_BF16)
DEFINE_CE(f16, f16_t, LOAD_F16, STORE_F16)
#endif

/* softjac_softmax_<dt>(z, out, n, k, sz, threads): sigma = exp(z - max z) / sum, float32 math
 * for float32/bfloat16/float16 data (out contiguous (n, k)).  Per row: pass 1 the max (the
 * only read from DRAM), pass 2 e_j = exp(z_j - m) and S = sum e_j (float32 data: e_j stored
 * in out), pass 3 sigma_j = e_j (1 / S) (float32: from out, in cache; half types: exp again,
 * so that sigma is rounded once; a multiply rather than a division: the division's throughput
 * cost 15 % at K = 128, and the extra rounding leaves sigma within about 2 ulps).  exp is exp_full_f32 below, exact to about an ulp down to the
 * smallest subnormal (unlike the flushing exp_f32 of the VJP-from-logits and cross-entropy
 * kernels, whose tiny probabilities only enter sums).  A fully masked row (every z = -inf)
 * gives zeros; a NaN or +inf in a row gives NaNs throughout it, as PyTorch's softmax. */

/* exp(x) for x <= 0 (and -inf, NaN): Cody-Waite reduction and the degree-7 polynomial of
 * exp_f32, scaled by 2^n in two steps below 2^-126 (2^(n+64), exact, then 2^-64, the one
 * rounding into the subnormal range); 0 below -103.98 (under half the smallest subnormal).
 * Only entries whose exp is subnormal pay the processor's subnormal assist. */
static inline float exp_full_f32(float x) {
    const float lo = -103.98f;
    const float xc = x < lo || x != x ? 0.0f : x; /* lanes returned as 0 or NaN compute exp(0) */
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    const float q = exp_reduced_f32(xc, n);
    const int32_t ni = (int32_t)n;
    const int small = ni < -126;
    const int32_t bits = ((small ? ni + 64 : ni) + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    const float res = (q * scale) * (small ? 5.421010862427522e-20f : 1.0f);
    return x != x ? x : (x < lo ? 0.0f : res);
}

#ifdef SOFTJAC_VEC
static inline cvf vexp_full(cvf x) {
    const cvf zero = {0};
    const cvf lo = zero - 103.98f, magic = zero + 12582912.0f;
    const cvi under = x < lo, nan = x != x;
    const cvf xc = (cvf)((cvi)x & ~under & ~nan); /* lanes returned as 0 or NaN compute exp(0) */
    const cvf n = (xc * 1.44269504088896341f + magic) - magic;
    const cvf q = vexp_reduced(xc, n);
    const cvi ni = __builtin_convertvector(n, cvi);
    const cvi small = ni < -126;
    const cvi bits = ((ni + (small & 64)) + 127) << 23;
    /* the second factor is 2^-64 only where the result is subnormal: a product with a
     * subnormal result costs a microcode assist (about 150 cycles on Intel), so no other lane
     * may make one, not even one whose result is discarded */
    const cvf factor = (cvf)(((cvi)(zero + 5.421010862427522e-20f) & small) |
                             ((cvi)(zero + 1.0f) & ~small));
    const cvf res = (q * (cvf)bits) * factor;
    return (cvf)(((cvi)x & nan) | ((cvi)res & ~under & ~nan));
}

static void softmax_row_f32_vec(const float *z, float *out, int64_t k) {
    const float ninf = -__builtin_inff();
    const cvf zero = {0};
    cvf mv = zero + ninf;
    int64_t j = 0;
    for (; j + CVL <= k; j += CVL) mv = cvmax(cvld(z + j), mv);
    if (j < k) mv = cvmax(cvld_part(z + j, k - j, ninf), mv);
    const float m = chmax(mv);
    if (m == ninf) {
        memset(out, 0, (size_t)k * sizeof(float));
        return;
    }
    const cvf mm = zero + m;
    const int64_t kv = k - k % CVL; /* whole vectors end here; the masked rest follows */
    cvf ex_rest = zero;            /* kept in a register: a load right after a masked store of
                                    * the same bytes cannot be forwarded and stalls */
    double s_acc = 0;
    j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        cvf sv = zero;
        for (; j + CVL <= e; j += CVL) {
            const cvf ex = vexp_full(cvld(z + j) - mm);
            cvst(out + j, ex);
            sv += ex;
        }
        if (j < e) { /* -inf lanes give exp = 0 */
            ex_rest = vexp_full(cvld_part(z + j, e - j, ninf) - mm);
            sv += ex_rest;
            j = e;
        }
        s_acc += (double)chsum(sv);
    }
    const float rs = 1.0f / (float)s_acc;
    const cvf rss = zero + rs;
    for (j = 0; j < kv; j += CVL) cvst(out + j, cvld(out + j) * rss);
    if (kv < k) cvst_part(out + kv, ex_rest * rss, k - kv);
}
#define SOFTMAX_FAST_f32                                                                          \
    softmax_row_f32_vec(zr, orow, k);                                                             \
    continue;
#else
#define SOFTMAX_FAST_f32
#endif
#define SOFTMAX_FAST_bf16
#define SOFTMAX_FAST_f16

#define DEFINE_SOFTMAX(SUFFIX, T, LOAD, STORE)                                                    \
    int softjac_softmax_##SUFFIX(const T *z, T *out, int64_t n, int64_t k, int64_t sz,          \
                                 int nthreads) {                                                  \
        nthreads = clamp_threads(nthreads, n, k);                                                 \
        advise_huge(out, n * k * (int64_t)sizeof(T));                                             \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            const T *zr = z + i * sz;                                                             \
            T *orow = out + i * k;                                                                \
            SOFTMAX_FAST_##SUFFIX                                                                 \
            float m = -__builtin_inff();                                                          \
            _Pragma("omp simd reduction(max : m)")                                                \
            for (int64_t j = 0; j < k; ++j) {                                                     \
                const float x = LOAD(zr + j);                                                     \
                m = x > m ? x : m;                                                                \
            }                                                                                     \
            if (m == -__builtin_inff()) {                                                         \
                for (int64_t j = 0; j < k; ++j) STORE(orow + j, 0.0f);                            \
                continue;                                                                         \
            }                                                                                     \
            double s_acc = 0;                                                                     \
            for (int64_t b = 0; b < k; b += BLK) {                                                \
                const int64_t e = b + BLK < k ? b + BLK : k;                                      \
                float sb = 0;                                                                     \
                _Pragma("omp simd reduction(+ : sb)")                                             \
                for (int64_t j = b; j < e; ++j) sb += exp_full_f32(LOAD(zr + j) - m);             \
                s_acc += (double)sb;                                                              \
            }                                                                                     \
            const float rs = 1.0f / (float)s_acc;                                                 \
            _Pragma("omp simd")                                                                   \
            for (int64_t j = 0; j < k; ++j) STORE(orow + j, exp_full_f32(LOAD(zr + j) - m) * rs); \
        }                                                                                         \
        return 0;                                                                                 \
    }

#if SJ_PART(2)
DEFINE_SOFTMAX(f32, float, LOAD_F32, STORE_F32)
DEFINE_SOFTMAX(bf16, bf16_t, LOAD_BF16, STORE_BF16)
DEFINE_SOFTMAX(f16, f16_t, LOAD_F16, STORE_F16)
#endif

/* ABI version, checked by the loader. */
#if SJ_PART(1)
int softjac_cpu_abi(void) { return 6; }
#endif
