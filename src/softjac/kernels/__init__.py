"""Layer 3: fused kernels for the hot primitives, and the dispatcher that picks one.

``softjac.kernels.dispatch`` is the only entry point the rest of the package uses; its
docstring is the contract. Implementations: ``_torch`` (pure PyTorch, every device),
``_cpu`` (a plain-C file compiled at first use, called through ctypes) and ``_triton``
(GPU, or CPU under ``TRITON_INTERPRET=1``). Importing softjac never imports triton; the
Triton kernels are loaded on first use.
"""

from softjac.kernels.dispatch import BACKENDS

__all__ = ["BACKENDS"]
