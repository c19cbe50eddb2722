"""Dice in plain PyTorch with a hand-written backward (shared with the attention MLP's hidden layers).

With ``u = (x - E) * r``, ``r = 1 / sqrt(Var + eps)``, ``p = sigmoid(weight * u + bias)`` and
``y = x * (alpha + (1 - alpha) * p)``:

- ``dy/dx`` (statistics held fixed) ``= alpha + (1 - alpha) p + r * g / dy`` with
  ``g = dy * x (1 - alpha) p (1 - p) weight``
- through the batch statistics (training), for the positions V the statistics are taken over (``Nv`` of them):
  ``dx_j += -r / Nv * (sum_i g_i + u_j * sum_i g_i u_i)``, the sums running over every position (as in batch
  normalisation's backward).
- ``d alpha = sum dy * x (1 - p)``, ``d weight = sum g / weight * u``, ``d bias = sum g / weight``.
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
        mean = x.mean(dims)
        var = (x - mean).square().mean(dims)
        return mean, var, count
    m = mask.unsqueeze(-1)
    count = mask.sum().to(x.dtype)
    denom = count.clamp_min(1)
    mean = torch.where(m, x, 0).sum(dims) / denom  # where, not a product: NaN in unselected rows stays out
    var = torch.where(m, x - mean, 0).square().sum(dims) / denom
    return mean, var, count


def dice_act(x, alpha, mean, var, weight, bias, eps):
    """``(y, p, u, r)`` of Dice with the given statistics."""
    r = torch.rsqrt(var + eps)
    u = (x - mean) * r
    a = u if weight is None else u * weight
    if bias is not None:
        a = a + bias
    p = torch.sigmoid(a)
    return x * (alpha + (1 - alpha) * p), p, u, r


def dice_bwd(dy, x, alpha, mean, var, weight, bias, mask, training, eps, count=None):
    """``(dx, d alpha, d weight or None, d bias or None)``; ``alpha``'s gradient is summed to its shape."""
    _, p, u, r = dice_act(x, alpha, mean, var, weight, bias, eps)
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
