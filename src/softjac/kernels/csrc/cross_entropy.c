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
        SJ_FOR_ROWS_##SUFFIX(n * k * (int64_t)sizeof(T), {                                        \
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
        })                                                                                        \
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
        SJ_FOR_ROWS_##SUFFIX(n * k * (int64_t)sizeof(T), {                                        \
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
        })                                                                                        \
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
/* Half logits: the row widened into float32 scratch and the float32 row function on it
 * (common.h); the same formulas, in float32 either way. */
#ifdef SOFTJAC_VEC
#define CE_FWD_FAST_HALF(SUFFIX)                                                                  \
    {                                                                                             \
        float *zs = half_scratch(k);                                                              \
        if (zs) {                                                                                 \
            widen_##SUFFIX(zr, zs, k);                                                            \
            ce_fwd_row_f32_vec(zs, tgt[i], w, w_sum, k, ignore_index, eps, loss + i, m_out + i,   \
                               ls_out + i);                                                       \
            continue;                                                                             \
        }                                                                                         \
    }
#define CE_BWD_FAST_HALF(SUFFIX)                                                                  \
    {                                                                                             \
        float *zs = half_scratch(k);                                                              \
        if (zs) {                                                                                 \
            widen_##SUFFIX(zr, zs, k);                                                            \
            ce_bwd_row_f32_vec(zs, zs, y, w, m, ls, coef, sm, g * (1.0f - eps) * wy, k);          \
            narrow_##SUFFIX(zs, orow, k);                                                         \
            continue;                                                                             \
        }                                                                                         \
    }
#define CE_FWD_FAST_bf16 CE_FWD_FAST_HALF(bf16)
#define CE_BWD_FAST_bf16 CE_BWD_FAST_HALF(bf16)
#define CE_FWD_FAST_f16 CE_FWD_FAST_HALF(f16)
#define CE_BWD_FAST_f16 CE_BWD_FAST_HALF(f16)
#else
#define CE_FWD_FAST_bf16
#define CE_BWD_FAST_bf16
#define CE_FWD_FAST_f16
#define CE_BWD_FAST_f16
#endif

DEFINE_CE(f32, float, LOAD_F32, STORE_F32)
DEFINE_CE(bf16, bf16_t, LOAD_BF16, STORE_BF16)
DEFINE_CE(f16, f16_t, LOAD_F16, STORE_F16)

/* softjac_ce_{fwd,bwd}_inner_f32: the same forward and backward for float32 logits laid out as
 * contiguous (nb, k, m) with the class dim in the middle (cross-entropy over dim 1 of an NCHW
 * tensor): row (i, c) is z[i, :, c], with stride m; targets, losses, m, ls and the incoming
 * gradient are (nb, m) arrays, the gradient comes back in the (nb, k, m) layout.  Instead of
 * copying the logits into rows and the gradient back (two transposes), each task takes a tile
 * of up to CE_IT columns c and sweeps j = 0..k-1, loading the tile's contiguous entries per j
 * (SIMD across c): a max sweep, then an exp-sum sweep from cache (float partials over BLK
 * entries of j, added in double), the same formulas per column as the row kernels.  The
 * backward's incoming gradient has stride sg (0: one value for every row, as a 'mean' gives). */
#define CE_IT 256

static inline int64_t ce_inner_tile(int64_t k, int64_t m) {
    int64_t t = ((int64_t)1 << 21) / (4 * (k > 0 ? k : 1)); /* 2 MiB of logits per tile */
    t = t < 16 ? 16 : (t > CE_IT ? CE_IT : t & ~(int64_t)15);
    return t < m ? t : m;
}

