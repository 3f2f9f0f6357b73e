#!/usr/bin/env bash
# One prepared run on a GPU machine (a few minutes of GPU time):
# correctness of the Triton kernels on the GPU first (tests/test_kernels_triton.py runs every
# kernel test on CUDA when there is a device, the `gpu`-marked ones included), then the whole
# kernel benchmark (which checks correctness again before timing).
#
#     bash benchmarks/gpu_session.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else ./gpu-out
#
# Needs only a Python with torch (CUDA) and triton; softjac is used from src/ (no install, the
# machine may have no network), with the C kernels built in place first when a compiler is there. Writes OUT_DIR/env.txt, OUT_DIR/pytest_gpu.txt,
# OUT_DIR/gpu.json and OUT_DIR/gpu.txt (the printed table), and keeps going when a step fails
# so that one run brings back everything it can. Record the table in docs/benchmarks.md with
# the date, card and versions.
set -u
out="${1:-${OUT:-gpu-out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
python3 setup.py -q build_ext --inplace >"$out/build.txt" 2>&1 || echo "C kernels not built (see build.txt)"
if python3 -c 'import pytest, hypothesis' 2>/dev/null; then
    # every Triton kernel on CUDA, then the registered ops under torch.compile, then the
    # Triton ops (triton_op) through AOTAutograd and Inductor (tests/test_triton_ops.py)
    timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
        tests/test_ops.py tests/test_cross_entropy_ops.py tests/test_compile.py \
        tests/test_triton_ops.py >"$out/pytest_gpu.txt" 2>&1
    echo "pytest (Triton kernels and ops on CUDA): exit $? ($(tail -n 1 "$out/pytest_gpu.txt"))"
else
    echo "pytest or hypothesis missing: GPU tests skipped" | tee "$out/pytest_gpu.txt"
fi
timeout 150 python3 benchmarks/run.py --quick --device cuda --json "$out/gpu.json" 2>&1 | tee "$out/gpu.txt"
echo "benchmark: exit ${PIPESTATUS[0]}"
