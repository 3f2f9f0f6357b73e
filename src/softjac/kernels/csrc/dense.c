/* softjac CPU kernels: the dense softmax Jacobian writer. */
#include "common.h"
#include "exp.h"
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
            int nan = m != m;                                                                     \
            for (int64_t j = 1; j < k; ++j) {                                                     \
                const ACC pj = LOAD(pr + j);                                                      \
                nan |= pj != pj;                                                                  \
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
            istar[i] = nan ? -1 : is; /* -1: a NaN in the row, whose block is all NaN */           \
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
            if (istar[i] < 0) {                                                                   \
                for (int64_t j = 0; j < k; ++j) STORE(o + j, (ACC)__builtin_nan(""));             \
                continue;                                                                         \
            }                                                                                     \
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

/* softjac_jac_logits_<dt>(z, out, n, k, sz, threads): dense J = diag(sigma) - sigma sigma^T
 * straight from logits with sigma never rounded (softjac._core.jacobian_logits_last):
 *   J_ij = -e_i e_j / S^2,  J_ii = e_i (S - e_i) / S^2,  S - e_{i*} taken as r,
 * with e, i*, r and S as in softjac_vjp_exact and 1/S^2 applied the same way.  Stage 1, per
 * row: the max, i* and e_j = exp(z_j - m) into a workspace (n k values of the working
 * precision: float, or double for double data), r blocked like every sum here.  Stage 2, per
 * output row (i, a): its K entries, written once.  A row with a NaN or a +inf gets a K x K
 * block of NaN, a fully masked row (every z = -inf) zeros.  Returns 1 when the workspace
 * cannot be allocated. */
#define DEFINE_JAC_LOGITS(SUFFIX, T, ACC, LOAD, STORE, EXP)                                      \
    int softjac_jac_logits_##SUFFIX(const T *z, T *out, int64_t n, int64_t k, int64_t sz,       \
                                    int nthreads) {                                               \
        ACC *ew = (ACC *)malloc((size_t)(n * k) * sizeof(ACC));                                   \
        int64_t *istar = (int64_t *)malloc((size_t)n * sizeof(int64_t));                         \
        ACC *rc = (ACC *)malloc((size_t)n * sizeof(ACC));                                         \
        if (!ew || !istar || !rc) {                                                               \
            free(ew);                                                                             \
            free(istar);                                                                          \
            free(rc);                                                                             \
            return 1;                                                                             \
        }                                                                                         \
        const int nt = nthreads;                                                                  \
        {                                                                                         \
            int nthreads = clamp_threads(nt, n, k);                                               \
            const int64_t chunk = rows_per_task(k);                                               \
            SJ_PARALLEL_ROWS                                                                      \
            for (int64_t i = 0; i < n; ++i) {                                                     \
                const T *zr = z + i * sz;                                                         \
                ACC *er = ew + i * k;                                                             \
                const ACC ninf = -(ACC)__builtin_inf();                                           \
                ACC m = ninf;                                                                     \
                int64_t is = -1;                                                                  \
                int nan = 0;                                                                      \
                for (int64_t j = 0; j < k; ++j) {                                                 \
                    const ACC x = LOAD(zr + j);                                                   \
                    nan |= x != x;                                                                \
                    if (x > m) {                                                                  \
                        m = x;                                                                    \
                        is = j;                                                                   \
                    }                                                                             \
                }                                                                                 \
                rc[i] = 0;                                                                        \
                if (nan || m == -ninf) { /* -2: NaN block; -1: masked row, zeros */               \
                    istar[i] = -2;                                                                \
                    continue;                                                                     \
                }                                                                                 \
                istar[i] = is;                                                                    \
                if (is < 0) continue;                                                             \
                double r = 0;                                                                     \
                for (int64_t b = 0; b < k; b += BLK) {                                            \
                    const int64_t e = b + BLK < k ? b + BLK : k;                                  \
                    ACC rb = 0;                                                                   \
                    _Pragma("omp simd reduction(+ : rb)")                                         \
                    for (int64_t j = b; j < e; ++j) {                                             \
                        const ACC ej = EXP(LOAD(zr + j) - m);                                     \
                        er[j] = ej;                                                               \
                        rb += j == is ? (ACC)0 : ej;                                              \
                    }                                                                             \
                    r += (double)rb;                                                              \
                }                                                                                 \
                rc[i] = (ACC)r;                                                                   \
            }                                                                                     \
        }                                                                                         \
        const int64_t rows = n * k;                                                               \
        nthreads = clamp_threads(nt, rows, k);                                                    \
        advise_huge(out, rows * k * (int64_t)sizeof(T));                                          \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t ra = 0; ra < rows; ++ra) {                                                   \
            const int64_t i = ra / k, a = ra % k;                                                 \
            T *o = out + ra * k;                                                                  \
            if (istar[i] < 0) {                                                                   \
                const ACC fill = istar[i] == -2 ? (ACC)__builtin_nan("") : (ACC)0;                \
                for (int64_t j = 0; j < k; ++j) STORE(o + j, fill);                               \
                continue;                                                                         \
            }                                                                                     \
            const ACC *er = ew + i * k;                                                           \
            const ACC r = rc[i], s = 1 + r, ea = er[a];                                           \
            const int small = r <= 1;                                                             \
            const ACC kk = small ? r * (2 + r) / (s * s) : (ACC)0;                                \
            const ACC c2 = small ? (ACC)1 : (ACC)1 / (s * s);                                     \
            _Pragma("omp simd")                                                                   \
            for (int64_t j = 0; j < k; ++j) {                                                     \
                const ACC y = -(ea * er[j]);                                                      \
                STORE(o + j, y * c2 - y * kk);                                                    \
            }                                                                                     \
            const ACC y = ea * (a == istar[i] ? r : s - ea);                                      \
            STORE(o + a, y * c2 - y * kk);                                                        \
        }                                                                                         \
        free(ew);                                                                                 \
        free(istar);                                                                              \
        free(rc);                                                                                 \
        return 0;                                                                                 \
    }

DEFINE_JAC_LOGITS(f32, float, float, LOAD_F32, STORE_F32, exp_full_f32)
DEFINE_JAC_LOGITS(f64, double, double, LOAD_F64, STORE_F64, exp_f64)
DEFINE_JAC_LOGITS(bf16, bf16_t, float, LOAD_BF16, STORE_BF16, exp_full_f32)
DEFINE_JAC_LOGITS(f16, f16_t, float, LOAD_F16, STORE_F16, exp_full_f32)