static void ce_fwd_inner_tile_f32(const float *z, const int64_t *tgt, const float *w, float w_sum,
                                  float *loss, float *m_out, float *ls_out, int64_t k, int64_t m,
                                  int64_t tw, int64_t ignore_index, float eps) {
    float mx[CE_IT], sb[CE_IT], wb[CE_IT];
    double se[CE_IT], swz[CE_IT];
    for (int64_t c = 0; c < tw; ++c) {
        mx[c] = -__builtin_inff();
        se[c] = 0;
        swz[c] = 0;
    }
    for (int64_t j = 0; j < k; ++j) {
        const float *zj = z + j * m;
        _Pragma("omp simd")
        for (int64_t c = 0; c < tw; ++c) mx[c] = zj[c] > mx[c] ? zj[c] : mx[c];
    }
    for (int64_t c = 0; c < tw; ++c)
        if (mx[c] == -__builtin_inff()) mx[c] = 0.0f;
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        for (int64_t c = 0; c < tw; ++c) {
            sb[c] = 0;
            wb[c] = 0;
        }
        for (int64_t j = b; j < e; ++j) {
            const float *zj = z + j * m;
            if (eps > 0) {
                const float wj = w ? w[j] : 1.0f;
                _Pragma("omp simd")
                for (int64_t c = 0; c < tw; ++c) {
                    const float d = zj[c] - mx[c];
                    sb[c] += exp_f32(d);
                    wb[c] += wj * d;
                }
            } else {
                _Pragma("omp simd")
                for (int64_t c = 0; c < tw; ++c) sb[c] += exp_f32(zj[c] - mx[c]);
            }
        }
        for (int64_t c = 0; c < tw; ++c) {
            se[c] += sb[c];
            swz[c] += wb[c];
        }
    }
    for (int64_t c = 0; c < tw; ++c) {
        const float ls = (float)__builtin_log(se[c]);
        m_out[c] = mx[c];
        ls_out[c] = ls;
        const int64_t y = tgt[c];
        if (y == ignore_index) {
            loss[c] = 0.0f;
            continue;
        }
        const float wy = w ? w[y] : 1.0f;
        float li = (1.0f - eps) * wy * (ls - (z[y * m + c] - mx[c]));
        if (eps > 0) li += (eps / (float)k) * (w_sum * ls - (float)swz[c]);
        loss[c] = li;
    }
}

/* Per column c of a backward tile: cf = g ((1 - eps) w_y + (eps / K) W), sm = g eps / K, and
 * keep = -1 (all bits, a lane mask) for a valid target, 0 for an ignored one. */
static void ce_bwd_tile_coefs(const int64_t *tgt, const float *w, float w_sum, const float *grad,
                              int64_t sg, int64_t k, int64_t tw, int64_t ignore_index, float eps,
                              float *cf, float *sm, int32_t *keep) {
    for (int64_t c = 0; c < tw; ++c) {
        const int64_t y = tgt[c];
        const int valid = y != ignore_index;
        const float g = valid ? grad[c * sg] : 0.0f;
        const float wy = valid ? (w ? w[y] : 1.0f) : 0.0f;
        cf[c] = g * ((1.0f - eps) * wy + (eps / (float)k) * w_sum);
        sm[c] = g * eps / (float)k;
        keep[c] = valid ? -1 : 0;
    }
}

static void ce_bwd_inner_tile_f32(const float *z, const int64_t *tgt, const float *w, float w_sum,
                                  const float *m_in, const float *ls_in, const float *grad,
                                  int64_t sg, float *out, int64_t k, int64_t m, int64_t tw,
                                  int64_t ignore_index, float eps) {
    float mv[CE_IT], lv[CE_IT], cf[CE_IT], sm[CE_IT];
    int32_t keep[CE_IT];
    ce_bwd_tile_coefs(tgt, w, w_sum, grad, sg, k, tw, ignore_index, eps, cf, sm, keep);
    for (int64_t c = 0; c < tw; ++c) {
        mv[c] = m_in[c];
        lv[c] = ls_in[c];
    }
    for (int64_t j = 0; j < k; ++j) {
        const float *zj = z + j * m;
        float *oj = out + j * m;
        const float wj = w ? w[j] : 1.0f;
        _Pragma("omp simd")
        for (int64_t c = 0; c < tw; ++c) {
            const float r = exp_f32((zj[c] - mv[c]) - lv[c]) * cf[c] - sm[c] * wj;
            oj[c] = keep[c] ? r : 0.0f; /* ignored rows: exactly 0 whatever z holds */
        }
    }
    for (int64_t c = 0; c < tw; ++c) {
        const int64_t y = tgt[c];
        if (y == ignore_index) continue;
        out[y * m + c] -= grad[c * sg] * (1.0f - eps) * (w ? w[y] : 1.0f);
    }
}

#ifdef SOFTJAC_VEC
/* The tile functions above with the vector types, for a tile width that is a multiple of CVL
 * (the few remaining columns of a row block take the scalar ones): gcc keeps the per-column
 * state of the `omp simd` loops in lane arrays in memory; here it is CE_IT / CVL vectors.
 * Same formulas and blocked sums. */
#define CE_NV (CE_IT / CVL)

