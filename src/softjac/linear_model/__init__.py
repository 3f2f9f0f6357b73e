"""Estimators built on softjac's structured softmax curvature (needs scikit-learn).

``SoftmaxRegression`` fits scikit-learn's multinomial ``LogisticRegression`` objective by
Newton's method on the exact Hessian ``(1/Σs) Σ_i s_i (x_i x_iᵀ) ⊗ (diag p_i − p_i p_iᵀ) + λI``.
"""

try:
    import sklearn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "`softjac.linear_model` needs scikit-learn: pip install 'softjac[sklearn]'."
    ) from exc

from softjac.linear_model._softmax_regression import SoftmaxRegression

__all__ = ["SoftmaxRegression"]
