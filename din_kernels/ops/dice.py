"""Dice: the functional API, the ``torch.library`` ops and the dispatch to a backend (SPEC section 2)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validate import check_device, check_float
from ..reference.attention import compute_dtype
from ..reference.dice import dice_ref
from ..torch_impl.dice import dice_bwd, dice_forward, masked_moments
from ..triton._launch import kernel_op

SUPPORTED = ("reference", "torch", "triton")


def _none_if_empty(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


@torch.library.custom_op("din_kernels::dice_fwd_torch", mutates_args=())
def dice_fwd_torch(
    x: Tensor,
    mask: Tensor | None,
    alpha: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(y [..., C], stats [3, C])``: stats are (mean, biased var, count) of the batch in training, else the
    running statistics and count 0."""
    cd = compute_dtype(x, alpha)
    xc = x.to(cd)
    if training:
        mean, var, count = masked_moments(xc, mask)
    else:
        mean, var, count = running_mean.to(cd), running_var.to(cd), xc.new_zeros(())
    cast = [None if t is None else t.to(cd) for t in (weight, bias)]
    y = dice_forward(xc, alpha.to(cd), mean, var, *cast, eps)
    return y.to(x.dtype), torch.stack([mean, var, count.expand_as(mean)])


@dice_fwd_torch.register_fake
def _(x, mask, alpha, weight, bias, running_mean, running_var, training, eps):
    return torch.empty_like(x), x.new_empty((3, x.shape[-1]), dtype=compute_dtype(x, alpha))


@torch.library.custom_op("din_kernels::dice_bwd_torch", mutates_args=())
def dice_bwd_torch(
    dy: Tensor,
    x: Tensor,
    mask: Tensor | None,
    alpha: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, d alpha, d weight, d bias)``; the last two are empty when ``weight``/``bias`` are None."""
    cd = stats.dtype
    cast = [None if t is None else t.to(cd) for t in (weight, bias)]
    dx, da, dw, db = dice_bwd(dy.to(cd), x.to(cd), alpha.to(cd), stats[0], stats[1], *cast, mask, training, eps,
                              stats[2, 0] if stats.shape[1] else None)
    return (
        dx.to(x.dtype),
        da.to(alpha.dtype),
        x.new_empty(0) if weight is None else dw.to(weight.dtype),
        x.new_empty(0) if bias is None else db.to(bias.dtype),
    )


@dice_bwd_torch.register_fake
def _(dy, x, mask, alpha, weight, bias, stats, training, eps):
    return (
        torch.empty_like(x),
        torch.empty_like(alpha),
        x.new_empty(0) if weight is None else torch.empty_like(weight),
        x.new_empty(0) if bias is None else torch.empty_like(bias),
    )


def _setup_context(ctx, inputs, output):
    x, mask, alpha, weight, bias, _, _, training, eps = inputs
    ctx.training, ctx.eps = training, eps
    ctx.has = (mask is not None, weight is not None, bias is not None)
    ctx.save_for_backward(x, alpha, output[1], *(t for t in (mask, weight, bias) if t is not None))


def _make_backward(bwd_op):
    """The autograd formula of a ``dice_fwd_<backend>`` op, calling its ``dice_bwd_<backend>`` op."""

    def backward(ctx, dy, _dstats):
        x, alpha, stats, *rest = ctx.saved_tensors
        mask, weight, bias = (rest.pop(0) if has else None for has in ctx.has)
        dx, da, dw, db = bwd_op(dy, x, mask, alpha, weight, bias, stats, ctx.training, ctx.eps)
        return dx, None, da, _none_if_empty(dw) if weight is not None else None, \
            _none_if_empty(db) if bias is not None else None, None, None, None, None

    return backward


dice_fwd_torch.register_autograd(_make_backward(dice_bwd_torch), setup_context=_setup_context)


def _fake_fwd_triton(x, mask, alpha, weight, bias, running_mean, running_var, training, eps):
    return x.new_empty(x.shape), x.new_empty((3, x.shape[-1]), dtype=compute_dtype(x, alpha))


@kernel_op("din_kernels::dice_fwd_triton", _fake_fwd_triton)
def dice_fwd_triton(
    x: Tensor,
    mask: Tensor | None,
    alpha: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(y [..., C], stats [3, C])`` as :func:`dice_fwd_torch`, with the Triton kernels of
    :mod:`din_kernels.triton.dice` (one reduction pass for the statistics, one elementwise pass)."""
    from ..triton import dice as _tdice

    cd = compute_dtype(x, alpha)
    if training:
        stats = _tdice.batch_stats(x, mask, cd)
    else:
        stats = torch.stack([running_mean.to(cd), running_var.to(cd), running_mean.new_zeros(x.shape[-1], dtype=cd)])
    return _tdice.dice_forward(x, alpha, weight, bias, stats, eps), stats


