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
        SJ_FOR_ROWS_##SUFFIX(n * k * (int64_t)sizeof(T),                                          \
            VJP_ROW_FN(SUFFIX)(p + i * sp, v + i * sv, out + i * so, k);)                         \
        return 0;                                                                                 \
    }                                                                                             \
    int softjac_vjp_logits_##SUFFIX(const T *z, const ACC *lse, const T *v, T *out, int64_t n,   \
                                    int64_t k, int64_t sz, int64_t sv, int64_t so,               \
                                    int nthreads) {                                               \
        nthreads = clamp_threads(nthreads, n, k);                                                    \
        if (so == k) advise_huge(out, n * k * (int64_t)sizeof(T));                                \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_FOR_ROWS_##SUFFIX(n * k * (int64_t)sizeof(T),                                          \
            vjp_logits_row_##SUFFIX(z + i * sz, lse[i], v + i * sv, out + i * so, k);)            \
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
/* Half rows: σ and v widened into float32 scratch, the float32 vector row, the result rounded
 * once (common.h); the element-wise row when the scratch is unavailable. */
#ifdef SOFTJAC_VEC
#define DEFINE_VJP_ROW_HALF(SUFFIX, T)                                                            \
    static void vjp_row_half_##SUFFIX(const T *p, const T *v, T *out, int64_t k) {              \
        float *ps = half_scratch(3 * k); /* σ, v and the result (not in place) */                 \
        if (!ps || k >= ((int64_t)1 << 31)) {                                                     \
            vjp_row_##SUFFIX(p, v, out, k);                                                       \
            return;                                                                               \
        }                                                                                         \
        float *vs = ps + k, *os = ps + 2 * k;                                                     \
        widen_##SUFFIX(p, ps, k);                                                                 \
        widen_##SUFFIX(v, vs, k);                                                                 \
        vjp_row_f32_vec(ps, vs, os, k);                                                           \
        narrow_##SUFFIX(os, out, k);                                                              \
    }
#define vjp_row_fast_bf16 vjp_row_half_bf16
#define vjp_row_fast_f16 vjp_row_half_f16
#else
#define vjp_row_fast_bf16 vjp_row_bf16
#define vjp_row_fast_f16 vjp_row_f16
#endif

#ifdef SOFTJAC_VEC
static void vjp_row_bf16(const bf16_t *p, const bf16_t *v, bf16_t *out, int64_t k);
static void vjp_row_f16(const f16_t *p, const f16_t *v, f16_t *out, int64_t k);
DEFINE_VJP_ROW_HALF(bf16, bf16_t)
DEFINE_VJP_ROW_HALF(f16, f16_t)
#endif

DEFINE_VJP(f32, float, float, LOAD_F32, STORE_F32, exp_f32)
DEFINE_VJP(f64, double, double, LOAD_F64, STORE_F64, exp_f64)
DEFINE_VJP(bf16, bf16_t, float, LOAD_BF16, STORE_BF16, exp_f32)
DEFINE_VJP(f16, f16_t, float, LOAD_F16, STORE_F16, exp_f32)
/* softjac_vjp_idx_<dt>(p, v, idx, out, n, k, row strides of p, v, out, threads): J v from
 * probabilities whose rows' first argmax is known (idx[i], from softjac_softmax_<dt>; -1 for a
 * row without one: fully masked, whose product is 0, or NaN).  With i* given, the two sums
 * s = sum_j p_j v_j and t = sum_j p_j (v_{i*} - v_j) need one pass together, and the second
 * pass only writes out_j = p_j (v_j - s), then out_{i*} = p_{i*} t: the pass count of PyTorch's
 * backward, and the formula of softjac_vjp_<dt> (blocked sums; the additions inside a block in
 * another order) without its argmax tracking, which cost as much as the rest of the row at
 * K <= 512 (measured with rows in cache, 1 thread: 111 against 199 us at 4096 x 128).  Rows of
 * STREAM_MIN_K or more take softjac_vjp's row (streaming stores; the tracking is noise there). */
