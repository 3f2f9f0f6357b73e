"""Compile every Triton kernel configuration softjac's Triton ops can launch for sm_90 (H100),
with Triton's own compiler and no GPU: ``python -m tests._sm90 [--all]``.

The launchers of ``softjac.kernels._triton`` run on ``meta`` tensors with a ``launch`` that
records each launch (kernel, arguments, ``tl.constexpr`` values, ``num_warps``) instead of
running it; every distinct configuration is then compiled to PTX for
``GPUTarget("cuda", 90, 32)``. Default: the largest one-row block, float32, one chunk count;
``--all``: every block size, float32/bfloat16/float16, chunk counts up to 256. Prints one JSON
line: the kernels compiled, the ``@triton.jit`` kernels the module defines, the number of
configurations. Must run without ``TRITON_INTERPRET`` (tests/test_triton_ops.py starts it in
a fresh process).
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from softjac.kernels import _triton

_PTR = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
}


class _Recorder:
    """A ``launch`` that records ``(kernel, args, kwargs)`` instead of running the kernel."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, kwargs))

        return _Grid()


def launches(ks, dtypes, nc_blocks):
    """Every launch the ops make for rows of ``ks`` columns in ``dtypes``, split rows with
    ``nc_blocks`` chunks, the cross-entropy flags (weights, smoothing) and dense tiles."""
    rec = _Recorder()
    meta = {"device": "meta"}
    split = [_triton.SPLIT_CHUNK * (nc // 2) + 1 for nc in nc_blocks]
    t = torch.empty(2, dtype=torch.int64, **meta)
    for dtype in dtypes:
        for k in (*ks, *split):
            x = torch.empty(2, k, dtype=dtype, **meta)
            _triton.softmax_vjp(x, x, launch=rec)
            _triton.softmax_vjp_logits(x, x, launch=rec)
            if k <= max(ks):
                _triton.softmax_jacobian_dense(x, launch=rec)
            for weight in (None, torch.empty(k, **meta)):
                for eps in (0.0, 0.1):
                    loss, stats = _triton.cross_entropy_forward(
                        x, t, weight, -100, eps, stats=True, launch=rec
                    )
                    _triton.cross_entropy_backward(x, t, stats, loss, weight, -100, eps, launch=rec)
    return rec.launches


def compile_all(recorded):
    """Compile each distinct recorded configuration for sm_90; the kernel names and count."""
    seen, kernels = set(), set()
    for kernel, args, kwargs in recorded:
        kwargs = dict(kwargs)
        options = {"num_warps": kwargs.pop("num_warps", 4)}
        signature, constexprs = {}, {}
        for name, a in zip(kernel.arg_names, args, strict=False):
            if isinstance(a, torch.Tensor):
                signature[name] = "*" + _PTR[a.dtype]
            elif isinstance(a, float):
                signature[name] = "fp32"
            else:
                signature[name] = "i32"
        for name, a in kwargs.items():
            signature[name], constexprs[name] = "constexpr", a
        key = (kernel.__name__, *signature.values(), *constexprs.items(), options["num_warps"])
        if key in seen:
            continue
        seen.add(key)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        if not compiled.asm.get("ptx"):
            raise RuntimeError(f"no PTX for {key}")
        kernels.add(kernel.__name__)
    return sorted(kernels), len(seen)


def main(argv):
    if "--all" in argv:
        ks, k = [], 1
        while k <= _triton.SPLIT_THRESHOLD:
            ks.append(_triton.vjp_block_size(k))
            k = ks[-1] + 1
        recorded = launches(
            tuple(ks), (torch.float32, torch.bfloat16, torch.float16), (4, 8, 16, 32, 64, 128, 256)
        )
    else:
        recorded = launches((_triton.SPLIT_THRESHOLD,), (torch.float32,), (4,))
    kernels, count = compile_all(recorded)
    defined = sorted(
        name
        for name, value in vars(_triton).items()
        if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
    )
    print(json.dumps({"kernels": kernels, "module_kernels": defined, "configurations": count}))


if __name__ == "__main__":
    main(sys.argv[1:])
