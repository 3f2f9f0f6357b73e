"""Layer 3: fused kernels for the hot primitives, the dispatcher that picks one, and their
registration as PyTorch operators.

``softjac.kernels.dispatch`` is the only place that decides a backend; its docstring is the
contract. Implementations: ``_torch`` (pure PyTorch, every device), ``_cpu`` (C kernels
called through ctypes) and ``_triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``).
``_ops`` registers them as ``torch.ops.softjac.*`` (fake implementations, autograd, vmap), so
that ``torch.compile`` keeps them in its graphs. Importing softjac never imports triton; the
Triton kernels are loaded on first use. :func:`info` tells which backend ``"auto"`` picks for
every op on this machine, and why.
"""

from softjac.kernels.dispatch import BACKENDS, info

__all__ = ["BACKENDS", "info"]