#define VJP_IDX_ROW_BODY(ACC, LOAD, STORE)                                                        \
    const ACC vs = istar >= 0 ? LOAD(v + istar) : (ACC)0;                                         \
    double s_acc = 0, t_acc = 0;                                                                  \
    for (int64_t b = 0; b < k; b += BLK) {                                                        \
        const int64_t e = b + BLK < k ? b + BLK : k;                                              \
        ACC sb = 0, tb = 0;                                                                       \
        _Pragma("omp simd reduction(+ : sb, tb)")                                                 \
        for (int64_t j = b; j < e; ++j) {                                                         \
            const ACC pj = LOAD(p + j), vj = LOAD(v + j);                                         \
            sb += pj * vj;                                                                        \
            tb += pj * (vs - vj);                                                                 \
        }                                                                                         \
        s_acc += (double)sb;                                                                      \
        t_acc += (double)tb;                                                                      \
    }                                                                                             \
    const ACC s = (ACC)s_acc;                                                                     \
    _Pragma("omp simd")                                                                           \
    for (int64_t j = 0; j < k; ++j) STORE(out + j, LOAD(p + j) * (LOAD(v + j) - s));              \
    if (istar >= 0) STORE(out + istar, LOAD(p + istar) * (ACC)t_acc);

#ifdef SOFTJAC_VEC
static void vjp_idx_row_f32_vec(const float *p, const float *v, float *out, int64_t k,
                                int64_t istar) {
    if (k >= STREAM_MIN_K) {
        vjp_row_f32_vec(p, v, out, k);
        return;
    }
    /* four accumulators per sum: a row of K = 128 is 16 vectors, and with two the FMA
     * latency chains, not the loads, set the pace (measured 15-20 % at K = 128 and 1000) */
    const vf zero = {0};
    const float vs = istar >= 0 ? v[istar] : 0.0f;
    const vf vss = zero + vs;
    const int pf = k > 2048; /* prefetch ahead only for rows that stream from memory */
    double s_acc = 0, t_acc = 0;
    int64_t j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        vf s0 = zero, s1 = zero, s2 = zero, s3 = zero, t0 = zero, t1 = zero, t2 = zero, t3 = zero;
        for (; j + 4 * VL <= e; j += 4 * VL) {
            if (pf) {
                __builtin_prefetch(p + j + 512); /* as in vjp_row_f32_body */
                __builtin_prefetch(v + j + 512);
            }
            const vf p0 = vld(p + j), v0 = vld(v + j), p1 = vld(p + j + VL), v1 = vld(v + j + VL);
            const vf p2 = vld(p + j + 2 * VL), v2 = vld(v + j + 2 * VL);
            const vf p3 = vld(p + j + 3 * VL), v3 = vld(v + j + 3 * VL);
            s0 += p0 * v0;
            s1 += p1 * v1;
            s2 += p2 * v2;
            s3 += p3 * v3;
            t0 += p0 * (vss - v0);
            t1 += p1 * (vss - v1);
            t2 += p2 * (vss - v2);
            t3 += p3 * (vss - v3);
        }
        for (; j + VL <= e; j += VL) {
            const vf p0 = vld(p + j), v0 = vld(v + j);
            s0 += p0 * v0;
            t0 += p0 * (vss - v0);
        }
        float sb = hsum((s0 + s1) + (s2 + s3)), tb = hsum((t0 + t1) + (t2 + t3));
        for (; j < e; ++j) {
            sb += p[j] * v[j];
            tb += p[j] * (vs - v[j]);
        }
        s_acc += (double)sb;
        t_acc += (double)tb;
    }
    const float s = (float)s_acc;
    const vf ss = zero + s;
    for (j = 0; j + 2 * VL <= k; j += 2 * VL) {
        vst(out + j, vld(p + j) * (vld(v + j) - ss));
        vst(out + j + VL, vld(p + j + VL) * (vld(v + j + VL) - ss));
    }
    for (; j + VL <= k; j += VL) vst(out + j, vld(p + j) * (vld(v + j) - ss));
    for (; j < k; ++j) out[j] = p[j] * (v[j] - s);
    if (istar >= 0) out[istar] = p[istar] * (float)t_acc;
}
#endif

