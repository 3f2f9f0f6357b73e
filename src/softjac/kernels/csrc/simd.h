/* softjac CPU kernels: GCC/clang vector types (8 float lanes; 16 for the compute-bound
 * exp loops where AVX-512 is available), horizontal reductions, masked partial loads/stores
 * and non-temporal stores.  SOFTJAC_VEC is defined where the vector types exist. */
#ifndef SOFTJAC_SIMD_H
#define SOFTJAC_SIMD_H

#include "common.h"

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

/* Whether any lane of the comparison result m is set (one test instruction with AVX). */
static inline int cv_any(cvi m) {
#if CVL == 16 && defined(__AVX512F__)
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif CVL == 8 && defined(__AVX__)
    return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#else
    int32_t any = 0;
    for (int l = 0; l < CVL; ++l) any |= m[l];
    return any != 0;
#endif
}

/* The first j < k with x[j] == m, or -1: a compare and a bit scan per vector with AVX. */
static inline int64_t first_equal(const float *x, int64_t k, float m) {
    int64_t j = 0;
#if defined(__AVX__)
    const vf mm = (vf){0} + m;
    for (; j + VL <= k; j += VL) {
        const unsigned bits = (unsigned)_mm256_movemask_ps((__m256)(vf)(vld(x + j) == mm));
        if (bits) return j + __builtin_ctz(bits);
    }
#endif
    for (; j < k; ++j)
        if (x[j] == m) return j;
    return -1;
}
#endif /* SOFTJAC_VEC (GCC/clang) */

#endif /* SOFTJAC_SIMD_H */
