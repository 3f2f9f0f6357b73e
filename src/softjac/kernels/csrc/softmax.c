/* softjac CPU kernels: the softmax forward. */
#include "common.h"
#include "exp.h"
#include "simd.h"

/* softjac_softmax_<dt>(z, out, idx, n, k, sz, threads): sigma = exp(z - max z) / sum, float32
 * math for float32/bfloat16/float16 data (out contiguous (n, k)).  Per row: pass 1 the max (the
 * only read from DRAM), pass 2 e_j = exp(z_j - m) and S = sum e_j (float32 data: e_j stored
 * in out), pass 3 sigma_j = e_j (1 / S) (float32: from out, in cache; half types: exp again,
 * so that sigma is rounded once; a multiply rather than a division: the division's throughput
 * cost 15 % at K = 128, and the extra rounding leaves sigma within about 2 ulps).  exp is
 * exp_full_f32 (vexp_nonpos: the same values), exact to about an ulp down to the smallest
 * subnormal (unlike the flushing exp_f32 of the cross-entropy kernels, whose tiny
 * probabilities only enter sums).  A fully masked row (every z = -inf) gives zeros; a NaN or
 * +inf in a row gives NaNs throughout it, as PyTorch's softmax.
 *
 * idx (optional, NULL for none; needs k < 2^31): the first index of each row's largest logit,
 * which is also the first index of its largest probability, or -1 for a fully masked row or a
 * row with a NaN or +inf.  The VJP's argmax entry needs exactly that index
 * (softjac_vjp_idx_<dt> in vjp.c); the float32 row tracks it per lane in its max pass (a
 * compare and two blends per vector, measured 2-3 % of the row at K = 128, where a search
 * after the pass cost 15 %), which the backward would otherwise have to do in its own pass. */


#ifdef SOFTJAC_VEC
/* Needs k < 2^31 (lane indices are int32). */
static int32_t softmax_row_f32_vec(const float *z, float *out, int64_t k, int want_idx) {
    const float ninf = -__builtin_inff();
    const cvf zero = {0};
    cvi lane;
    for (int l = 0; l < CVL; ++l) lane[l] = l;
    /* per lane: the max and the first index holding it (a strict > keeps the first), so the
     * row's first argmax is the least index among the lanes that hold m: no search after */
    /* NaN: a NaN never wins a > (so it is not the max) and makes its exp, the sum, 1 / sum and
     * so every sigma_j NaN; only a row whose other entries are all -inf needs a look for it */
    cvf mv = zero + ninf;
    cvi iv = lane * 0 - 1, jv = lane;
    int64_t j = 0;
    for (; j + CVL <= k; j += CVL, jv += CVL) {
        const cvf x = cvld(z + j);
        const cvi g = x > mv;
        mv = (cvf)cvsel(g, (cvi)x, (cvi)mv);
        iv = cvsel(g, jv, iv);
    }
    if (j < k) {
        const cvf x = cvld_part(z + j, k - j, ninf);
        const cvi g = x > mv;
        mv = (cvf)cvsel(g, (cvi)x, (cvi)mv);
        iv = cvsel(g, jv, iv);
    }
    const float m = chmax(mv);
    if (m == ninf) { /* fully masked (zeros), unless the row holds a NaN */
        int nan = 0;
        for (j = 0; j < k; ++j) nan |= z[j] != z[j];
        if (!nan) {
            memset(out, 0, (size_t)k * sizeof(float));
            return -1;
        }
    }
    if (m == ninf || m == -ninf) { /* a +inf (or a NaN among -inf): NaN throughout */
        const float qnan = __builtin_nanf("");
        for (j = 0; j < k; ++j) out[j] = qnan;
        return -1;
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
            const cvf ex = vexp_nonpos(cvld(z + j) - mm);
            cvst(out + j, ex);
            sv += ex;
        }
        if (j < e) { /* -inf lanes give exp = 0 */
            ex_rest = vexp_nonpos(cvld_part(z + j, e - j, ninf) - mm);
            sv += ex_rest;
            j = e;
        }
        s_acc += (double)chsum(sv);
    }
    const float rs = 1.0f / (float)s_acc; /* NaN if the row holds a NaN */
    const cvf rss = zero + rs;
    for (j = 0; j < kv; j += CVL) cvst(out + j, cvld(out + j) * rss);
    if (kv < k) cvst_part(out + kv, ex_rest * rss, k - kv);
    if (!want_idx || s_acc != s_acc) return -1;
    const cvi big = lane * 0 + 0x7fffffff, h = (cvi)(mv == (zero + m));
    const cvi c = cvsel(h, iv, big);
    int32_t istar = c[0];
    for (int l = 1; l < CVL; ++l) istar = c[l] < istar ? c[l] : istar;
    return istar;
}
#define SOFTMAX_FAST_f32                                                                          \
    if (k < ((int64_t)1 << 31)) {                                                                 \
        const int32_t i_ = softmax_row_f32_vec(zr, orow, k, idx != 0);                            \
        if (idx) idx[i] = i_;                                                                     \
        continue;                                                                                 \
    }
#else
#define SOFTMAX_FAST_f32
#endif
#define SOFTMAX_FAST_bf16
#define SOFTMAX_FAST_f16

#define DEFINE_SOFTMAX(SUFFIX, T, LOAD, STORE)                                                    \
    int softjac_softmax_##SUFFIX(const T *z, T *out, int32_t *idx, int64_t n, int64_t k,        \
                                 int64_t sz, int nthreads) {                                      \
        nthreads = clamp_threads(nthreads, n, k);                                                 \
        advise_huge(out, n * k * (int64_t)sizeof(T));                                             \
        const int64_t chunk = rows_per_task(k);                                                   \
        SJ_FOR_ROWS_##SUFFIX(n * k * (int64_t)sizeof(T), {                                        \
            const T *zr = z + i * sz;                                                             \
            T *orow = out + i * k;                                                                \
            SOFTMAX_FAST_##SUFFIX                                                                 \
            float m = -__builtin_inff();                                                          \
            int nan = 0;                                                                          \
            _Pragma("omp simd reduction(max : m) reduction(| : nan)")                             \
            for (int64_t j = 0; j < k; ++j) {                                                     \
                const float x = LOAD(zr + j);                                                     \
                m = x > m ? x : m;                                                                \
                nan |= x != x;                                                                    \
            }                                                                                     \
            if (idx) idx[i] = -1;                                                                 \
            if (nan || m == __builtin_inff()) {                                                   \
                for (int64_t j = 0; j < k; ++j) STORE(orow + j, __builtin_nanf(""));              \
                continue;                                                                         \
            }                                                                                     \
            if (m == -__builtin_inff()) {                                                         \
                for (int64_t j = 0; j < k; ++j) STORE(orow + j, 0.0f);                            \
                continue;                                                                         \
            }                                                                                     \
            if (idx) {                                                                            \
                int64_t i_ = 0;                                                                   \
                while (LOAD(zr + i_) != m) ++i_;                                                  \
                idx[i] = (int32_t)i_;                                                             \
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
        })                                                                                        \
        return 0;                                                                                 \
    }

DEFINE_SOFTMAX(f32, float, LOAD_F32, STORE_F32)
DEFINE_SOFTMAX(bf16, bf16_t, LOAD_BF16, STORE_BF16)
DEFINE_SOFTMAX(f16, f16_t, LOAD_F16, STORE_F16)
