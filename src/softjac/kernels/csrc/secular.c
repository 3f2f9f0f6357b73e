/* softjac secular-equation solver: the fused CPU loop of softjac._spectral._solve_roots.
 *
 * Plain C (no Python headers), built at install time by softjac/kernels/_cbuild.py (one
 * library per instruction-set variant) and loaded with ctypes; the PyTorch loop in
 * _spectral.py is the reference and the fallback.  The four sums of one evaluation,
 *   |tau| (psi, phi) and tau^2 (psi', phi') at lambda = o + tau,
 * are the whole O(K^2) cost of the solver; here they take one pass per row and iteration.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

/* |tau|*(psi, phi) and tau^2*(psi', phi') at lambda = o + tau for one row. */
#define SUMS(T)                                                                            \
  static inline void sums_##T(const T* sr, const T* cr, int64_t k, T o, T t0, double* p) { \
    const T sc = t0 < 0 ? -t0 : t0;                                                        \
    double p0 = 0, p1 = 0, p2 = 0, p3 = 0;                                                 \
    _Pragma("omp simd reduction(+:p0,p1,p2,p3)")                                           \
    for (int64_t j = 0; j < k; ++j) {                                                      \
      T inv = sc / ((sr[j] - o) - t0);                                                     \
      T ng = inv < 0 ? inv : (T)0;                                                         \
      T ps = inv - ng;                                                                     \
      T w = cr[j];                                                                         \
      p0 += w * ng; p1 += w * ps; p2 += (w * ng) * ng; p3 += (w * ps) * ps;                \
    }                                                                                      \
    p[0] = (T)p0; p[1] = (T)p1; p[2] = (T)p2; p[3] = (T)p3;                                \
  }
SUMS(double)
SUMS(float)

#define SOLVE(NAME, T, EPS, TINY)                                                          \
void NAME(const T* s, const T* c, const int64_t* rb, const int64_t* lo, const int64_t* hi, \
          int64_t* o_out, T* tau_out, int64_t n, int64_t k, int max_iter, int nthreads) {  \
  const double tol = EPS * fmax(8.0, 2.0 * sqrt((double)k));                               \
  const double small = sqrt(EPS) / 16;                                                     \
  _Pragma("omp parallel for schedule(dynamic, 16) num_threads(nthreads)")                  \
  for (int64_t r = 0; r < n; ++r) {                                                        \
    const T* sr = s + rb[r] * k;                                                           \
    const T* cr = c + rb[r] * k;                                                           \
    const T s_lo = sr[lo[r]], s_hi = sr[hi[r]];                                            \
    const T gap = s_hi - s_lo, half = gap / 2;                                             \
    int lft = 1, first = 1;                                                                \
    int64_t o = lo[r];                                                                     \
    T so = s_lo, d_lo = 0, d_hi = gap, tau = half, lo_b = 0, hi_b = gap;                   \
    double p[4];                                                                           \
    for (int it = 0; it < max_iter; ++it) {                                                \
      const T scale = tau < 0 ? -tau : tau;                                                \
      sums_##T(sr, cr, k, so, tau, p);                                                     \
      T nrm = (T)(p[1] - p[0]);                                                            \
      if (!(nrm > TINY)) nrm = TINY;                                                       \
      const T psi = (T)p[0] / nrm, phi = (T)p[1] / nrm;                                    \
      const T dpsi = (T)p[2] / nrm, dphi = (T)p[3] / nrm;                                  \
      const T g = psi + phi;                                                               \
      if (g > 0) hi_b = tau;                                                               \
      if (g < 0) lo_b = tau;                                                               \
      const T t_l = (d_lo - tau) / scale, t_r = (d_hi - tau) / scale;                      \
      const T a_l = dpsi * t_l * t_l, a_r = dphi * t_r * t_r;                              \
      const T cc = (psi - dpsi * t_l) + (phi - dphi * t_r);                                \
      const T a_o = lft ? a_l : a_r, a_x = lft ? a_r : a_l;                                \
      const T t_o = lft ? t_l : t_r;                                                       \
      const T dd = (lft ? t_r : t_l) - t_o;                                                \
      const T qa = a_o * dd, qb = a_o + a_x + cc * dd;                                     \
      T disc = qb * qb - 4 * qa * cc;                                                      \
      disc = disc > 0 ? sqrt(disc) : (T)0;                                                 \
      const T q = (T)0.5 * (qb + copysign(disc, qb));                                      \
      const T u1 = qa / q, u2 = q / cc;                                                    \
      const T lo_u = dd < 0 ? dd : (T)0, hi_u = dd > 0 ? dd : (T)0;                        \
      const T u = (isfinite(u1) && u1 > lo_u && u1 < hi_u) ? u1 : u2;                      \
      T nw = u * scale;                                                                    \
      const T eta_s = u + t_o;                                                             \
      if (first) {                                                                         \
        first = 0;                                                                         \
        const int left = g >= 0;                                                           \
        o = left ? lo[r] : hi[r];                                                          \
        so = left ? s_lo : s_hi;                                                           \
        d_lo = s_lo - so;                                                                  \
        d_hi = s_hi - so;                                                                  \
        lft = left;                                                                        \
        lo_b = left ? (T)0 : half - gap;                                                   \
        hi_b = left ? half : (T)0;                                                         \
        const T mid_tau = left ? half : half - gap;                                        \
        if (!left) nw = nw - gap;                                                          \
        const int ok = isfinite(nw) && nw > lo_b && nw < hi_b && nw != 0;                  \
        tau = g == 0 ? mid_tau : (ok ? nw : (T)0.5 * (lo_b + hi_b));                       \
        continue;                                                                          \
      }                                                                                    \
      const int conv = ((g < 0 ? -g : g) <= tol || (eta_s < 0 ? -eta_s : eta_s) <= small)  \
                       && isfinite(u);                                                     \
      const int inside = isfinite(nw) && nw >= lo_b && nw <= hi_b;                         \
      if (!(inside || conv)) nw = (T)0.5 * (lo_b + hi_b);                                  \
      if (nw == 0 || g == 0) nw = tau;                                                     \
      const T width = hi_b - lo_b;                                                         \
      const int stall = nw == lo_b || nw == hi_b;                                          \
      const T edge = fmax(fabs((double)lo_b), fabs((double)hi_b));                         \
      const int done = conv || stall || g == 0 || width <= 8 * tol * edge;                 \
      tau = nw;                                                                            \
      if (done) break;                                                                     \
    }                                                                                      \
    o_out[r] = o;                                                                          \
    tau_out[r] = tau;                                                                      \
  }                                                                                        \
}
SOLVE(softjac_secular_solve_f64, double, DBL_EPSILON, DBL_MIN)
SOLVE(softjac_secular_solve_f32, float, FLT_EPSILON, FLT_MIN)
