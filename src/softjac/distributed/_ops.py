"""Vocabulary-parallel softmax, log-softmax, VJP and cross-entropy (the math and autograd).

Every function here works on one rank's shard ``z`` of shape ``(M, V_r)`` (rows × local classes,
in the compute dtype) and the group's :class:`~softjac.distributed._comm.Shards`. The single-device
formulas of :mod:`softjac._core` are split into per-rank partial sums:

* one all-reduce (max) of the row maxima gives ``m``; each rank forms ``e = exp(z − m)``;
* one all-reduce (sum) of a few columns per row gives the rest. The sum ``S = Σ e`` is carried
  as ``S_excl`` (each rank's sum *without* its entry equal to ``m``, which is exactly 1) and the
  count ``c`` of ranks holding such an entry, so that ``r = Σ_{j≠i*} e_j = S_excl + (c − 1)`` is
  exact in the same sense as on one device, ``S = 1 + r`` and ``log S = log1p(r)``.

Ties of the maximum across ranks (``c > 1``) make ``σ_{i*} ≤ 1/2``: no entry is then special,
and the plain formula is used everywhere.
"""

from __future__ import annotations

import torch

from softjac.distributed import _comm


def row_max(z: torch.Tensor, group) -> torch.Tensor:
    """Global row maximum ``m`` ``(M,)`` (all-reduce max #1)."""
    return _comm.all_reduce_max(z.amax(dim=-1).clone(), group)


def max_parts(z: torch.Tensor, m: torch.Tensor):
    """``(ms, has, k)`` for shard ``z`` and global maxima ``m``: ``ms`` = ``m`` (0 for a fully
    masked row), whether this rank holds an entry equal to ``m`` and the first such ``k``."""
    finite = torch.isfinite(m)
    ms = torch.where(finite, m, torch.zeros_like(m))
    k = z.argmax(dim=-1, keepdim=True)
    has = (z.gather(-1, k).squeeze(-1) == m) & finite
    return ms, has, k


def exp_excl_(d: torch.Tensor, has: torch.Tensor, k: torch.Tensor):
    """``d = z − ms`` (a buffer the caller owns) becomes ``e = exp(d)`` in place; returns
    ``(e, s_excl)`` with ``s_excl`` the row sum of ``e`` without the entry ``k`` where
    ``has`` (there ``e_k = 1`` exactly)."""
    e = d.exp_()
    ek = e.gather(-1, k)
    e.scatter_(-1, k, torch.where(has.unsqueeze(-1), torch.zeros_like(ek), ek))
    s_excl = e.sum(dim=-1)
    e.scatter_(-1, k, ek)
    return e, s_excl


def exp_parts(z: torch.Tensor, m: torch.Tensor):
    """``(e, has, k, ms, s_excl)``: :func:`max_parts` and :func:`exp_excl_` on a new buffer."""
    ms, has, k = max_parts(z, m)
    e, s_excl = exp_excl_(z - ms.unsqueeze(-1), has, k)
    return e, has, k, ms, s_excl


def sum_parts(s_excl_total: torch.Tensor, count: torch.Tensor):
    """From the all-reduced ``S_excl`` and the count ``c``: ``(r, s, log s)`` with
    ``r = S_excl + (c − 1)``; a fully masked row (``c = 0``) gets ``s = 1`` (σ = 0)."""
    masked = count < 0.5
    r = torch.where(masked, torch.zeros_like(s_excl_total), s_excl_total + (count - 1))
    s = 1 + r
    return r, s, torch.log1p(r)


# ----------------------------------------------------------------------------------------
# softmax and log-softmax


class SoftmaxShard(torch.autograd.Function):
    """σ over the sharded last dim; backward ``σ ⊙ (g − ⟨σ, g⟩)`` with one all-reduce."""

    @staticmethod
    def forward(ctx, z, group):
        with torch.no_grad():
            m = row_max(z, group)
            e, has, k, _, s_excl = exp_parts(z, m)
            red = torch.stack([s_excl, has.to(z.dtype)], dim=-1)
            _comm.all_reduce_sum(red, group)  # all-reduce #2
            _, s, _ = sum_parts(red[:, 0], red[:, 1])
            p = e.div_(s.unsqueeze(-1))
        ctx.group = group
        ctx.save_for_backward(p, has, k)
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        p, has, k = ctx.saved_tensors
        return probs_vjp(p, g.to(p.dtype), has, k, ctx.group), None


