"""Dice in plain PyTorch with a hand-written backward (shared with the attention MLP's hidden layers).

With ``u = (x - E) * r``, ``r = 1 / sqrt(Var + eps)``, ``p = sigmoid(weight * u + bias)`` and
``y = x * (alpha + (1 - alpha) * p)``:

- ``dy/dx`` (statistics held fixed) ``= alpha + (1 - alpha) p + r * g / dy`` with
  ``g = dy * x (1 - alpha) p (1 - p) weight``
- through the batch statistics (training), for the positions V the statistics are taken over (``Nv`` of them):
  ``dx_j += -r / Nv * (sum_i g_i + u_j * sum_i g_i u_i)``, the sums running over every position (as in batch
  normalisation's backward).
- ``d alpha = sum dy * x (1 - p)``, ``d weight = sum g / weight * u``, ``d bias = sum g / weight``.

Without a mask the normalisation is batch normalisation's own: ``weight * u + bias`` comes from ``torch.batch_norm``
(one fused pass), the statistics from ``torch.var_mean`` and the gradient through them (``r * g`` and the correction
above, ``d weight``, ``d bias``) from ``native_batch_norm_backward``, so each direction costs a few fused passes over
``[N, C]`` instead of one elementwise op per term; masked inputs (the attention's padded hidden layers) take the
general formulas.
"""

from __future__ import annotations

import torch


def reduce_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(x.dim() - 1))


def masked_moments(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count over the positions of ``x`` [..., C] where ``mask`` is True (all if None).

    Two passes (mean, then centred squares) for accuracy; zeros when no position is selected.
    """
    dims = reduce_dims(x)
    if mask is None:
        count = torch.tensor(x.numel() // max(x.shape[-1], 1), dtype=x.dtype, device=x.device)
        if x.numel() == 0:
            zeros = x.new_zeros(x.shape[-1])
            return zeros, zeros, count
        var, mean = torch.var_mean(x, dims, correction=0)
        return mean, var, count
    m = mask.unsqueeze(-1)
    count = mask.sum().to(x.dtype)
    denom = count.clamp_min(1)
    mean = torch.where(m, x, 0).sum(dims) / denom  # where, not a product: NaN in unselected rows stays out
    var = torch.where(m, x - mean, 0).square().sum(dims) / denom
    return mean, var, count


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _normalised(x, mean, var, weight, bias, eps) -> torch.Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` in one fused pass (batch normalisation with given stats)."""
    return torch.batch_norm(_flat(x), weight, bias, mean, var, False, 0.0, eps, False).reshape(x.shape)


def dice_forward(x, alpha, mean, var, weight, bias, eps):
    """``y`` of Dice with the given statistics (the fused passes of the module docstring)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    y = torch.sigmoid_(_normalised(x, mean, var, weight, bias, eps))  # p, then y in the same buffer
    return y.mul_(1 - alpha).add_(alpha).mul_(x)


def _gate(x, mean, var, weight, bias, eps):
    """``(p, u, r)``: the gate ``p = sigmoid(weight * u + bias)``, ``u = (x - mean) * r``, ``r = 1 / sqrt(var + eps)``
    (the masked backward's terms; ``y`` itself comes from :func:`dice_forward`)."""
    r = torch.rsqrt(var + eps)
    u = (x - mean) * r
    a = u if weight is None else u * weight
    if bias is not None:
        a = a + bias
    return torch.sigmoid(a), u, r


def _dice_bwd_unmasked(dy, x, alpha, mean, var, weight, bias, training, eps):
    """:func:`dice_bwd` without a mask, through batch normalisation's fused kernels."""
    dims = reduce_dims(x)
    p = torch.sigmoid_(_normalised(x, mean, var, weight, bias, eps))
    gp = dy * x  # three [N, C] buffers in all (p, gp, and batch normalisation's dx), updated in place
    dalpha = gp.sum(dims)
    gp.mul_(p)
    dalpha -= gp.sum(dims)  # sum dy x (1 - p)
    gp.addcmul_(gp, p, value=-1).mul_(1 - alpha)  # dL/d(pre-sigmoid) = dy x (1 - alpha) p (1 - p)
    dx = p.mul_(1 - alpha).add_(alpha).mul_(dy)  # dy (alpha + (1 - alpha) p)
    r = torch.rsqrt(var + eps)
    if training:  # batch normalisation's backward: r * g and the terms through the batch statistics
        dx_bn, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            _flat(gp), _flat(x), weight, None, None, mean, r, True, eps, [True, weight is not None, bias is not None])
        dx += dx_bn.reshape(x.shape)
    else:
        dx.addcmul_(gp, r if weight is None else r * weight)
        dweight = None if weight is None else (gp * ((x - mean) * r)).sum(dims)
        dbias = None if bias is None else gp.sum(dims)
    if alpha.numel() == 1:
        dalpha = dalpha.sum().reshape(alpha.shape)
    return dx, dalpha, dweight, dbias  # the unrequested ones are None


def dice_bwd(dy, x, alpha, mean, var, weight, bias, mask, training, eps, count=None):
    """``(dx, d alpha, d weight or None, d bias or None)``; ``alpha``'s gradient is summed to its shape."""
    if mask is None and x.numel() > 0:
        return _dice_bwd_unmasked(dy, x, alpha, mean, var, weight, bias, training, eps)
    p, u, r = _gate(x, mean, var, weight, bias, eps)
    dims = reduce_dims(x)
    gp = dy * x * (1 - alpha) * p * (1 - p)  # dL/d(pre-sigmoid)
    g = gp if weight is None else gp * weight  # dL/du
    dx = dy * (alpha + (1 - alpha) * p) + r * g
    if training:
        if count is None:
            count = x.new_tensor(x.numel() // max(x.shape[-1], 1)) if mask is None else mask.sum().to(x.dtype)
        coef = -r / count.clamp_min(1)
        corr = coef * (g.sum(dims) + u * (g * u).sum(dims))
        dx = dx + (corr if mask is None else corr * mask.unsqueeze(-1).to(x.dtype))
    dalpha = (dy * x * (1 - p)).sum(dims)
    if alpha.numel() == 1:
        dalpha = dalpha.sum().reshape(alpha.shape)
    dweight = None if weight is None else (gp * u).sum(dims)
    dbias = None if bias is None else gp.sum(dims)
    return dx, dalpha, dweight, dbias