def _fake_bwd_triton(dy, x, mask, alpha, weight, bias, stats, training, eps):
    return (
        x.new_empty(x.shape),
        torch.empty_like(alpha),
        x.new_empty(0) if weight is None else torch.empty_like(weight),
        x.new_empty(0) if bias is None else torch.empty_like(bias),
    )


@kernel_op("din_kernels::dice_bwd_triton", _fake_bwd_triton)
def dice_bwd_triton(
    dy: Tensor,
    x: Tensor,
    mask: Tensor | None,
    alpha: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    stats: Tensor,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx, d alpha, d weight, d bias)`` as :func:`dice_bwd_torch`: one reduction pass, one elementwise pass."""
    from ..triton import dice as _tdice

    dx, da, dw, db = _tdice.dice_backward(dy, x, mask, alpha, weight, bias, stats, training, eps)
    da = da.sum().reshape(1) if alpha.numel() == 1 else da
    return (
        dx,
        da.to(alpha.dtype),
        x.new_empty(0) if weight is None else dw.to(weight.dtype),
        x.new_empty(0) if bias is None else db.to(bias.dtype),
    )


dice_fwd_triton.register_autograd(_make_backward(dice_bwd_triton), setup_context=_setup_context)


@kernel_op("din_kernels::dice_update_running_triton", lambda *args: None, mutates_args=("running_mean", "running_var"))
def dice_update_running_triton(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
    """``nn.BatchNorm1d``'s running update from ``stats [3, C]`` (unbiased variance), in place, one launch; channels
    of a batch with no selected position are left unchanged."""
    from ..triton import dice as _tdice

    _tdice.update_running_stats(running_mean, running_var, stats, momentum)


def update_running_stats_(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor,
                          momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance, as
    ``nn.BatchNorm1d``. A batch with no selected position leaves the running statistics unchanged; with one
    position the unbiased variance is taken as 0."""
    with torch.no_grad():
        unbiased = var * count / (count - 1).clamp_min(1)
        keep = count > 0
        running_mean.copy_(torch.where(keep, (1 - momentum) * running_mean + momentum * mean, running_mean))
        running_var.copy_(torch.where(keep, (1 - momentum) * running_var + momentum * unbiased, running_var))


def check_dice_inputs(x, alpha, running_mean, running_var, weight, bias, mask, training) -> None:
    check_float("x", x)
    check_float("alpha", alpha)
    if x.dim() < 1:
        raise ValueError(f"x must have at least 1 dimension [..., C], got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if alpha.dim() != 1 or alpha.shape[0] not in (1, C):
        raise ValueError(f"alpha must have shape [{C}] or [1] for x with C = {C} channels, got {tuple(alpha.shape)}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None:
            check_float(name, t)
            if t.shape != (C,):
                raise ValueError(f"{name} must have shape [{C}] for x with C = {C} channels, got {tuple(t.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("dice in eval mode (training=False) needs running_mean and running_var")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
    check_device(x.device, alpha=alpha, running_mean=running_mean, running_var=running_var, weight=weight,
                 bias=bias, mask=mask)


def dice(
    x: Tensor,
    alpha: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-8,
    backend: str = "auto",
) -> Tensor:
    """Dice activation (the paper's eq. 9), functional form.

    Args:
        x: ``[..., C]``.
        alpha: ``[C]`` (or ``[1]``), the slope of the "off" side.
        running_mean, running_var: ``[C]``; used in eval, updated in place in training (like ``F.batch_norm``).
        weight, bias: ``[C]`` or None: ``sigmoid(weight * z + bias)`` (``affine=True``).
        mask: ``x.shape[:-1]`` bool: the positions the batch statistics are taken over (all when None).
        training: batch statistics (with gradients through them) when True, running statistics when False.
    Returns:
        ``y`` with the shape and dtype of ``x``.
    """
    check_dice_inputs(x, alpha, running_mean, running_var, weight, bias, mask, training)
    name = _backend.resolve(backend, x.device, "dice", SUPPORTED)
    if name == "reference":
        y, mean, var, count = dice_ref(x, alpha, running_mean, running_var, weight, bias, mask, training, eps)
        stats = torch.stack([mean.detach(), var.detach(), count.expand_as(mean)]) if training else None
        y = y.to(x.dtype)
    elif name == "triton":
        y, stats = dice_fwd_triton(x, mask, alpha, weight, bias, running_mean, running_var, training, eps)
        if training and running_mean is not None and running_var is not None:
            dice_update_running_triton(running_mean, running_var, stats, momentum)
        return y
    else:
        y, stats = dice_fwd_torch(x, mask, alpha, weight, bias, running_mean, running_var, training, eps)
    if training and running_mean is not None and running_var is not None:
        update_running_stats_(running_mean, running_var, stats[0].to(running_mean.dtype),
                              stats[1].to(running_var.dtype), stats[2].to(running_var.dtype), momentum)
    return y