#define DEFINE_VJP_IDX(SUFFIX, T, ACC, LOAD, STORE)                                               \
    static __attribute__((unused)) void vjp_idx_row_##SUFFIX(const T *p, const T *v, T *out,  \
                                                             int64_t k, int64_t istar) {         \
        VJP_IDX_ROW_BODY(ACC, LOAD, STORE)                                                        \
    }                                                                                             \
    int softjac_vjp_idx_##SUFFIX(const T *p, const T *v, const int32_t *idx, T *out, int64_t n,  \
                                 int64_t k, int64_t sp, int64_t sv, int64_t so, int nthreads) {  \
        nthreads = clamp_threads(nthreads, n, k);                                                 \
        if (so == k) advise_huge(out, n * k * (int64_t)sizeof(T));                                \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_FOR_ROWS_##SUFFIX(n * k * (int64_t)sizeof(T),                                          \
            VJP_IDX_ROW_FN(SUFFIX)(p + i * sp, v + i * sv, out + i * so, k, idx[i]);)             \
        return 0;                                                                                 \
    }

#define VJP_IDX_ROW_FN(SUFFIX) vjp_idx_row_fast_##SUFFIX
#ifdef SOFTJAC_VEC
#define vjp_idx_row_fast_f32 vjp_idx_row_f32_vec
#else
#define vjp_idx_row_fast_f32 vjp_idx_row_f32
#endif
#define vjp_idx_row_fast_bf16 vjp_idx_row_bf16
#define vjp_idx_row_fast_f16 vjp_idx_row_f16

DEFINE_VJP_IDX(f32, float, float, LOAD_F32, STORE_F32)
DEFINE_VJP_IDX(bf16, bf16_t, float, LOAD_BF16, STORE_BF16)
DEFINE_VJP_IDX(f16, f16_t, float, LOAD_F16, STORE_F16)

DEFINE_VJP_INNER(f32, float, float, LOAD_F32, STORE_F32)
DEFINE_VJP_INNER(f64, double, double, LOAD_F64, STORE_F64)
DEFINE_VJP_INNER(bf16, bf16_t, float, LOAD_BF16, STORE_BF16)
DEFINE_VJP_INNER(f16, f16_t, float, LOAD_F16, STORE_F16)

/* ABI version, checked by the loader. */
int softjac_cpu_abi(void) { return 8; }

/* softjac_vjp_exact_<dt>(z, v, out, n, k, row strides of z, v, out, threads): J v straight
 * from logits, with sigma never rounded (the formula of softjac._core.vjp_logits_last):
 *   e_j = exp(z_j - m), m = max z, i* = first argmax (e_{i*} = 1), r = sum_{j != i*} e_j,
 *   S = 1 + r, A = sum_j e_j v_j,
 *   out_j = e_j u_j / S^2 with u_j = v_j S - A, and u_{i*} = sum_{j != i*} e_j (v_{i*} - v_j)
 *   (no cancellation), 1/S^2 applied as y - y r (2 + r) / S^2 where r <= 1 (r kept even where
 *   fl(1 + r) = 1), else as y / S^2.
 * Two passes over the row, the only read from DRAM in the first:
 *   pass 1, block by block (BLK entries, in L1 for the second look): the block's max; if it
 *     exceeds the running max m, the sums so far are rescaled by exp(m_old - m_new) (the old
 *     argmax joining r) and i* moves to the block's first maximum; then r and A accumulate
 *     exp(z_j - m) and exp(z_j - m) v_j;
 *   pass 2 (from cache): e_j again, out_j, and the argmax's sum.
 * Float math for float/half/bfloat16 data (exp_full_f32: accurate down to subnormals), double
 * for double (libm exp); block sums in the working precision, the blocks added in double.
 * NaN contract: a NaN in z or v, or a +inf in z, makes the row all NaN; -inf is masked; a row
 * with every z = -inf gives zeros.  Products that could overflow (max |v| near the overflow
 * threshold over 4 (K + 1)) are computed with v scaled by a power of two and the result
 * scaled back: finite wherever the exact result is representable. */
#define EXACT_SCALE_NEEDED(ACC, vmax, k) ((vmax) > EXACT_MAX_##ACC / (ACC)(4 * ((k) + 1)))
#define EXACT_MAX_float 3.4028234663852886e+38f
#define EXACT_MAX_double 1.7976931348623157e+308
#define EXACT_EMAX_float 128 /* FLT_MAX < 2^128 */
#define EXACT_EMAX_double 1024

/* The power of two sh with vmax 2^-sh 4 (k + 1) < 2^(emax - 1): every sum and product of the
 * row then stays below half the overflow threshold. */
