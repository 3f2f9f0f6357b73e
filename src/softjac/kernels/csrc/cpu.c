/* softjac CPU capability probe, built on its own with the baseline flags (so that it runs on
 * every CPU of its architecture) and called by the loader before it picks a kernel variant:
 *   0  baseline (any x86-64, or any CPU of another architecture)
 *   1  x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE (the "avx2" variant)
 *   2  x86-64-v4: v3 and AVX-512 F/BW/CD/DQ/VL (the "avx512" variant)
 * __builtin_cpu_supports also checks that the operating system saves the AVX / AVX-512
 * register state (XGETBV), so a feature the OS does not enable counts as absent. */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
int softjac_cpu_level(void) {
    __builtin_cpu_init();
    const int v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                   __builtin_cpu_supports("f16c") && __builtin_cpu_supports("lzcnt") &&
                   __builtin_cpu_supports("movbe");
    if (!v3) return 0;
    const int v4 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512vl");
    return v4 ? 2 : 1;
}
#else
int softjac_cpu_level(void) { return 0; }
#endif