def probs_vjp(p, g, has, k, group) -> torch.Tensor:
    """``σ ⊙ (g − ⟨σ, g⟩)`` on a shard, the global argmax entry (when one rank owns it) as
    ``σ_{i*} Σ_{j≠i*} σ_j (g_{i*} − g_j)`` from all-reduced partial sums (one all-reduce)."""
    pg = p * g
    a_excl = torch.where(has, p.scatter(-1, k, 0.0).sum(-1), p.sum(-1))
    b_excl = torch.where(has, pg.scatter(-1, k, 0.0).sum(-1), pg.sum(-1))
    v1 = torch.where(has, pg.gather(-1, k).squeeze(-1), torch.zeros_like(b_excl))
    red = torch.stack([a_excl, has.to(p.dtype), b_excl, v1], dim=-1)
    _comm.all_reduce_sum(red, group)
    a, c, b, v = red.unbind(-1)
    centred = g - (b + v).unsqueeze(-1)
    owner = has & (c > 0.5) & (c < 1.5)
    gk = g.gather(-1, k).squeeze(-1)
    t = gk * a - b  # Σ_{j≠i*} σ_j (g_{i*} − g_j) = g_{i*} Σ_{j≠i*} σ_j − Σ_{j≠i*} σ_j g_j
    centred = torch.where(
        owner.unsqueeze(-1) & (torch.arange(p.shape[-1], device=p.device) == k),
        t.unsqueeze(-1),
        centred,
    )
    return p * centred


