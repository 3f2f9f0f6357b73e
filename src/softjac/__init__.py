"""softjac — the Jacobian of softmax, exact and fast.

``J = diag(σ) − σσᵀ`` for one vector or a batch, as a dense matrix, as O(K) products, as a
structured operator, inside autograd, and through fused kernels.
"""

from softjac._functional import (
    hessian,
    hvp,
    jacobian,
    jvp,
    log_softmax_jacobian,
    softmax,
    vjp,
    vjp_from_probs,
)

__version__ = "0.1.0"

__all__ = [
    # functional: values and dense derivatives
    "softmax",
    "jacobian",
    "log_softmax_jacobian",
    "hessian",
    # functional: O(K) products
    "vjp",
    "jvp",
    "vjp_from_probs",
    "hvp",
]
