/* softjac CPU kernels: the fused cross-entropy forward and backward. */
#include "common.h"
#include "exp.h"
#include "simd.h"

#ifdef SOFTJAC_VEC
/* Cross-entropy rows for float32 logits with the vector types.  `omp simd` leaves gcc's
 * loops around exp_f32 with lane arrays in memory and long prologues/epilogues, which at K of
 * a few hundred cost more than the arithmetic (vexp in exp.h is exp_f32 lane by lane).  Same
 * passes and formulas; only the order of the float additions inside a BLK block differs. */
/* One forward row: m and ls (through *m_out, *ls_out) and the row loss (through *loss_out);
 * the formulas at DEFINE_CE. */
static void ce_fwd_row_f32_vec(const float *zr, int64_t y, const float *w, float w_sum,
                               int64_t k, int64_t ignore_index, float eps, float *loss_out,
                               float *m_out, float *ls_out) {
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
    const float m0 = max2(chmax(mv0), chmax(mv1));
    const float m = m0 == ninf ? 0.0f : m0;
    const cvf mv = zero + m;
    double se = 0, swz = 0;
    j = 0;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        cvf s0 = zero, s1 = zero, w0 = zero, w1 = zero;
        for (; j + 2 * CVL <= e; j += 2 * CVL) {
            const cvf a = cvld(zr + j) - mv, c = cvld(zr + j + CVL) - mv;
            s0 += vexp(a);
            s1 += vexp(c);
            if (eps > 0) {
                w0 += w ? cvld(w + j) * a : a;
                w1 += w ? cvld(w + j + CVL) * c : c;
            }
        }
        for (; j < e; j += CVL) { /* at most one whole vector, then the masked rest */
            const int64_t n = e - j < CVL ? e - j : CVL;
            s1 += vexp((n == CVL ? cvld(zr + j) : cvld_part(zr + j, n, ninf)) - mv);
            if (eps > 0) {
                const cvf a = (n == CVL ? cvld(zr + j) : cvld_part(zr + j, n, m)) - mv;
                w1 += w ? (n == CVL ? cvld(w + j) : cvld_part(w + j, n, 0.0f)) * a : a;
            }
        }
        se += chsum(s0 + s1);
        swz += chsum(w0 + w1);
    }
    const float ls = (float)__builtin_log(se);
    *m_out = m;
    *ls_out = ls;
    if (y == ignore_index) {
        *loss_out = 0.0f;
        return;
    }
    const float wy = w ? w[y] : 1.0f;
    float li = (1.0f - eps) * wy * (ls - (zr[y] - m));
    if (eps > 0) li += (eps / (float)k) * (w_sum * ls - (float)swz);
    *loss_out = li;
}

/* One backward row of a valid target (formula at DEFINE_CE); `orow` may be `zr`. */
static void ce_bwd_row_f32_vec(const float *zr, float *orow, int64_t y, const float *w, float m,
                               float ls, float coef, float sm, float gy, int64_t k) {
    const cvf zero = {0}, mv = zero + m, lv = zero + ls, cv = zero + coef, smv = zero + sm;
    const float zy = zr[y];
    int64_t j = 0;
    for (; j + 2 * CVL <= k; j += 2 * CVL) {
        const cvf a = vexp((cvld(zr + j) - mv) - lv), b = vexp((cvld(zr + j + CVL) - mv) - lv);
        cvst(orow + j, a * cv - (w ? smv * cvld(w + j) : smv));
        cvst(orow + j + CVL, b * cv - (w ? smv * cvld(w + j + CVL) : smv));
    }
    for (; j < k; j += CVL) { /* at most one whole vector, then the masked rest */
        const int64_t n = k - j < CVL ? k - j : CVL;
        const float ninf = -__builtin_inff();
        const cvf a = vexp(((n == CVL ? cvld(zr + j) : cvld_part(zr + j, n, ninf)) - mv) - lv);
        const cvf ws = w ? smv * (n == CVL ? cvld(w + j) : cvld_part(w + j, n, 0.0f)) : smv;
        if (n == CVL)
            cvst(orow + j, a * cv - ws);
        else
            cvst_part(orow + j, a * cv - ws, n);
    }
    orow[y] = exp_f32((zy - m) - ls) * coef - sm * (w ? w[y] : 1.0f) - gy;
}
#endif /* SOFTJAC_VEC */

/* Cross-entropy with class-index targets, float32 math (float/half/bfloat16 logits); the
 * formulas of softjac._core.ce_forward_last / ce_backward_last.
 *   forward, per row (read once from DRAM, the second pass from cache):
 *     m = max z (0 if all -inf);  ls = log sum exp(z - m)  (lse = m + ls, never rounded as one)
 *     loss = (1 - eps) w_y (ls - (z_y - m)) + (eps / K) (W ls - sum_c w_c (z_c - m));  0 if ignored
 *   backward, per element (one read, one write; `out` may be `z` itself):
 *     g [exp((z_j - m) - ls) ((1 - eps) w_y + (eps / K) W) - (1 - eps) w_y [j = y] - (eps / K) w_j]
 *     and exactly 0 on ignored rows.
 * Every lse - z_c is ls - (z_c - m): z_c - m is exact near the maximum and ls is in
 * [0, log K], so errors scale with the row's spread, not with |m|; K = 1 gives exactly 0.
 * NaN logits make the row's m, ls, loss and gradient NaN (exp(NaN) = NaN, the max skips NaN
 * but z - m does not); a +inf logit gives inf - inf = NaN; -inf is a masked class.
 * Targets are validated by the caller (0 <= y < K or y == ignore_index).
 * `w` is NULL for unit weights. */
