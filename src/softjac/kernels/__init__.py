"""Layer 3: fused kernels for the hot primitives, and the dispatcher that picks one.

``softjac.kernels.dispatch`` is the only entry point the rest of the package uses. Importing
softjac never imports triton; the Triton kernels are loaded on first use.
"""

from softjac.kernels.dispatch import BACKENDS

__all__ = ["BACKENDS"]
