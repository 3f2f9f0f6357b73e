/* softjac CPU kernels: what every kernel family shares (includes, half-precision loads and
 * stores, the blocking and threading rules, huge-page advice).
 *
 * The kernels are plain C (no Python headers), one file per family (vjp.c, softmax.c,
 * cross_entropy.c, dense.c; secular.c is the separate secular-equation library), linked into
 * one shared library loaded with ctypes by softjac/kernels/_cpu.py.
 *
 * The softmax VJP  J v = p * (v - <p, v>)  with J = diag(p) - p p^T, one row at a time,
 * rows split across OpenMP threads.  Per row (K entries):
 *   pass 1 (the only read from DRAM):  s = sum_j p_j v_j,  m = max_j p_j,  i* = first argmax
 *   pass 2 (from cache, L2 or for very long rows L3):  out_j = p_j (v_j - s)  and
 *     t = sum_{j != i*} p_j (v_{i*} - v_j);  then  out_{i*} = p_{i*} t  (no cancellation,
 *     the same formula as softjac._core.vjp_last).
 * The _logits variants recompute p_j = exp(z_j - lse) on the fly (σ is never stored).
 * Accumulation is float for float/half/bfloat16 data, double for double data.
 * Rows with every p_j = 0 (masked) give zeros because every output is a multiple of p_j.
 */
#ifndef SOFTJAC_COMMON_H
#define SOFTJAC_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

/* Fresh outputs of tens of MB come straight from mmap, and on a VM the 4 KiB page faults
 * (with the kernel zeroing each page) cost more than the kernel itself.  Asking for
 * transparent huge pages on the 2 MiB-aligned interior of a large output, before the first
 * write, cuts the number of faults by 512.  A no-op where THP is off or unsupported. */
static inline void advise_huge(void *ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    if (nbytes < (int64_t)(4 * huge)) return;
    uintptr_t a = ((uintptr_t)ptr + huge - 1) & ~(huge - 1);
    uintptr_t b = ((uintptr_t)ptr + (uintptr_t)nbytes) & ~(huge - 1);
    if (b > a) madvise((void *)a, b - a, MADV_HUGEPAGE);
#else
    (void)ptr;
    (void)nbytes;
#endif
}

typedef uint16_t bf16_t;
typedef uint16_t f16_t;

