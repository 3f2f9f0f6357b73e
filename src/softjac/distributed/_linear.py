"""Vocabulary-parallel fused linear + cross-entropy: each rank holds a row block ``W_r`` of the
classifier, the input is replicated, the ``N × V_r`` logits never exist at once.

Forward, in chunks of rows: sweep 1 computes ``z = x W_rᵀ + b_r`` and keeps the row maxima
(all-reduce max); sweep 2 recomputes ``z`` and keeps the per-row partial sums of
:class:`~softjac.distributed._ops.CESpec` (all-reduce sum). Backward: one sweep recomputes
``z``, forms ``G = ∂L/∂z`` from the per-row state (no communication), accumulates
``dW_r = Gᵀ x``, ``db_r = Σ G`` and this rank's part ``G W_r`` of ``dX``, which one all-reduce
sums over the group (every rank gets the full input gradient).
"""

from __future__ import annotations

import torch

from softjac._checks import as_float_dtype
from softjac.distributed import _comm
from softjac.distributed._ops import CESpec

#: Memory budget of one chunk of logits, per device type.
_BUDGET_BYTES = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}


def chunk_rows(n_loc: int, dtype: torch.dtype, device: torch.device, chunk_size) -> int:
    """Rows per chunk: ``chunk_size`` if given, else as many as fit the budget."""
    if chunk_size is not None:
        return int(chunk_size)
    budget = _BUDGET_BYTES.get(device.type, 256 * 2**20)
    per_row = max(1, n_loc) * torch.empty((), dtype=dtype).element_size() * 2
    return max(1, budget // per_row)


class LinearCrossEntropyShard(torch.autograd.Function):
    """Row losses ``(N,)`` of ``cross_entropy(x W_rᵀ + b_r)`` over the sharded vocabulary."""

    @staticmethod
    def forward(ctx, x2, w_r, b_r, y2, target, w_full, group, start, total, eps, ii, zl, chunk):
        cd = as_float_dtype(x2.dtype)
        n = x2.shape[0]
        spec = CESpec(w_full, start, w_r.shape[0], total, eps, ii, zl, cd)
        with torch.no_grad():
            wc = w_r.to(cd)
            bc = None if b_r is None else b_r.to(cd)
            spans = [(i, min(n, i + chunk)) for i in range(0, max(n, 1), chunk)]  # ≥ 1 chunk
            lm = torch.empty(n, dtype=cd, device=x2.device)
            for i, j in spans:
                lm[i:j] = _logits(x2[i:j], wc, bc).amax(dim=-1)
            m = _comm.all_reduce_max(lm, group)
            reds, states = [], []
            for i, j in spans:
                z = _logits(x2[i:j], wc, bc)
                red, st = spec.partials(
                    z,
                    m[i:j],
                    None if y2 is None else y2[i:j],
                    None if target is None else target[i:j],
                )
                reds.append(red)
                states.append(st)
            red = torch.cat(reds)
            state = {key: torch.cat([s[key] for s in states]) for key in states[0]}
            _comm.all_reduce_sum(red, group)
            rows, state = spec.finish(red, state)
        ctx.spec, ctx.group, ctx.spans, ctx.cd = spec, group, spans, cd
        ctx.names = sorted(state)
        ctx.has_bias = b_r is not None
        ctx.save_for_backward(x2, w_r, b_r, y2, *[state[k] for k in ctx.names])
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x2, w_r, b_r, y2, *vals = ctx.saved_tensors
        state = dict(zip(ctx.names, vals, strict=True))
        spec, cd = ctx.spec, ctx.cd
        wc = w_r.to(cd)
        bc = None if b_r is None else b_r.to(cd)
        g = g.to(cd)
        dx = torch.zeros(x2.shape, dtype=cd, device=x2.device)
        dw = torch.zeros(w_r.shape, dtype=cd, device=w_r.device)
        db = None if b_r is None else torch.zeros(b_r.shape, dtype=cd, device=b_r.device)
        dy = None if y2 is None or not ctx.needs_input_grad[3] else torch.empty_like(y2)
        for i, j in ctx.spans:
            xc = x2[i:j].to(cd)
            z = _logits(xc, wc, bc)
            st = {k: v[i:j] for k, v in state.items()}
            yc = None if y2 is None else y2[i:j]
            if dy is not None:
                dy[i:j] = (spec.grad_probs_target(z, st) * g[i:j].unsqueeze(-1)).to(y2.dtype)
            grad = spec.grad_logits(z, yc, st, g[i:j])
            dx[i:j] = grad @ wc
            dw += grad.T @ xc
            if db is not None:
                db += grad.sum(0)
        _comm.all_reduce_sum(dx, ctx.group)  # the input gradient: sum of every shard's part
        return (
            dx.to(x2.dtype),
            dw.to(w_r.dtype),
            None if db is None else db.to(b_r.dtype),
            dy,
            *(None,) * 9,
        )


def _logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    z = x.to(w.dtype) @ w.T
    return z if b is None else z + b