static inline int exact_shift(double vmax, int64_t k, int emax) {
    int ev;
    (void)__builtin_frexp(vmax, &ev); /* vmax < 2^ev */
    const uint64_t w = 4 * (uint64_t)(k + 1) - 1;
    const int lk = 64 - __builtin_clzll(w); /* 2^lk > 4 (k + 1) - 1 */
    const int sh = ev + lk - emax + 1;
    return sh > 0 ? sh : 0;
}

#define DEFINE_VJP_EXACT_GENERIC(SUFFIX, T, ACC, LOAD, STORE, EXP)                               \
    static void vjp_exact_row_generic_##SUFFIX(const T *z, const T *v, T *out, int64_t k) {     \
        const ACC ninf = -(ACC)__builtin_inf();                                                   \
        ACC tv = 1, to = 1; /* v scaled by tv (a power of two), the result by to = 1 / tv */      \
    again:;                                                                                       \
        ACC m = ninf, vmax = 0;                                                                   \
        int64_t istar = -1;                                                                       \
        int nan = 0;                                                                              \
        double r_acc = 0, a_acc = 0;                                                              \
        for (int64_t b = 0; b < k; b += BLK) {                                                    \
            const int64_t e = b + BLK < k ? b + BLK : k;                                          \
            ACC bm = ninf;                                                                        \
            int bn = 0;                                                                           \
            _Pragma("omp simd reduction(max : bm) reduction(| : bn)")                            \
            for (int64_t j = b; j < e; ++j) {                                                     \
                const ACC x = LOAD(z + j);                                                        \
                bm = x > bm ? x : bm;                                                             \
                bn |= x != x;                                                                     \
            }                                                                                     \
            nan |= bn;                                                                            \
            if (bm > m) {                                                                         \
                int64_t i = b;                                                                    \
                while (LOAD(z + i) != bm) ++i;                                                    \
                const ACC c = m == ninf ? (ACC)0 : EXP(m - bm);                                   \
                r_acc = m == ninf ? 0.0 : (r_acc + 1.0) * (double)c;                              \
                a_acc *= (double)c;                                                               \
                m = bm;                                                                           \
                istar = i;                                                                        \
            }                                                                                     \
            ACC rb = 0, ab = 0, vb = 0;                                                           \
            if (m != ninf) {                                                                      \
                _Pragma("omp simd reduction(+ : rb, ab) reduction(max : vb)")                    \
                for (int64_t j = b; j < e; ++j) {                                                 \
                    const ACC ej = EXP(LOAD(z + j) - m), vj = LOAD(v + j) * tv;                   \
                    ab += ej * vj;                                                                \
                    rb += j == istar ? (ACC)0 : ej;                                               \
                    const ACC av = vj < 0 ? -vj : vj;                                             \
                    vb = av > vb ? av : vb;                                                       \
                }                                                                                 \
            } else { /* masked so far: only v's NaN and size matter */                            \
                int vn = 0;                                                                       \
                _Pragma("omp simd reduction(| : vn) reduction(max : vb)")                        \
                for (int64_t j = b; j < e; ++j) {                                                 \
                    const ACC vj = LOAD(v + j) * tv, av = vj < 0 ? -vj : vj;                      \
                    vn |= vj != vj;                                                               \
                    vb = av > vb ? av : vb;                                                       \
                }                                                                                 \
                nan |= vn;                                                                        \
            }                                                                                     \
            r_acc += (double)rb;                                                                  \
            a_acc += (double)ab;                                                                  \
            vmax = vb > vmax ? vb : vmax;                                                         \
        }                                                                                         \
        if (nan || m == -ninf) {                                                                  \
            for (int64_t j = 0; j < k; ++j) STORE(out + j, (ACC)__builtin_nan(""));               \
            return;                                                                               \
        }                                                                                         \
        if (m == ninf) { /* every entry masked: zeros */                                          \
            for (int64_t j = 0; j < k; ++j) STORE(out + j, (ACC)0);                               \
            return;                                                                               \
        }                                                                                         \
        if (tv == 1 && EXACT_SCALE_NEEDED(ACC, vmax, k) && vmax - vmax == 0) {                    \
            const int sh = exact_shift((double)vmax, k, EXACT_EMAX_##ACC);                        \
            tv = (ACC)__builtin_ldexp(1.0, -sh);                                                  \
            to = (ACC)__builtin_ldexp(1.0, sh);                                                   \
            goto again; /* the rare slow path: the row once more, with v scaled */                \
        }                                                                                         \
        const ACC r = (ACC)r_acc, s = 1 + r, a = (ACC)a_acc, vs = LOAD(v + istar) * tv;         \
        const int small = r <= 1;                                                                 \
        const ACC kk = small ? r * (2 + r) / (s * s) : (ACC)0;                                    \
        const ACC c2 = small ? (ACC)1 : (ACC)1 / (s * s);                                         \
        double q_acc = 0;                                                                         \
        for (int64_t b = 0; b < k; b += BLK) {                                                    \
            const int64_t e = b + BLK < k ? b + BLK : k;                                          \
            ACC qb = 0;                                                                           \
            _Pragma("omp simd reduction(+ : qb)")                                                 \
            for (int64_t j = b; j < e; ++j) {                                                     \
                const ACC ej = EXP(LOAD(z + j) - m), vj = LOAD(v + j) * tv;                       \
                const ACC y = ej * (vj * s - a);                                                  \
                STORE(out + j, (y * c2 - y * kk) * to);                                           \
                qb += ej * (vs - vj);                                                             \
            }                                                                                     \
            q_acc += (double)qb;                                                                  \
        }                                                                                         \
        const ACC q = (ACC)q_acc;                                                                 \
        STORE(out + istar, (q * c2 - q * kk) * to);                                               \
    }

