"""Offline checks of softjac's Triton ops for sm_90 (H100), with no GPU:
``python -m tests._sm90 [--all]``: the trace below, then the compile check (``--all``: the
full compile sweep only).

Compile: every Triton kernel configuration the ops can launch, compiled with Triton's own
compiler.

The launchers of ``softjac.kernels._triton`` run on ``meta`` tensors with a ``launch`` that
records each launch (kernel, arguments, ``tl.constexpr`` values, ``num_warps``) instead of
running it; every distinct configuration is then compiled to PTX for
``GPUTarget("cuda", 90, 32)``. Default: the largest one-row block, float32, one chunk count;
``--all``: every block size, float32/bfloat16/float16, chunk counts up to 256. Prints one JSON
line: the kernels compiled, the ``@triton.jit`` kernels the module defines, the number of
configurations.

Trace: ``torch.compile(fullgraph=True)`` of the public API with
``backend="triton"`` through AOTAutograd, as on a GPU, stopping before anything runs: the
joint forward-and-backward graph must hold the kernel launches
(``triton_kernel_wrapper_functional``) and no softjac op. CPU tensors stand in for CUDA ones
(the launches are traced on fake tensors, never run) and a stand-in Triton driver names the
sm_90 target that PyTorch's analysis of which arguments a kernel writes compiles for (without
a driver it assumes every argument is written). Prints one JSON line per traced function.

Must run without ``TRITON_INTERPRET`` at import (tests/test_triton_ops.py starts it in a
fresh process).
"""

from __future__ import annotations

import json
import os
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


class _Sm90Driver:
    """The part of a Triton driver PyTorch's kernel analysis asks for: the target."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class _Stop(Exception):
    pass


def _trace_models():
    import softjac

    def softmax(z, v, t):
        return (softjac.softmax(z, temperature=0.5, backend="triton") * v).sum()

    def vjp(z, v, t):
        return softjac.vjp(z, v, backend="triton").square().sum()

    def vjp_from_probs(z, v, t):
        return softjac.vjp_from_probs(torch.softmax(z, -1), v, backend="triton").square().sum()

    def jacobian(z, v, t):
        return softjac.jacobian(z, backend="triton").square().sum()

    def cross_entropy(z, v, t):
        return softjac.cross_entropy(z, t, label_smoothing=0.1, backend="triton")

    return [softmax, vjp, vjp_from_probs, jacobian, cross_entropy]


def trace():
    """Trace each model through AOTAutograd; one JSON line each: the number of kernel launches
    in the joint graph, the softjac ops left in it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import default_partition

    triton.runtime.driver.set_active(_Sm90Driver())
    os.environ["TRITON_INTERPRET"] = "1"  # dispatch takes CPU tensors for "triton" only then
    for model in _trace_models():
        joints = []

        def partition(joint, inputs, joints=joints, **kwargs):
            joints.append(joint)
            return default_partition(joint, inputs, **kwargs)

        def stop(gm, example_inputs):
            def run(*args):
                raise _Stop

            return run

        torch._dynamo.reset()
        fn = torch.compile(
            model,
            backend=aot_autograd(fw_compiler=stop, bw_compiler=stop, partition_fn=partition),
            fullgraph=True,
        )
        z = torch.randn(4, 300, requires_grad=True)
        try:
            fn(z, torch.randn(4, 300), torch.tensor([0, 7, 299, 3]))
        except _Stop:
            pass
        nodes = [n for gm in joints for n in gm.graph.nodes if n.op == "call_function"]
        launches = sum("triton_kernel_wrapper_functional" in str(n.target) for n in nodes)
        ops = sorted({str(n.target) for n in nodes if str(n.target).startswith("softjac.")})
        print(json.dumps({"model": model.__name__, "launches": launches, "softjac_ops": ops}))


def main(argv):
    if "--all" not in argv:
        trace()
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
