/* softjac CPU kernels: the dense softmax Jacobian writer. */
#include "common.h"
#include "simd.h"

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

DEFINE_JAC(f32, float, float, LOAD_F32, STORE_F32)
DEFINE_JAC(f64, double, double, LOAD_F64, STORE_F64)
DEFINE_JAC(bf16, bf16_t, float, LOAD_BF16, STORE_BF16)
DEFINE_JAC(f16, f16_t, float, LOAD_F16, STORE_F16)