DEFINE_VJP_EXACT_GENERIC(f32, float, float, LOAD_F32, STORE_F32, exp_full_f32)
DEFINE_VJP_EXACT_GENERIC(f64, double, double, LOAD_F64, STORE_F64, exp_f64)
DEFINE_VJP_EXACT_GENERIC(bf16, bf16_t, float, LOAD_BF16, STORE_BF16, exp_full_f32)
DEFINE_VJP_EXACT_GENERIC(f16, f16_t, float, LOAD_F16, STORE_F16, exp_full_f32)

#ifdef SOFTJAC_VEC
static inline cvf cvabs(cvf x) {
    const cvi mask = (cvi){0} + 0x7fffffff;
    return (cvf)((cvi)x & mask);
}

/* The output pass of the float32 exact rows, from r = sum_{j != i*} e_j and A = sum_j e_j v_j:
 * out_j = e_j (v_j S - A) / S^2 and the argmax's sum_j e_j (v_{i*} - v_j) / S^2 (1/S^2 as in
 * the generic row), with e_j = exp(z_j - m) recomputed from z, or read back from `out` where
 * the sum pass stored it (z == NULL). */
static inline __attribute__((always_inline)) void exact_out_pass_f32(const float *z, float m,
                                                                    const float *v, float *out,
                                                                    int64_t k, int64_t istar,
                                                                    double r_acc, double a_acc) {
    const float ninf = -__builtin_inff();
    const cvf zero = {0};
    const float r = (float)r_acc, s = 1 + r, a = (float)a_acc, vs = v[istar];
    const int small = r <= 1;
    const float kk = small ? r * (2 + r) / (s * s) : 0.0f;
    const float c2 = small ? 1.0f : 1.0f / (s * s);
    const cvf sv = zero + s, av = zero + a, vsv = zero + vs, kv = zero + kk, cv = zero + c2;
    const cvf mm = zero + m;
    double q_acc = 0;
    int64_t j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        cvf qs = zero;
        for (; j + CVL <= e; j += CVL) {
            const cvf ex = z ? vexp_nonpos(cvld(z + j) - mm) : cvld(out + j), vj = cvld(v + j);
            const cvf y = ex * (vj * sv - av);
            cvst(out + j, y * cv - y * kv);
            qs += ex * (vsv - vj);
        }
        if (j < e) {
            const cvf ex = z ? vexp_nonpos(cvld_part(z + j, e - j, ninf) - mm)
                             : cvld_part(out + j, e - j, 0.0f);
            const cvf vj = cvld_part(v + j, e - j, 0.0f);
            const cvf y = ex * (vj * sv - av);
            cvst_part(out + j, y * cv - y * kv, e - j);
            qs += ex * (vsv - vj);
            j = e;
        }
        q_acc += (double)chsum(qs);
    }
    const float q = (float)q_acc;
    out[istar] = q * c2 - q * kk;
}

/* The float32 row of softjac_vjp_exact with the vector types: the same passes, blocks and
 * formulas as the generic row (only the order of the float additions inside a block
 * differs). Returns 1, having written nothing, when the row needs the scaled slow path. */
