/* softjac CPU kernels: the softmax VJP J v from probabilities (rows, and the class dim in the
 * middle of a contiguous tensor) and from logits with a given lse. */
#include "common.h"
#include "exp.h"
#include "simd.h"

/* One row of J v.  PROB(j, LOAD, EXP) gives p_j: the stored probability, or exp(z_j - lse) recomputed
 * (twice: in both passes, which is cheaper than a scratch row for the SIMD exp above).
 *   pass 1 (the only read from DRAM): s = <p, v> and m = max p, remembering the first block
 *     whose maximum is m; i* is then found inside that block;
 *   pass 2 (from cache): out_j = p_j (v_j - s) and t = sum_j p_j (v* - v_j), whose i* term
 *     is exactly 0; finally out_{i*} = m t.
 * Sums are blocked: SIMD partial sums over BLK entries, the blocks added in double. */
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

#ifdef SOFTJAC_VEC
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
#endif /* SOFTJAC_VEC */

#define PROB_STORED(j, LOAD, EXP) LOAD(p + (j))
#define PROB_LOGITS(j, LOAD, EXP) EXP(LOAD(z + (j)) - lse)

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

DEFINE_VJP(f32, float, float, LOAD_F32, STORE_F32, exp_f32)
DEFINE_VJP(f64, double, double, LOAD_F64, STORE_F64, exp_f64)
DEFINE_VJP(bf16, bf16_t, float, LOAD_BF16, STORE_BF16, exp_f32)
DEFINE_VJP(f16, f16_t, float, LOAD_F16, STORE_F16, exp_f32)
DEFINE_VJP_INNER(f32, float, float, LOAD_F32, STORE_F32)
DEFINE_VJP_INNER(f64, double, double, LOAD_F64, STORE_F64)
DEFINE_VJP_INNER(bf16, bf16_t, float, LOAD_BF16, STORE_BF16)
DEFINE_VJP_INNER(f16, f16_t, float, LOAD_F16, STORE_F16)

/* ABI version, checked by the loader. */
int softjac_cpu_abi(void) { return 6; }
