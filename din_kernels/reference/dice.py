"""Dice (SPEC section 2), literally: the oracle of every Dice backend."""

from __future__ import annotations

import torch


def masked_moments(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` [..., C] over the positions where ``mask`` [...] is True.

    Returns ``(mean [C], var [C], count [])``; with no position selected, mean = var = 0 (never NaN).
    """
    flat = x.reshape(-1, x.shape[-1])
    if mask is not None:
        flat = flat[mask.reshape(-1)]
    count = torch.tensor(flat.shape[0], dtype=x.dtype, device=x.device)
    if flat.shape[0] == 0:
        zeros = x.new_zeros(x.shape[-1])
        return zeros, zeros, count
    mean = flat.mean(0)
    var = ((flat - mean) ** 2).mean(0)
    return mean, var, count


def dice_ref(
    x: torch.Tensor,
    alpha: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    training: bool = True,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with ``p = sigmoid(weight * (s - E) / sqrt(Var + eps) + bias)``.

    Args:
        x: ``[..., C]``.
        alpha: ``[C]`` (or ``[1]``).
        running_mean, running_var: ``[C]``, used when ``training`` is False.
        weight, bias: ``[C]`` or None (``affine=False``).
        mask: ``x.shape[:-1]`` bool or None: the positions the batch statistics are taken over.
    Returns:
        ``(y [..., C], batch_mean [C], batch_var [C] (biased), count [])``; in eval the running statistics and
        count 0 are returned in place of the batch ones.
    """
    if training:
        mean, var, count = masked_moments(x, mask)
    else:
        mean, var = running_mean, running_var
        count = x.new_zeros(())
    z = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        z = z * weight
    if bias is not None:
        z = z + bias
    p = torch.sigmoid(z)
    y = p * x + (1 - p) * alpha * x
    return y, mean, var, count
