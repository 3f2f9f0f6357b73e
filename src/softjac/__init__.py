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
from softjac._linear_ce import (
    LinearCrossEntropy,
    linear_cross_entropy,
    linear_cross_entropy_ggn_vp,
)
from softjac._losses import (
    CrossEntropyHessian,
    cross_entropy,
    cross_entropy_grad,
    cross_entropy_hessian,
    fisher_sqrt,
)
from softjac._operator import (
    SoftmaxJacobian,
    SoftmaxJacobianCholeskyFactor,
    SoftmaxJacobianPinv,
    SoftmaxJacobianSqrtFactor,
)
from softjac._verify import (
    AutogradComparison,
    JacobianDifference,
    PropertyReport,
    PropertyResult,
    check_properties,
    compare_with_autograd,
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
    # losses: cross-entropy, its gradient and curvature
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_hessian",
    "CrossEntropyHessian",
    "fisher_sqrt",
    # fused linear + cross-entropy: chunked, never the N×V logits; its GGN products
    "linear_cross_entropy",
    "linear_cross_entropy_ggn_vp",
    "LinearCrossEntropy",
    # structured operator: O(K) products, O(K²) spectrum, inverses, factors
    "SoftmaxJacobian",
    "SoftmaxJacobianPinv",
    "SoftmaxJacobianSqrtFactor",
    "SoftmaxJacobianCholeskyFactor",
    # verification: the property report and the autograd cross-check
    "check_properties",
    "compare_with_autograd",
    "PropertyReport",
    "PropertyResult",
    "AutogradComparison",
    "JacobianDifference",
]