class LogSoftmaxShard(torch.autograd.Function):
    """``log σ = z − m − log1p(r)`` over the sharded last dim; backward ``g − σ Σ g`` (one
    all-reduce)."""

    @staticmethod
    def forward(ctx, z, group):
        with torch.no_grad():
            m = row_max(z, group)
            _, has, _, ms, s_excl = exp_parts(z, m)
            red = torch.stack([s_excl, has.to(z.dtype)], dim=-1)
            _comm.all_reduce_sum(red, group)
            _, _, logs = sum_parts(red[:, 0], red[:, 1])
            out = (z - ms.unsqueeze(-1)) - logs.unsqueeze(-1)
        ctx.group = group
        ctx.save_for_backward(out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        g = g.to(out.dtype)
        total = _comm.all_reduce_sum(g.sum(-1).clone(), ctx.group)
        return g - out.exp() * total.unsqueeze(-1), None


def logits_vjp(z: torch.Tensor, v: torch.Tensor, group) -> torch.Tensor:
    """``J v`` from logits on a shard, σ never rounded on its own (the distributed form of
    ``softjac._core.vjp_logits_last``): ``(J v)_i = e_i u_i / S²`` with
    ``u_i = v_i S − Σ_j e_j v_j`` and, on the rank owning the global argmax,
    ``u_{i*} = v_{i*} r − Σ_{j≠i*} e_j v_j`` from all-reduced partial sums. Two all-reduces."""
    m = row_max(z, group)
    e, has, k, _, s_excl = exp_parts(z, m)
    ev = e * v
    b_excl = torch.where(has, ev.scatter(-1, k, 0.0).sum(-1), ev.sum(-1))
    v1 = torch.where(has, v.gather(-1, k).squeeze(-1), torch.zeros_like(b_excl))
    red = torch.stack([s_excl, has.to(z.dtype), b_excl, v1], dim=-1)
    _comm.all_reduce_sum(red, group)
    s_ex, c, b, vs = red.unbind(-1)
    r, s, _ = sum_parts(s_ex, c)
    u = v * s.unsqueeze(-1) - (b + vs).unsqueeze(-1)
    owner = has & (c > 0.5) & (c < 1.5)
    q = v.gather(-1, k).squeeze(-1) * s_ex - b  # count 1: r = S_excl, Σ_{j≠i*} e_j v_j = b
    at_k = torch.arange(z.shape[-1], device=z.device) == k
    u = torch.where(owner.unsqueeze(-1) & at_k, q.unsqueeze(-1), u)
    y = e * u
    r2, s2 = r.unsqueeze(-1), (s * s).unsqueeze(-1)
    return torch.where(r2 <= 1, y - y * (r2 * (2 + r2) / s2), y / s2)


# ----------------------------------------------------------------------------------------
# cross-entropy


def _probs(z, ms, logs):
    """``σ = exp((z − m) − log S)``: errors relative to the row's spread, not to ``|lse|``."""
    return ((z - ms.unsqueeze(-1)) - logs.unsqueeze(-1)).exp()


class CrossEntropyShard(torch.autograd.Function):
    """Per-row cross-entropy losses ``(M,)`` of a vocabulary-sharded row block.

    Class indices: ``loss_n = (1 − ε) w[y_n] (lse_n − z_{n,y_n}) + (ε/V) Σ_c w_c (lse_n − z_{n,c})
    + ζ w[y_n] lse_n²`` (0 for ignored rows). Probabilities: ``loss_n = Σ_c w_c y'_{n,c}
    (lse_n − z_{n,c}) + ζ lse_n²`` with ``y' = (1 − ε) y + ε/V``. ``lse − z`` is formed as
    ``(m − z) + log1p(r)``, so errors follow the row's spread, not ``|lse|``. Forward: two
    all-reduces (max; one sum of 4 or 5 columns: ``S_excl``, ``c``, the target's ``m − z_y``
    or ``Σ_{c≠i*} w_c y'_c`` and the owner's ``w y'``, the smoothing ``Σ w (m − z)`` or
    ``⟨w y', m − z⟩``). Backward: no communication — ``∂loss_n/∂z = a_n σ − t_n`` (``t`` the
    target part) with ``a_n`` and ``lse_n`` saved; the entry of the global argmax ``i*`` is
    ``(a_n − t_{n,i*}) − a_n r/S`` (``σ_{i*} = 1 − r/S``), exact when the target is the argmax.
    """

    @staticmethod
    def forward(ctx, z, y, target, w_full, group, start, total, eps, ignore_index, zl):
        spec = CESpec(w_full, start, z.shape[-1], total, eps, ignore_index, zl, z.dtype)
        with torch.no_grad():
            m = row_max(z, group)
            red, state = spec.partials(z, m, y, target)
            _comm.all_reduce_sum(red, group)
            rows, state = spec.finish(red, state)
        ctx.spec = spec
        names = sorted(state)
        ctx.names = names
        ctx.save_for_backward(z, y, *[state[n] for n in names])
        return rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        z, y, *vals = ctx.saved_tensors
        state = dict(zip(ctx.names, vals, strict=True))
        spec = ctx.spec
        gz = spec.grad_logits(z, y, state, g.to(z.dtype))
        gy = None
        if ctx.needs_input_grad[1]:
            gy = (spec.grad_probs_target(z, state) * g.to(z.dtype).unsqueeze(-1)).to(y.dtype)
        return gz, gy, *(None,) * 8


class CESpec:
    """The options of one cross-entropy call on a shard, and its three steps: per-row partial
    sums given the global maxima (:meth:`partials`), the losses from the all-reduced sums
    (:meth:`finish`), and the gradient with respect to the shard's logits
    (:meth:`grad_logits`) from per-row state only. Rows are independent, so the fused
    linear + cross-entropy calls the same steps on chunks of rows."""

    def __init__(self, w_full, start, n_loc, total, eps, ignore_index, zl, dtype):
        self.w_full = None if w_full is None else w_full.to(dtype)
        self.w_loc = None if w_full is None else self.w_full[start : start + n_loc]
        self.start, self.n_loc, self.total = start, n_loc, total
        self.eps, self.ignore_index, self.zl = eps, ignore_index, zl

    def _wy(self, y, dtype):
        wy = (1.0 - self.eps) * y.to(dtype) + self.eps / self.total
        return wy if self.w_loc is None else wy * self.w_loc

    def partials(self, z, m, y, target):
        """``(red, state)``: the columns to all-reduce ``(M, 4 or 5)`` and per-row state. One
        temporary of the shard's size (``z − m``, then ``exp`` of it in place)."""
        eps, start, n_loc = self.eps, self.start, self.n_loc
        ms, has, k = max_parts(z, m)
        d = z - ms.unsqueeze(-1)  # z − m ≤ 0
        state = {"has": has, "k": k, "ms": ms}
        if target is not None:
            valid = target != self.ignore_index
            tg = torch.where(valid, target, torch.zeros_like(target))
            mine = valid & (tg >= start) & (tg < start + n_loc)
            tl = torch.where(mine, tg - start, torch.zeros_like(tg)).unsqueeze(-1)
            d_y = torch.where(mine, -d.gather(-1, tl).squeeze(-1), torch.zeros_like(ms))
            if eps > 0:  # Σ_c w_c (m − z_c)
                sm = -(d.sum(-1) if self.w_loc is None else d @ self.w_loc)
            else:
                sm = torch.zeros_like(ms)
            _, s_excl = exp_excl_(d, has, k)
            red = torch.stack([s_excl, has.to(z.dtype), d_y, sm], dim=-1)
            state.update(valid=valid, tg=tg, mine=mine, tl=tl.squeeze(-1))
        else:
            wy = self._wy(y, z.dtype)
            wy_k = torch.where(has, wy.gather(-1, k).squeeze(-1), torch.zeros_like(ms))
            wy_x = torch.where(has, wy.scatter(-1, k, 0.0).sum(-1), wy.sum(-1))
            d_w = -(wy.mul_(d)).sum(-1)  # ⟨w y', m − z⟩
            _, s_excl = exp_excl_(d, has, k)
            red = torch.stack([s_excl, has.to(z.dtype), wy_x, wy_k, d_w], -1)
        return red, state

    def finish(self, red, state):
        """Row losses ``(M,)`` from the all-reduced columns; adds what the gradient needs to
        ``state`` (``logs``, ``r``, ``a_z``, the owner mask, the weights)."""
        eps, total, zl = self.eps, self.total, self.zl
        s_ex, c = red[:, 0], red[:, 1]
        r, _, logs = sum_parts(s_ex, c)
        ms = state["ms"]
        lse = ms + logs
        state.update(logs=logs, r=r, owner=state["has"] & (c > 0.5) & (c < 1.5))
        if "valid" in state:
            valid, tg = state["valid"], state["tg"]
            d_y, sm = red[:, 2], red[:, 3]
            vf = valid.to(ms.dtype)
            if self.w_full is None:
                w_y = vf
                w_sum = torch.full_like(ms, float(total))
            else:
                w_y = torch.where(valid, self.w_full[tg], torch.zeros_like(ms))
                w_sum = self.w_full.sum().expand_as(ms)
            rows = (1.0 - eps) * w_y * (d_y + logs)
            if eps > 0:
                rows = rows + (eps / total) * (sm + w_sum * logs) * vf
            a_z = 2.0 * zl * lse * w_y  # the z-loss weighted like the row: ζ w[y_n] lse²
            if zl > 0:
                rows = rows + zl * lse * lse * w_y
            state.update(a_z=a_z, w_y=w_y, w_sum=w_sum)
        else:
            wy_x, wy_own, d_w = red[:, 2], red[:, 3], red[:, 4]
            wy_sum = wy_x + wy_own
            rows = d_w + wy_sum * logs
            a_z = 2.0 * zl * lse
            if zl > 0:
                rows = rows + zl * lse * lse
            state.update(a_z=a_z, wy_x=wy_x, wy_sum=wy_sum)
        return rows, state

    def grad_logits(self, z, y, st, g):
        """``g_n ∂loss_n/∂z`` on the shard (rows of ``st`` and ``g`` matching ``z``); no
        communication, one new tensor (the result; built in place)."""
        eps, total = self.eps, self.total
        k, r, owner, a_z = st["k"], st["r"], st["owner"], st["a_z"]
        out = z - st["ms"].unsqueeze(-1)
        out.sub_(st["logs"].unsqueeze(-1)).exp_()  # σ = exp((z − m) − log S)
        if "valid" in st:
            w_y, w_sum, tl, mine = st["w_y"], st["w_sum"], st["tl"], st["mine"]
            valid = st["valid"]
            vf = valid.to(z.dtype)
            a = (1.0 - eps) * w_y + (eps / total) * w_sum * vf + a_z
            out.mul_(a.unsqueeze(-1))
            out.scatter_add_(-1, tl.unsqueeze(-1), (-(1.0 - eps) * w_y * mine).unsqueeze(-1))
            if eps > 0:
                if self.w_loc is None:
                    out.sub_(((eps / total) * vf).unsqueeze(-1))
                else:
                    out.addr_((eps / total) * vf, self.w_loc, alpha=-1.0)
            # the argmax entry: a σ_k − t_k = (a − t_k) − a r/S, with a − t_k from its parts
            w_k = torch.ones_like(r) if self.w_loc is None else self.w_loc[k.squeeze(-1)]
            hit_k = mine & (tl == k.squeeze(-1))
            a_minus_t = (1.0 - eps) * w_y * (~hit_k) + (eps / total) * (w_sum - w_k) * vf + a_z
            _set_entry_(out, owner, k, a_minus_t - a * (r / (1 + r)))
            out.mul_(g.unsqueeze(-1))
            # ignored rows: exactly 0, even under a 0/0 'mean' (as PyTorch's)
            return out.masked_fill_(~valid.unsqueeze(-1), 0.0)
        a = st["wy_sum"] + a_z
        out.mul_(a.unsqueeze(-1)).sub_(self._wy(y, z.dtype))
        _set_entry_(out, owner, k, (st["wy_x"] + a_z) - a * (r / (1 + r)))
        return out.mul_(g.unsqueeze(-1))

    def grad_probs_target(self, z, st):
        """``∂loss_n/∂y = (1 − ε) w ⊙ (lse_n − z_n)`` (probability targets)."""
        w = (1.0 - self.eps) if self.w_loc is None else (1.0 - self.eps) * self.w_loc
        lse_z = st["logs"].unsqueeze(-1) - (z - st["ms"].unsqueeze(-1))  # from the spread
        return w * lse_z


def _set_entry_(x: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, value: torch.Tensor):
    """In place: ``x[n, k_n] = value_n`` where ``rows`` is True."""
    current = x.gather(-1, k).squeeze(-1)
    return x.scatter_(-1, k, torch.where(rows, value, current).unsqueeze(-1))