static void ce_fwd_inner_tile_f32_vec(const float *z, const int64_t *tgt, const float *w,
                                      float w_sum, float *loss, float *m_out, float *ls_out,
                                      int64_t k, int64_t m, int64_t tw, int64_t ignore_index,
                                      float eps) {
    const cvf zero = {0};
    const float ninf = -__builtin_inff();
    const int64_t nv = tw / CVL;
    cvf mx[CE_NV], sb[CE_NV], wb[CE_NV];
    double se[CE_IT], swz[CE_IT];
    for (int64_t v = 0; v < nv; ++v) mx[v] = zero + ninf;
    for (int64_t j = 0; j < k; ++j) {
        const float *zj = z + j * m;
        for (int64_t v = 0; v < nv; ++v) mx[v] = cvmax(cvld(zj + v * CVL), mx[v]);
    }
    for (int64_t v = 0; v < nv; ++v) { /* a fully masked column: m = 0 */
        const cvi dead = mx[v] == zero + ninf;
        mx[v] = (cvf)((cvi)mx[v] & ~dead);
    }
    for (int64_t c = 0; c < tw; ++c) {
        se[c] = 0;
        swz[c] = 0;
    }
    for (int64_t b = 0; b < k; b += BLK) {
        const int64_t e = b + BLK < k ? b + BLK : k;
        for (int64_t v = 0; v < nv; ++v) {
            sb[v] = zero;
            wb[v] = zero;
        }
        for (int64_t j = b; j < e; ++j) {
            const float *zj = z + j * m;
            if (eps > 0) {
                const float wj = w ? w[j] : 1.0f;
                for (int64_t v = 0; v < nv; ++v) {
                    const cvf d = cvld(zj + v * CVL) - mx[v];
                    sb[v] += vexp(d);
                    wb[v] += wj * d;
                }
            } else {
                for (int64_t v = 0; v < nv; ++v) sb[v] += vexp(cvld(zj + v * CVL) - mx[v]);
            }
        }
        for (int64_t v = 0; v < nv; ++v) {
            float s[CVL], t[CVL];
            memcpy(s, &sb[v], sizeof s);
            memcpy(t, &wb[v], sizeof t);
            for (int64_t l = 0; l < CVL; ++l) {
                se[v * CVL + l] += s[l];
                swz[v * CVL + l] += t[l];
            }
        }
    }
    for (int64_t v = 0; v < nv; ++v) cvst(m_out + v * CVL, mx[v]);
    for (int64_t c = 0; c < tw; ++c) {
        const float ls = (float)__builtin_log(se[c]), mc = m_out[c];
        ls_out[c] = ls;
        const int64_t y = tgt[c];
        if (y == ignore_index) {
            loss[c] = 0.0f;
            continue;
        }
        const float wy = w ? w[y] : 1.0f;
        float li = (1.0f - eps) * wy * (ls - (z[y * m + c] - mc));
        if (eps > 0) li += (eps / (float)k) * (w_sum * ls - (float)swz[c]);
        loss[c] = li;
    }
}

static void ce_bwd_inner_tile_f32_vec(const float *z, const int64_t *tgt, const float *w,
                                      float w_sum, const float *m_in, const float *ls_in,
                                      const float *grad, int64_t sg, float *out, int64_t k,
                                      int64_t m, int64_t tw, int64_t ignore_index, float eps) {
    const int64_t nv = tw / CVL;
    float cfs[CE_IT], sms[CE_IT];
    int32_t keeps[CE_IT];
    ce_bwd_tile_coefs(tgt, w, w_sum, grad, sg, k, tw, ignore_index, eps, cfs, sms, keeps);
    cvf mv[CE_NV], lv[CE_NV], cf[CE_NV], sm[CE_NV];
    cvi keep[CE_NV];
    for (int64_t v = 0; v < nv; ++v) {
        mv[v] = cvld(m_in + v * CVL);
        lv[v] = cvld(ls_in + v * CVL);
        cf[v] = cvld(cfs + v * CVL);
        sm[v] = cvld(sms + v * CVL);
        memcpy(&keep[v], keeps + v * CVL, sizeof keep[v]);
    }
    for (int64_t j = 0; j < k; ++j) {
        const float *zj = z + j * m;
        float *oj = out + j * m;
        const float wj = w ? w[j] : 1.0f;
        for (int64_t v = 0; v < nv; ++v) {
            const cvf r = vexp((cvld(zj + v * CVL) - mv[v]) - lv[v]) * cf[v] - sm[v] * wj;
            cvst(oj + v * CVL, (cvf)((cvi)r & keep[v])); /* ignored rows: exactly 0 */
        }
    }
    for (int64_t c = 0; c < tw; ++c) {
        const int64_t y = tgt[c];
        if (y == ignore_index) continue;
        out[y * m + c] -= grad[c * sg] * (1.0f - eps) * (w ? w[y] : 1.0f);
    }
}
#endif /* SOFTJAC_VEC */