static inline float bf16_load(const bf16_t *x) {
    uint32_t b = ((uint32_t)(*x)) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline void bf16_store(bf16_t *x, float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    if ((b & 0x7fffffffu) > 0x7f800000u) { /* NaN: keep it a quiet NaN */
        *x = (bf16_t)((b >> 16) | 0x0040u);
        return;
    }
    b += 0x7fffu + ((b >> 16) & 1u); /* round to nearest, ties to even */
    *x = (bf16_t)(b >> 16);
}

static inline float f16_load(const f16_t *x) {
    _Float16 h;
    memcpy(&h, x, 2);
    return (float)h;
}

static inline void f16_store(f16_t *x, float f) {
    _Float16 h = (_Float16)f;
    memcpy(x, &h, 2);
}

/* Sums are blocked: SIMD partial sums over BLK entries, the blocks added in double. */
#define BLK 512

/* Rows are handed out with OpenMP's guided schedule: each thread first takes a large
 * contiguous block (remaining / threads), then smaller ones down to about 64K elements, so a
 * core slowed by other work does not hold up the rest (a static split waits for the slowest
 * thread), while the threads write far apart.  That matters for fresh outputs: each 2 MiB
 * huge page of the output is zeroed by the OS on first touch, and when two threads touch one
 * page at once (as with small dynamic tasks over adjacent rows) one waits for the other's
 * fault.  Measured with fresh outputs of 64-128 MiB (2 threads, interleaved rounds): dynamic
 * tasks of 64K elements 1.4-1.85x native, guided 1.75-2.1x.  Dynamic tasks of 1M elements
 * (two huge pages) had steadier worst rounds on the loaded VM (a preempted core holds no
 * half of the rows: 1.55-1.76x against 0.8-0.96x) but lower medians (1.8-1.9x against
 * 2.0-2.1x), so guided stays. */
/* The parallel row loop of every row kernel (the schedule discussed above), over tasks of at
 * least `chunk` rows with `nthreads` threads; one thread runs without a team. */
#define SJ_PARALLEL_ROWS                                                                          \
    _Pragma("omp parallel for schedule(guided, chunk) num_threads(nthreads) if (nthreads > 1)")

/* Data below SJ_STATIC_MAX_BYTES stays in cache from one call to the next (no huge pages are
 * advised for it either), and there the split of rows between threads must not change from
 * call to call: a static split (thread t takes the t-th contiguous block, as PyTorch's
 * parallel_for does) has each thread read the rows its own core wrote in the call before (a
 * softmax forward, then its backward), where the guided schedule hands them to whichever
 * thread comes first.  Measured in an eager forward + backward loop against the guided
 * schedule (2 threads, interleaved rounds): 1.16x at 4096 x 128 and 1.03-1.07x at 256 x 1000,
 * while at 16384 x 1024 and 64 x 262144 static was 10 % slower (guided kept there). */
#define SJ_STATIC_MAX_BYTES ((int64_t)8 << 20)

/* SJ_FOR_ROWS_<dt>(bytes, BODY): for (i = 0; i < n; ++i) BODY over the rows of a kernel for
 * data type <dt> whose row data (n rows of k entries) is `bytes` long (needs `n`, `nthreads`
 * and `chunk` in scope).  float32: statically split below SJ_STATIC_MAX_BYTES, else by
 * SJ_PARALLEL_ROWS' guided schedule, in one loop whose schedule(runtime) is set for it on the
 * calling thread and restored after it.  The other types keep the guided loop at every size:
 * for float16 rows (widened into a per-thread scratch row) both the static split and the
 * runtime schedule measured 15-25 % slower, for reasons not found. */
#define SJ_FOR_ROWS_f64(bytes, ...) SJ_PARALLEL_ROWS for (int64_t i = 0; i < n; ++i) __VA_ARGS__
#define SJ_FOR_ROWS_bf16 SJ_FOR_ROWS_f64
#define SJ_FOR_ROWS_f16 SJ_FOR_ROWS_f64
#ifdef _OPENMP
#define SJ_FOR_ROWS_f32(bytes, ...)                                                               \
    {                                                                                             \
        omp_sched_t sj_kind_;                                                                     \
        int sj_chunk_;                                                                            \
        omp_get_schedule(&sj_kind_, &sj_chunk_);                                                  \
        if ((bytes) < SJ_STATIC_MAX_BYTES)                                                        \
            omp_set_schedule(omp_sched_static, 0);                                                \
        else                                                                                      \
            omp_set_schedule(omp_sched_guided, chunk < (1 << 30) ? (int)chunk : (1 << 30));       \
        _Pragma("omp parallel for schedule(runtime) num_threads(nthreads) if (nthreads > 1)")    \
        for (int64_t i = 0; i < n; ++i) __VA_ARGS__                                               \
        omp_set_schedule(sj_kind_, sj_chunk_);                                                    \
    }
#else
#define SJ_FOR_ROWS_f32(bytes, ...)                                                               \
    {                                                                                             \
        (void)(bytes);                                                                            \
        (void)chunk;                                                                              \
        (void)nthreads;                                                                           \
        for (int64_t i = 0; i < n; ++i) __VA_ARGS__                                               \
    }
#endif

static inline int64_t rows_per_task(int64_t k) {
    const int64_t r = ((int64_t)1 << 16) / (k > 0 ? k : 1);
    return r > 0 ? r : 1;
}

/* Threads for n rows of k: at most one per row and one per GRAIN elements (waking a thread
 * team costs more than a small problem, and far more on a loaded machine). */
#define GRAIN ((int64_t)1 << 15)

static inline int clamp_threads(int nthreads, int64_t n, int64_t k) {
    const int64_t by_size = (n * (k > 0 ? k : 1) + GRAIN - 1) / GRAIN;
    if (nthreads < 1) nthreads = 1;
    if (by_size < nthreads) nthreads = (int)(by_size > 0 ? by_size : 1);
    if (n < nthreads) nthreads = (int)(n > 0 ? n : 1);
    return nthreads;
}

/* Half-precision rows through the float32 row code: a row of bfloat16/float16 data is widened
 * into a per-thread float32 scratch row (exact), the float32 vector row function runs on it,
 * and a float32 result row is rounded once into the half type.  The conversions are plain
 * loops the compiler vectorises (shifts for bfloat16, vcvtph2ps/vcvtps2ph for float16 with
 * F16C), where the element-wise half loops with their scalar exponentials ran 2-14x slower
 * than the float32 kernels.  The scratch grows to the longest row seen by each thread and is
 * kept for the thread's life; rows above HALF_SCRATCH_MAX entries use the element-wise loops. */
#define HALF_SCRATCH_MAX ((int64_t)1 << 20) /* floats: 4 MiB per thread at most */

/* A float32 scratch of at least n floats for this thread (NULL if n is too large or malloc
 * fails: the caller then uses its element-wise loop). */
static inline float *half_scratch(int64_t n) {
    static __thread float *buf;
    static __thread int64_t cap;
    if (n > HALF_SCRATCH_MAX) return NULL;
    if (cap < n) {
        float *p = (float *)realloc(buf, (size_t)n * sizeof(float));
        if (!p) return NULL;
        buf = p;
        cap = n;
    }
    return buf;
}

#define LOAD_F32(ptr) (*(ptr))
#define STORE_F32(ptr, val) (*(ptr) = (val))
#define LOAD_F64(ptr) (*(ptr))
#define STORE_F64(ptr, val) (*(ptr) = (val))
#define LOAD_BF16(ptr) bf16_load(ptr)
#define STORE_BF16(ptr, val) bf16_store((ptr), (val))
#define LOAD_F16(ptr) f16_load(ptr)
#define STORE_F16(ptr, val) f16_store((ptr), (val))

/* Widen n entries of half data into float32 and round float32 back, element by element in
 * loops the compiler vectorises. */
#define DEFINE_HALF_ROWS(SUFFIX, T, LOAD, STORE)                                                  \
    static inline void widen_##SUFFIX(const T *x, float *out, int64_t n) {                       \
        _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) out[j] = LOAD(x + j);                \
    }                                                                                             \
    static inline void narrow_##SUFFIX(const float *x, T *out, int64_t n) {                      \
        _Pragma("omp simd") for (int64_t j = 0; j < n; ++j) STORE(out + j, x[j]);                \
    }
DEFINE_HALF_ROWS(bf16, bf16_t, LOAD_BF16, STORE_BF16)
DEFINE_HALF_ROWS(f16, f16_t, LOAD_F16, STORE_F16)

#endif /* SOFTJAC_COMMON_H */