#define DEFINE_CE(SUFFIX, T, LOAD, STORE)                                                        \
    int softjac_ce_fwd_##SUFFIX(const T *z, const int64_t *tgt, const float *w, float w_sum,     \
                                float *loss, float *m_out, float *ls_out, int64_t n, int64_t k,  \
                                int64_t sz, int64_t ignore_index, float eps, int nthreads) {     \
        nthreads = clamp_threads(nthreads, n, k);                                                 \
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
            if (m == -__builtin_inff()) m = 0.0f;                                                 \
            double se = 0, swz = 0;                                                               \
            for (int64_t b = 0; b < k; b += BLK) {                                                \
                const int64_t e = b + BLK < k ? b + BLK : k;                                      \
                float sb = 0, wb = 0;                                                             \
                if (eps > 0) {                                                                    \
                    _Pragma("omp simd reduction(+ : sb, wb)")                                    \
                    for (int64_t j = b; j < e; ++j) {                                             \
                        const float d = LOAD(zr + j) - m;                                         \
                        sb += exp_f32(d);                                                         \
                        wb += (w ? w[j] : 1.0f) * d;                                              \
                    }                                                                             \
                } else {                                                                          \
                    _Pragma("omp simd reduction(+ : sb)")                                        \
                    for (int64_t j = b; j < e; ++j) sb += exp_f32(LOAD(zr + j) - m);              \
                }                                                                                 \
                se += sb;                                                                         \
                swz += wb;                                                                        \
            }                                                                                     \
            const float ls = (float)__builtin_log(se);                                            \
            m_out[i] = m;                                                                         \
            ls_out[i] = ls;                                                                       \
            const int64_t y = tgt[i];                                                             \
            if (y == ignore_index) {                                                              \
                loss[i] = 0.0f;                                                                   \
                continue;                                                                         \
            }                                                                                     \
            const float wy = w ? w[y] : 1.0f;                                                     \
            float li = (1.0f - eps) * wy * (ls - (LOAD(zr + y) - m));                             \
            if (eps > 0) li += (eps / (float)k) * (w_sum * ls - (float)swz);                      \
            loss[i] = li;                                                                         \
        }                                                                                         \
        return 0;                                                                                 \
    }                                                                                             \
    int softjac_ce_bwd_##SUFFIX(const T *z, const int64_t *tgt, const float *w, float w_sum,     \
                                const float *m_in, const float *ls_in, const float *grad,        \
                                T *out, int64_t n, int64_t k, int64_t sz, int64_t so,            \
                                int64_t ignore_index, float eps, int nthreads) {                 \
        nthreads = clamp_threads(nthreads, n, k);                                                 \
        if (so == k && (const void *)out != (const void *)z)                                      \
            advise_huge(out, n * k * (int64_t)sizeof(T));                                         \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_PARALLEL_ROWS                                                                          \
        for (int64_t i = 0; i < n; ++i) {                                                         \
            const T *zr = z + i * sz;                                                             \
            T *orow = out + i * so;                                                               \
            const int64_t y = tgt[i];                                                             \
            if (y == ignore_index) {                                                              \
                for (int64_t j = 0; j < k; ++j) STORE(orow + j, 0.0f);                            \
                continue;                                                                         \
            }                                                                                     \
            const float g = grad[i];                                                              \
            const float wy = w ? w[y] : 1.0f;                                                     \
            const float coef = g * ((1.0f - eps) * wy + (eps / (float)k) * w_sum);                \
            const float sm = g * eps / (float)k;                                                  \
            const float m = m_in[i], ls = ls_in[i];                                               \
            CE_BWD_FAST_##SUFFIX                                                                  \
            const float zy = LOAD(zr + y);                                                        \
            _Pragma("omp simd")                                                                  \
            for (int64_t j = 0; j < k; ++j) {                                                     \
                const float pj = exp_f32((LOAD(zr + j) - m) - ls);                                \
                STORE(orow + j, pj * coef - sm * (w ? w[j] : 1.0f));                              \
            }                                                                                     \
            const float py = exp_f32((zy - m) - ls);                                              \
            STORE(orow + y, py * coef - sm * (w ? w[y] : 1.0f) - g * (1.0f - eps) * wy);          \
        }                                                                                         \
        return 0;                                                                                 \
    }

/* Float32 rows take the vector-type row functions; the loops below serve half logits. */
#ifdef SOFTJAC_VEC
#define CE_FWD_FAST_f32                                                                           \
    ce_fwd_row_f32_vec(zr, tgt[i], w, w_sum, k, ignore_index, eps, loss + i, m_out + i,           \
                       ls_out + i);                                                               \
    continue;
#define CE_BWD_FAST_f32                                                                           \
    ce_bwd_row_f32_vec(zr, orow, y, w, m, ls, coef, sm, g * (1.0f - eps) * wy, k);                \
    continue;
#else
#define CE_FWD_FAST_f32
#define CE_BWD_FAST_f32
#endif
#define CE_FWD_FAST_bf16
#define CE_BWD_FAST_bf16
#define CE_FWD_FAST_f16
#define CE_BWD_FAST_f16

DEFINE_CE(f32, float, LOAD_F32, STORE_F32)
DEFINE_CE(bf16, bf16_t, LOAD_BF16, STORE_BF16)
DEFINE_CE(f16, f16_t, LOAD_F16, STORE_F16)
