/* softjac CPU kernels: vectorisable exp for float (flushing, exp_f32; full range down to the
 * smallest subnormal, exp_full_f32) and their lane-by-lane vector forms. */
#ifndef SOFTJAC_EXP_H
#define SOFTJAC_EXP_H

#include "simd.h"

/* The degree-6 polynomial of exp on [-ln2/2, ln2/2]: exp(r) ~ 1 + r + r^2 (C2 + C3 r + ... +
 * C6 r^4), the coefficients fitted for the least maximum relative error (Lawson's iteration
 * on Chebyshev nodes against 40-digit values): 4.2e-9 with these float32 coefficients, as
 * small as the degree-7 Taylor polynomial's 3e-9 and far below float32 rounding, for one
 * multiply-add less. */
#define EXP_C2 0x1.fffffcp-2f
#define EXP_C3 0x1.555490p-3f
#define EXP_C4 0x1.5558f8p-5f
#define EXP_C5 0x1.123b04p-7f
#define EXP_C6 0x1.6a2256p-10f

/* exp(xc) = 2^n exp(r) for r = xc - n ln2 (the two-part Cody-Waite reduction) and the
 * n = rint(xc log2 e) of the caller, with scale = 2^n: exp(r) = 1 + r q(r) with
 * q = 1 + r P(r) (the polynomial above; P by Estrin's scheme, r^2 formed beside the first
 * terms), and the result as 2^n + (2^n r) q in one fused multiply-add, so that q's own
 * rounding enters scaled by |r| <= 0.35 and the result is rounded once (within 0.93 ulp of
 * exp, measured over every float argument up to 88), in five dependent steps (Horner's form
 * takes eight).  Shared by every exp here, scalar and vector alike. */
static inline float exp_reduced_f32(float xc, float n, float scale) {
    float r = __builtin_fmaf(n, -0.693145751953125f, xc);
    r = __builtin_fmaf(n, -1.428606765330187045e-06f, r);
    const float r2 = r * r;
    const float a = __builtin_fmaf(r, EXP_C3, EXP_C2);
    const float b = __builtin_fmaf(r, EXP_C5, EXP_C4);
    const float p = __builtin_fmaf(r2, __builtin_fmaf(r2, EXP_C6, b), a);
    const float q = __builtin_fmaf(r, p, 1.0f);
    return __builtin_fmaf(r * scale, q, scale);
}

/* exp(x) for float, vectorisable (no libm call): x = n ln2 + r with |r| <= ln2/2, exp(r) as
 * above, 2^n built in the exponent bits.  Results below 2^-126 (x < -87.33, including
 * x = -inf) are flushed to 0: such a probability contributes less than 1.2e-38 to any entry. */
static inline float exp_f32(float x) {
    const float lo = -87.33f;
    const float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return x < lo ? 0.0f : exp_reduced_f32(xc, n, scale);
}

static inline double exp_f64(double x) { return __builtin_exp(x); }

/* exp(x) for x <= 0 (and -inf, NaN): the reduction and polynomial of exp_f32, scaled by 2^n in two steps below 2^-126 (2^(n+64), exact, then 2^-64, the one
 * rounding into the subnormal range); 0 below -103.98 (under half the smallest subnormal).
 * Only entries whose exp is subnormal pay the processor's subnormal assist. */