static int vjp_exact_row_f32_vec(const float *z, const float *v, float *out, int64_t k) {
    const float ninf = -__builtin_inff();
    const cvf zero = {0};
    cvi lane;
    for (int l = 0; l < CVL; ++l) lane[l] = l;
    float m = ninf;
    int64_t istar = -1;
    double r_acc = 0, a_acc = 0;
    cvf vmx = zero;
    cvi nanv = lane * 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        cvf mv = zero + ninf;
        int64_t j = b;
        for (; j + CVL <= e; j += CVL) {
            const cvf x = cvld(z + j);
            mv = cvmax(x, mv);
            nanv |= x != x;
        }
        if (j < e) {
            const cvf x = cvld_part(z + j, e - j, ninf);
            mv = cvmax(x, mv);
            nanv |= x != x;
        }
        const float bm = chmax(mv);
        if (bm > m) {
            int64_t i = b;
            while (z[i] != bm) ++i;
            const float c = m == ninf ? 0.0f : exp_full_f32(m - bm);
            r_acc = m == ninf ? 0.0 : (r_acc + 1.0) * (double)c;
            a_acc *= (double)c;
            m = bm;
            istar = i;
        }
        if (m == ninf) { /* masked so far: only v's NaN and size matter */
            for (j = b; j < e; j += CVL) {
                const cvf vj = e - j >= CVL ? cvld(v + j) : cvld_part(v + j, e - j, 0.0f);
                vmx = cvmax(cvabs(vj), vmx);
                nanv |= vj != vj;
            }
            continue;
        }
        const cvf mm = zero + m;
        const cvi is = lane * 0 + (int32_t)istar;
        cvi jv = lane + (int32_t)b;
        cvf rs = zero, as = zero;
        for (j = b; j + CVL <= e; j += CVL, jv += CVL) {
            const cvf ex = vexp_nonpos(cvld(z + j) - mm), vj = cvld(v + j);
            as += ex * vj;
            rs += (cvf)((cvi)ex & ~(jv == is));
            vmx = cvmax(cvabs(vj), vmx);
        }
        if (j < e) { /* filled lanes: exp(-inf) = 0 and v = 0 add nothing */
            const cvf ex = vexp_nonpos(cvld_part(z + j, e - j, ninf) - mm);
            const cvf vj = cvld_part(v + j, e - j, 0.0f);
            as += ex * vj;
            rs += (cvf)((cvi)ex & ~(jv == is));
            vmx = cvmax(cvabs(vj), vmx);
        }
        r_acc += (double)chsum(rs);
        a_acc += (double)chsum(as);
    }
    int anynan = 0;
    for (int l = 0; l < CVL; ++l) anynan |= nanv[l];
    if (anynan || m == -ninf) {
        const float qnan = __builtin_nanf("");
        for (int64_t j = 0; j < k; ++j) out[j] = qnan;
        return 0;
    }
    if (m == ninf) {
        memset(out, 0, (size_t)k * sizeof(float));
        return 0;
    }
    const float vmax = chmax(vmx);
    if (EXACT_SCALE_NEEDED(float, vmax, k) || a_acc - a_acc != 0) return 1;
    exact_out_pass_f32(z, m, v, out, k, istar, r_acc, a_acc);
    return 0;
}
/* Rows of at most EXACT_STORED_K floats (z, v and out together within L2), float32: the same
 * formulas with the max taken first over the whole row (no online rescaling), and e_j stored
 * in `out` by the sum pass, so that the output pass reads it back instead of computing the
 * exponential again: one exp per entry instead of two (PyTorch's softmax followed by its
 * backward also computes one).  Passes: the max and NaN check (z from memory), i* by a search
 * (in L1), e_j, r and A (z and v; e_j into out), the output and the argmax's sum (out and v
 * from cache).  The e_j are exactly those of the general row (exp of the same arguments), r
 * leaves out e_{i*} = 1 by masking the one vector that holds i*.  Returns 1, having written
 * nothing that matters, when the row needs the scaled slow path (or holds a NaN in v). */
