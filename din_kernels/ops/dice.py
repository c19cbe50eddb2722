"""Dice: the functional API, the ``torch.library`` ops of every backend and the dispatch (SPEC section 2).

Every backend has the same three ops, with the schemas ``DICE_FWD``, ``DICE_BWD`` and ``DICE_UPDATE_RUNNING`` of
:mod:`din_kernels.ops.schema`::

    din_kernels::dice_fwd_<backend>(Tensor x, Tensor? mask, Tensor alpha, Tensor? weight, Tensor? bias,
        Tensor? running_mean, Tensor? running_var, bool training, float eps) -> (Tensor y, Tensor stats)
    din_kernels::dice_bwd_<backend>(Tensor grad_y, Tensor x, Tensor? mask, Tensor alpha, Tensor? weight,
        Tensor? bias, Tensor stats, bool training, float eps)
        -> (Tensor grad_x, Tensor grad_alpha, Tensor grad_weight, Tensor grad_bias)
    din_kernels::dice_update_running_<backend>(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor stats,
        float momentum) -> ()

for ``reference``, ``torch`` and ``triton``; the compiled extension's ``din_kernels::dice_fwd`` etc. (no suffix)
hold the ``cpu`` (and ``cuda``) kernels. The forward saves ``x`` and ``stats`` (and the mask and affine parameters)
for its backward, on every backend.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .. import backend as _backend
from .._validate import check_device, check_float
from ..reference._vjp import vjp
from ..reference.attention import compute_dtype
from ..reference.dice import dice_ref
from ..torch_impl.dice import dice_bwd, dice_forward, masked_moments
from . import _define

SUPPORTED = ("reference", "torch", "triton", "cpu", "cuda")


def _fake_fwd(x, mask, alpha, weight, bias, running_mean, running_var, training, eps):
    return x.new_empty(x.shape), x.new_empty((3, x.shape[-1]), dtype=compute_dtype(x, alpha))


def _fake_bwd(dy, x, mask, alpha, weight, bias, stats, training, eps):
    return (
        x.new_empty(x.shape),
        torch.empty_like(alpha),
        x.new_empty(0) if weight is None else torch.empty_like(weight),
        x.new_empty(0) if bias is None else torch.empty_like(bias),
    )


def _fake_update(running_mean, running_var, stats, momentum):
    return None


def _setup_context(ctx, inputs, output):
    x, mask, alpha, weight, bias, _, _, training, eps = inputs
    ctx.training, ctx.eps = training, eps
    ctx.save_for_backward(x, alpha, output[1], mask, weight, bias)


def _make_backward(bwd_op) -> Callable:
    def backward(ctx, dy, _dstats):
        x, alpha, stats, mask, weight, bias = ctx.saved_tensors
        dx, da, dw, db = bwd_op(dy, x, mask, alpha, weight, bias, stats, ctx.training, ctx.eps)
        return (dx, None, da, dw if weight is not None else None, db if bias is not None else None, None, None,
                None, None)

    return backward


def _define_family(backend: str, fwd: Callable, bwd: Callable, update: Callable) -> tuple:
    fwd_op = _define.define("dice_fwd", backend, fwd, _fake_fwd)
    bwd_op = _define.define("dice_bwd", backend, bwd, _fake_bwd)
    update_op = _define.define("dice_update_running", backend, update, _fake_update)
    fwd_op.register_autograd(_make_backward(bwd_op), setup_context=_setup_context)
    return fwd_op, bwd_op, update_op


def _compiled_family() -> tuple | None:
    fwd = _define.compiled("dice_fwd", _fake_fwd)
    if fwd is None:
        return None
    bwd = _define.compiled("dice_bwd", _fake_bwd)
    update = _define.compiled("dice_update_running", _fake_update)
    torch.library.register_autograd("din_kernels::dice_fwd", _make_backward(bwd), setup_context=_setup_context)
    return fwd, bwd, update


# ------------------------------------------------------------------------------------------- the Python backends


def _affine_grads(x, weight, bias, dw, db):
    return (x.new_empty(0) if weight is None else dw.to(weight.dtype),
            x.new_empty(0) if bias is None else db.to(bias.dtype))


def _torch_fwd(x, mask, alpha, weight, bias, running_mean, running_var, training, eps):
    cd = compute_dtype(x, alpha)
    xc = x.to(cd)
    if training:
        mean, var, count = masked_moments(xc, mask)
    else:
        mean, var, count = running_mean.to(cd), running_var.to(cd), xc.new_zeros(())
    cast = [None if t is None else t.to(cd) for t in (weight, bias)]
    y = dice_forward(xc, alpha.to(cd), mean, var, *cast, eps)  # a fresh tensor
    return y.to(x.dtype), torch.stack([mean, var, count.expand_as(mean)])


def _torch_bwd(dy, x, mask, alpha, weight, bias, stats, training, eps):
    cd = stats.dtype
    cast = [None if t is None else t.to(cd) for t in (weight, bias)]
    dx, da, dw, db = dice_bwd(dy.to(cd), x.to(cd), alpha.to(cd), stats[0], stats[1], *cast, mask, training, eps,
                              stats[2, 0] if stats.shape[1] else None)
    return (dx.to(x.dtype), da.to(alpha.dtype), *_affine_grads(x, weight, bias, dw, db))


def update_running_stats_(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
    """``running = (1 - momentum) * running + momentum * batch`` with the unbiased batch variance, as
    ``nn.BatchNorm1d``, from ``stats`` [3, C] (mean, biased variance, count). A channel whose batch had no selected
    position, or whose batch statistics are not finite (NaN or Inf in the input), keeps its running statistics;
    with one position the unbiased variance is taken as 0."""
    with torch.no_grad():
        mean, var, count = stats.to(running_mean.dtype)
        unbiased = var * count / (count - 1).clamp_min(1)
        keep = (count > 0) & torch.isfinite(mean) & torch.isfinite(unbiased)
        running_mean.copy_(torch.where(keep, (1 - momentum) * running_mean + momentum * mean, running_mean))
        running_var.copy_(torch.where(keep, (1 - momentum) * running_var + momentum * unbiased, running_var))


def _reference_fwd(x, mask, alpha, weight, bias, running_mean, running_var, training, eps):
    cd = compute_dtype(x, alpha)
    with torch.no_grad():
        y, mean, var, count = dice_ref(x.to(cd), alpha.to(cd), running_mean, running_var, weight, bias, mask,
                                       training, eps)
    stats = torch.stack([mean.to(cd), var.to(cd), count.to(cd).expand(mean.shape)])
    return y.to(x.dtype), stats


def _reference_bwd(dy, x, mask, alpha, weight, bias, stats, training, eps):
    """Autograd through the literal formula, recomputed (with the batch statistics in training)."""
    cd = stats.dtype
    affine = [t.to(cd) for t in (weight, bias) if t is not None]

    def forward(xc, ac, *wb):
        wb = list(wb)
        w = wb.pop(0) if weight is not None else None
        b = wb.pop(0) if bias is not None else None
        return (dice_ref(xc, ac, stats[0], stats[1], w, b, mask, training, eps)[0],)

    dx, da, *rest = vjp(forward, [x.to(cd), alpha.to(cd), *affine], [dy])
    dw = rest.pop(0) if weight is not None else None
    db = rest.pop(0) if bias is not None else None
    return dx.to(x.dtype), da.to(alpha.dtype), *_affine_grads(x, weight, bias, dw, db)


def _triton_fwd(x, mask, alpha, weight, bias, running_mean, running_var, training, eps):
    from ..triton import dice as _tdice

    cd = compute_dtype(x, alpha)
    if training:
        stats = _tdice.batch_stats(x, mask, cd)
    else:
        stats = torch.stack([running_mean.to(cd), running_var.to(cd), running_mean.new_zeros(x.shape[-1], dtype=cd)])
    return _tdice.dice_forward(x, alpha, weight, bias, stats, eps), stats


def _triton_bwd(dy, x, mask, alpha, weight, bias, stats, training, eps):
    from ..triton import dice as _tdice

    dx, da, dw, db = _tdice.dice_backward(dy, x, mask, alpha, weight, bias, stats, training, eps)
    da = da.sum().reshape(1) if alpha.numel() == 1 else da
    return dx, da.to(alpha.dtype), *_affine_grads(x, weight, bias, dw, db)


def _triton_update(running_mean, running_var, stats, momentum):
    from ..triton import dice as _tdice

    _tdice.update_running_stats(running_mean, running_var, stats, momentum)


_OPS: dict[str, tuple | None] = {
    "reference": _define_family("reference", _reference_fwd, _reference_bwd, update_running_stats_),
    "torch": _define_family("torch", _torch_fwd, _torch_bwd, update_running_stats_),
}
if importlib.util.find_spec("triton") is not None:
    _OPS["triton"] = _define_family("triton", _triton_fwd, _triton_bwd, _triton_update)
_OPS["compiled"] = _compiled_family()


def ops(backend: str) -> tuple:
    """``(fwd, bwd, update_running)``: the Dice ops of a concrete backend."""
    pair = _OPS.get("compiled" if backend in ("cpu", "cuda") else backend)
    if pair is None:
        raise _backend.BackendUnavailableError(f"backend {backend!r} is not available for dice: its ops are not "
                                               "defined")
    return pair


def check_dice_inputs(x, alpha, running_mean, running_var, weight, bias, mask, training) -> None:
    check_float("x", x)
    check_float("alpha", alpha)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., N, C] (positions, then channels), got shape "
                         f"{tuple(x.shape)}; for one position use x[None]")
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


_warned_nonfinite = False


def warn_if_nonfinite(stats: Tensor, where: str) -> None:
    """Warns once per process when a training batch's Dice statistics are not finite (their running update is then
    skipped). Checked on CPU tensors in eager mode only: on a GPU the check would be a device-to-host sync."""
    global _warned_nonfinite
    if _warned_nonfinite or stats.device.type != "cpu" or torch.compiler.is_compiling() or stats.numel() == 0:
        return
    if not bool(torch.isfinite(stats).all()):
        _warned_nonfinite = True
        warnings.warn(f"{where}: a training batch gave non-finite Dice statistics (NaN or Inf in the input); the "
                      "running statistics of those channels were left unchanged", RuntimeWarning, stacklevel=3)


def _dice_covers(name: str, x: Tensor) -> bool:
    if name in ("cpu", "cuda"):
        from .. import _extension

        return _extension.supports_dtype(name, x.dtype)
    return True


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
        x: ``[..., N, C]`` (at least 2-D: the statistics run over every dim but the last).
        alpha: ``[C]`` (or ``[1]``), the slope of the "off" side.
        running_mean, running_var: ``[C]``; used in eval, updated in place in training (like ``F.batch_norm``);
            a batch whose statistics are not finite leaves them unchanged (with one warning per process on a CPU).
        weight, bias: ``[C]`` or None: ``sigmoid(weight * z + bias)`` (``affine=True``).
        mask: ``x.shape[:-1]`` bool: the positions the batch statistics are taken over (all when None).
        training: batch statistics (with gradients through them) when True, running statistics when False.
    Returns:
        ``y`` with the shape and dtype of ``x``.
    """
    check_dice_inputs(x, alpha, running_mean, running_var, weight, bias, mask, training)
    covering = tuple(n for n in SUPPORTED if _dice_covers(n, x)) if backend == "auto" else None
    name = _define.resolve(backend, x.device, "dice", SUPPORTED, covering)
    fwd, _, update = ops(name)
    y, stats = fwd(x, mask, alpha, weight, bias, running_mean, running_var, training, eps)
    if training and running_mean is not None and running_var is not None:
        update(running_mean, running_var, stats, momentum)
        warn_if_nonfinite(stats, "dice")
    return y