static inline float exp_full_f32(float x) {
    const float lo = -103.98f;
    const float xc = x < lo || x != x ? 0.0f : x; /* lanes returned as 0 or NaN compute exp(0) */
    const float n = __builtin_rintf(xc * 1.44269504088896341f);
    const int32_t ni = (int32_t)n;
    const int small = ni < -126;
    const int32_t bits = ((small ? ni + 64 : ni) + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    const float res = exp_reduced_f32(xc, n, scale) * (small ? 5.421010862427522e-20f : 1.0f);
    return x != x ? x : (x < lo ? 0.0f : res);
}

#ifdef SOFTJAC_VEC
/* vexp is exp_f32 lane by lane (same clamp, same
 * rounding of n: adding and subtracting 1.5 * 2^23 rounds to nearest even like rintf for
 * |x log2 e| < 2^22, the same FMA polynomial); n may differ by one from rintf's in a near-tie
 * where the product is fused into the rounding add, which leaves |r| a hair above ln2/2 and the
 * result as accurate. */
/* exp_reduced_f32 lane by lane (the same fused operations: GCC contracts a * b + c). */
static inline cvf vexp_reduced(cvf xc, cvf n, cvf scale) {
    cvf r = n * -0.693145751953125f + xc;
    r = n * -1.428606765330187045e-06f + r;
    const cvf r2 = r * r;
    const cvf a = r * EXP_C3 + EXP_C2, b = r * EXP_C5 + EXP_C4;
    const cvf p = r2 * (r2 * EXP_C6 + b) + a;
    const cvf q = r * p + 1.0f;
    return (r * scale) * q + scale;
}

static inline cvf vexp(cvf x) {
    const cvf zero = {0};
    const cvf lo = zero - 87.33f, hi = zero + 88.0f, magic = zero + 12582912.0f;
    const cvi under = x < lo;
    cvf xc = (cvf)(((cvi)lo & under) | ((cvi)x & ~under));
    const cvi over = xc > hi;
    xc = (cvf)(((cvi)hi & over) | ((cvi)xc & ~over));
    const cvf n = (xc * 1.44269504088896341f + magic) - magic;
    const cvf scale = (cvf)((__builtin_convertvector(n, cvi) + 127) << 23);
    return (cvf)((cvi)vexp_reduced(xc, n, scale) & ~under);
}

static inline cvf vexp_full(cvf x) {
    const cvf zero = {0};
    const cvf lo = zero - 103.98f, magic = zero + 12582912.0f;
    const cvi under = x < lo, nan = x != x;
    const cvf xc = (cvf)((cvi)x & ~under & ~nan); /* lanes returned as 0 or NaN compute exp(0) */
    const cvf n = (xc * 1.44269504088896341f + magic) - magic;
    const cvi ni = __builtin_convertvector(n, cvi);
    const cvi small = ni < -126;
    const cvi bits = ((ni + (small & 64)) + 127) << 23;
    /* the second factor is 2^-64 only where the result is subnormal: a product with a
     * subnormal result costs a microcode assist (about 150 cycles on Intel), so no other lane
     * may make one, not even one whose result is discarded */
    const cvf factor = (cvf)(((cvi)(zero + 5.421010862427522e-20f) & small) |
                             ((cvi)(zero + 1.0f) & ~small));
    const cvf res = vexp_reduced(xc, n, (cvf)bits) * factor;
    return (cvf)(((cvi)x & nan) | ((cvi)res & ~under & ~nan));
}
/* vexp_full for arguments x <= 0 or -inf, never NaN (z - max z of a row without NaN), with
 * the same result bit for bit, and about half its work where every lane is at least -87.33
 * (so that every result is a normal number: n >= -126, no clamp, no second scale, no NaN or
 * underflow select): such a vector, by far the common one, skips straight to the reduction,
 * the polynomial and the exponent bits; any other (masked -inf entries, exp in the subnormal
 * range) takes vexp_full, behind a branch that is almost never taken in unmasked rows. */
static inline cvf vexp_nonpos(cvf x) {
    const cvf zero = {0};
    if (__builtin_expect(cv_any(x < zero - 87.33f), 0)) return vexp_full(x);
    const cvf magic = zero + 12582912.0f;
    const cvf t = x * 1.44269504088896341f + magic; /* n in the low mantissa bits */
    /* 2^n without a conversion: t's bits shifted left by 23 are n << 23 (magic's own bits
     * shift out) */
    const cvf scale = (cvf)(((cvi)t << 23) + (127 << 23));
    return vexp_reduced(x, t - magic, scale);
}
#endif /* SOFTJAC_VEC */

#endif /* SOFTJAC_EXP_H */