#define EXACT_STORED_K 4096
static int vjp_exact_row_f32_stored(const float *z, const float *v, float *out, int64_t k) {
    const float ninf = -__builtin_inff();
    const cvf zero = {0};
    cvi lane;
    for (int l = 0; l < CVL; ++l) lane[l] = l;
    /* NaN: never the max; a NaN in z or v makes A NaN below, and such rows go to the general
     * row (return 1), which writes the NaNs; only a NaN among -inf needs a look here */
    cvf mv0 = zero + ninf, mv1 = mv0;
    int64_t j = 0;
    for (; j + 2 * CVL <= k; j += 2 * CVL) {
        mv0 = cvmax(cvld(z + j), mv0);
        mv1 = cvmax(cvld(z + j + CVL), mv1);
    }
    for (; j < k; j += CVL)
        mv0 = cvmax(k - j >= CVL ? cvld(z + j) : cvld_part(z + j, k - j, ninf), mv0);
    const float m = chmax(cvmax(mv0, mv1));
    if (m == ninf || m == -ninf) return 1; /* fully masked, +inf or NaN among -inf: rare */
    const int64_t istar = first_equal(z, k, m);
    const int64_t ivec = istar - istar % CVL; /* the vector that holds i* */
    const cvi notstar = lane != (lane * 0 + (int32_t)(istar - ivec));
    const cvf mm = zero + m;
    double r_acc = 0, a_acc = 0;
    cvf vmx = zero;
    j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        cvf rs = zero, as = zero;
        for (; j + CVL <= e; j += CVL) {
            const cvf ex = vexp_nonpos(cvld(z + j) - mm), vj = cvld(v + j);
            cvst(out + j, ex);
            as += ex * vj;
            rs += j == ivec ? (cvf)((cvi)ex & notstar) : ex;
            vmx = cvmax(cvabs(vj), vmx);
        }
        if (j < e) { /* filled lanes: exp(-inf) = 0 and v = 0 add nothing */
            const cvf ex = vexp_nonpos(cvld_part(z + j, e - j, ninf) - mm);
            const cvf vj = cvld_part(v + j, e - j, 0.0f);
            cvst_part(out + j, ex, e - j);
            as += ex * vj;
            rs += j == ivec ? (cvf)((cvi)ex & notstar) : ex;
            vmx = cvmax(cvabs(vj), vmx);
            j = e;
        }
        r_acc += (double)chsum(rs);
        a_acc += (double)chsum(as);
    }
    const float vmax = chmax(vmx);
    if (EXACT_SCALE_NEEDED(float, vmax, k) || a_acc - a_acc != 0) return 1;
    exact_out_pass_f32(NULL, m, v, out, k, istar, r_acc, a_acc);
    return 0;
}
#define VJP_EXACT_ROW_f32(z, v, out, k)                                                           \
    if ((k) <= EXACT_STORED_K ? vjp_exact_row_f32_stored(z, v, out, k)                            \
                              : ((k) >= ((int64_t)1 << 31) || vjp_exact_row_f32_vec(z, v, out, k))) \
        vjp_exact_row_generic_f32(z, v, out, k);
#else
#define VJP_EXACT_ROW_f32(z, v, out, k) vjp_exact_row_generic_f32(z, v, out, k);
#endif
#define VJP_EXACT_ROW_f64(z, v, out, k) vjp_exact_row_generic_f64(z, v, out, k);
#define VJP_EXACT_ROW_bf16(z, v, out, k) vjp_exact_row_generic_bf16(z, v, out, k);
#define VJP_EXACT_ROW_f16(z, v, out, k) vjp_exact_row_generic_f16(z, v, out, k);

#define DEFINE_VJP_EXACT(SUFFIX, T)                                                               \
    int softjac_vjp_exact_##SUFFIX(const T *z, const T *v, T *out, int64_t n, int64_t k,          \
                                   int64_t sz, int64_t sv, int64_t so, int nthreads) {            \
        nthreads = clamp_threads(nthreads, n, k);                                                 \
        if (so == k) advise_huge(out, n * k * (int64_t)sizeof(T));                                \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_FOR_ROWS_##SUFFIX(n * k * (int64_t)sizeof(T), {                                        \
            VJP_EXACT_ROW_##SUFFIX(z + i * sz, v + i * sv, out + i * so, k)                       \
        })                                                                                        \
        return 0;                                                                                 \
    }

DEFINE_VJP_EXACT(f32, float)
DEFINE_VJP_EXACT(f64, double)
DEFINE_VJP_EXACT(bf16, bf16_t)
DEFINE_VJP_EXACT(f16, f16_t)