/* One tile of tw columns: the vector functions on the whole vectors, the scalar ones on the
 * rest. */
static void ce_fwd_inner_tile(const float *z, const int64_t *tgt, const float *w, float w_sum,
                              float *loss, float *m_out, float *ls_out, int64_t k, int64_t m,
                              int64_t tw, int64_t ignore_index, float eps) {
    int64_t c0 = 0;
#ifdef SOFTJAC_VEC
    c0 = tw / CVL * CVL;
    if (c0)
        ce_fwd_inner_tile_f32_vec(z, tgt, w, w_sum, loss, m_out, ls_out, k, m, c0, ignore_index,
                                  eps);
#endif
    if (c0 < tw)
        ce_fwd_inner_tile_f32(z + c0, tgt + c0, w, w_sum, loss + c0, m_out + c0, ls_out + c0, k,
                              m, tw - c0, ignore_index, eps);
}

static void ce_bwd_inner_tile(const float *z, const int64_t *tgt, const float *w, float w_sum,
                              const float *m_in, const float *ls_in, const float *grad,
                              int64_t sg, float *out, int64_t k, int64_t m, int64_t tw,
                              int64_t ignore_index, float eps) {
    int64_t c0 = 0;
#ifdef SOFTJAC_VEC
    c0 = tw / CVL * CVL;
    if (c0)
        ce_bwd_inner_tile_f32_vec(z, tgt, w, w_sum, m_in, ls_in, grad, sg, out, k, m, c0,
                                  ignore_index, eps);
#endif
    if (c0 < tw)
        ce_bwd_inner_tile_f32(z + c0, tgt + c0, w, w_sum, m_in + c0, ls_in + c0,
                              grad + c0 * sg, sg, out + c0, k, m, tw - c0, ignore_index, eps);
}

int softjac_ce_fwd_inner_f32(const float *z, const int64_t *tgt, const float *w, float w_sum,
                             float *loss, float *m_out, float *ls_out, int64_t nb, int64_t k,
                             int64_t m, int64_t ignore_index, float eps, int nthreads) {
    const int64_t tile = ce_inner_tile(k, m);
    const int64_t per_b = (m + tile - 1) / tile, ntask = nb * per_b;
    nthreads = clamp_threads(nthreads, ntask, k * tile);
    _Pragma("omp parallel for schedule(guided) num_threads(nthreads) if (nthreads > 1)")
    for (int64_t task = 0; task < ntask; ++task) {
        const int64_t i = task / per_b, c0 = (task % per_b) * tile;
        const int64_t tw = m - c0 < tile ? m - c0 : tile;
        const int64_t r = i * m + c0;
        ce_fwd_inner_tile(z + i * k * m + c0, tgt + r, w, w_sum, loss + r, m_out + r, ls_out + r,
                          k, m, tw, ignore_index, eps);
    }
    return 0;
}

int softjac_ce_bwd_inner_f32(const float *z, const int64_t *tgt, const float *w, float w_sum,
                             const float *m_in, const float *ls_in, const float *grad, int64_t sg,
                             float *out, int64_t nb, int64_t k, int64_t m, int64_t ignore_index,
                             float eps, int nthreads) {
    const int64_t tile = ce_inner_tile(k, m);
    const int64_t per_b = (m + tile - 1) / tile, ntask = nb * per_b;
    nthreads = clamp_threads(nthreads, ntask, k * tile);
    advise_huge(out, nb * k * m * (int64_t)sizeof(float));
    _Pragma("omp parallel for schedule(guided) num_threads(nthreads) if (nthreads > 1)")
    for (int64_t task = 0; task < ntask; ++task) {
        const int64_t i = task / per_b, c0 = (task % per_b) * tile;
        const int64_t tw = m - c0 < tile ? m - c0 : tile;
        const int64_t r = i * m + c0, off = i * k * m + c0;
        ce_bwd_inner_tile(z + off, tgt + r, w, w_sum, m_in + r, ls_in + r, grad + r * sg, sg,
                          out + off, k, m, tw, ignore_index, eps);
    }
    return 0;
}
