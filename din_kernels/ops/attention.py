"""Target attention: the functional API, the ``torch.library`` ops and the dispatch to a backend.

Each kernel backend owns a pair of ops, ``din_kernels::target_attention_fwd_<backend>`` and ``..._bwd_<backend>``,
with a fake (meta) implementation and autograd, so ``torch.compile(fullgraph=True)`` traces through them and
``torch.library.opcheck`` can test them. The ``reference`` backend is plain autograd PyTorch and needs no op.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from .._validate import check_attention_inputs, check_lengths_values, check_offsets_values
from ..reference.attention import compute_dtype, target_attention_ref
from ..torch_impl import attention as _torch_attention
from .dice import update_running_stats_

SUPPORTED = ("reference", "torch", "triton")


def _fake_fwd(query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, activation,
              normalization, scale, training, eps, save_z1):
    cd = compute_dtype(query, keys, *weights, *biases, *act_weights)
    widths = sum(w.shape[0] for w in weights[:-1]) if activation == "dice" and training else 0
    return (
        query.new_empty(query.shape),
        query.new_empty(keys.shape[:-1]),
        query.new_empty((3, widths), dtype=cd),
        query.new_empty((*keys.shape[:-1], weights[0].shape[0]) if save_z1 else (0,), dtype=cd),
    )


@torch.library.custom_op("din_kernels::target_attention_fwd_torch", mutates_args=())
def target_attention_fwd_torch(
    query: Tensor,
    keys: Tensor,
    lengths: Tensor | None,
    offsets: Tensor | None,
    weights: list[Tensor],
    biases: list[Tensor],
    act_weights: list[Tensor],
    act_means: list[Tensor],
    act_vars: list[Tensor],
    activation: str,
    normalization: str,
    scale: float,
    training: bool,
    eps: float,
    save_z1: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(v_U, w, dice_stats, z1)``: see :func:`din_kernels.torch_impl.attention.attention_fwd`."""
    with torch.no_grad():
        return _torch_attention.attention_fwd(
            query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, activation,
            normalization, scale, training, eps, save_z1,
        )


target_attention_fwd_torch.register_fake(_fake_fwd)


@torch.library.custom_op("din_kernels::target_attention_bwd_torch", mutates_args=())
def target_attention_bwd_torch(
    grad_out: Tensor | None,
    grad_scores: Tensor | None,
    query: Tensor,
    keys: Tensor,
    lengths: Tensor | None,
    offsets: Tensor | None,
    weights: list[Tensor],
    biases: list[Tensor],
    act_weights: list[Tensor],
    act_means: list[Tensor],
    act_vars: list[Tensor],
    z1: Tensor,
    activation: str,
    normalization: str,
    scale: float,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    dq, dk, dw, db, da = _torch_attention.attention_bwd(
        grad_out, grad_scores, query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars,
        activation, normalization, scale, training, eps, z1,
    )
    return dq, dk, dw, db, da


@target_attention_bwd_torch.register_fake
def _(grad_out, grad_scores, query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, z1,
      activation, normalization, scale, training, eps):
    return (
        torch.empty_like(query),
        torch.empty_like(keys),
        [torch.empty_like(w) for w in weights],
        [torch.empty_like(b) for b in biases],
        [torch.empty_like(a) for a in act_weights],
    )


_FWD_INPUTS = ("query", "keys", "lengths", "offsets", "weights", "biases", "act_weights", "act_means", "act_vars")
_FWD_ATTRS = ("activation", "normalization", "scale", "training", "eps")


def _remember(ctx, inputs) -> list:
    """Stores the attributes on ``ctx`` and returns the tensors the backward needs."""
    (query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, *attrs) = inputs
    ctx.attrs = attrs
    ctx.n_stats = (len(act_means), len(act_vars))
    if attrs[3]:  # training: the backward takes the batch statistics, and the running ones change in place
        act_means, act_vars = [], []
    ctx.n = (len(weights), len(biases), len(act_weights), len(act_means), len(act_vars))
    ctx.has_lengths, ctx.has_offsets = lengths is not None, offsets is not None
    saved = [query, keys, *(t for t in (lengths, offsets) if t is not None), *weights, *biases, *act_weights,
             *act_means, *act_vars]
    return saved


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*_remember(ctx, inputs[:-1]), output[3])  # inputs[-1]: save_z1; output[3]: z1


def _unpack(ctx, saved=None):
    saved = list(ctx.saved_tensors) if saved is None else list(saved)
    query, keys = saved[:2]
    rest = saved[2:]
    lengths = rest.pop(0) if ctx.has_lengths else None
    offsets = rest.pop(0) if ctx.has_offsets else None
    groups = []
    for n in ctx.n:
        groups.append(rest[:n])
        rest = rest[n:]
    return query, keys, lengths, offsets, *groups


def _backward(ctx, grad_out, grad_scores, grad_stats, grad_z1):
    *saved, z1 = ctx.saved_tensors
    query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars = _unpack(ctx, saved)
    dq, dk, dw, db, da = target_attention_bwd_torch(
        grad_out, grad_scores, query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, z1,
        *ctx.attrs,
    )
    no_stats = [None] * ctx.n_stats[0], [None] * ctx.n_stats[1]
    return dq, dk, None, None, dw, db, da, *no_stats, None, None, None, None, None, None


target_attention_fwd_torch.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("din_kernels::check_attention_index", mutates_args=())
def check_attention_index(index: Tensor, bound: int, jagged: bool) -> Tensor:
    """Value check of ``lengths`` [B] (``0 <= lengths[b] <= bound = T``) or ``offsets`` [B + 1] (a partition of
    ``bound = N`` rows); returns a copy of ``index`` that the kernel op consumes, so the check stays in a compiled
    graph (it reads the tensor: a device-to-host sync on a GPU; switch it off with ``din_kernels.checks(False)``)."""
    if jagged:
        check_offsets_values(index, bound)
    else:
        check_lengths_values(index, bound)
    return index.clone()


@check_attention_index.register_fake
def _(index, bound, jagged):
    return torch.empty_like(index)


def _define_triton_ops() -> tuple:
    """``(fwd, bwd)``: ``din_kernels::target_attention_{fwd,bwd}_triton``. They are ``torch.library.triton_op`` s, so
    ``torch.compile`` traces into the launchers and keeps the kernels; under ``TRITON_INTERPRET=1`` (kernels on the
    CPU) they are opaque ``custom_op`` s instead, because ``wrap_triton`` cannot trace interpreted kernels. The
    kernel module is imported when an op first runs.

    ``fwd`` returns ``(v_U, w, dice_stats, w32, out32)`` (see
    :func:`din_kernels.triton.attention.target_attention_fwd`); ``bwd`` takes ``grad_out``/``grad_scores``, the
    forward's inputs and its last three outputs, and returns
    ``(d query, d keys, d weights, d biases, d act_weights)``.
    """
    from torch.library import triton_op

    def define(name):
        if not _backend.triton_interpret():
            return triton_op(name, mutates_args=())  # torch.compile sees (and keeps) the kernels

        def opaque(fn):  # wrap_triton returns interpreted kernels unwrapped: a triton_op could not trace them
            op = torch.library.custom_op(name, fn, mutates_args=())
            op.register_fake(fn)  # with fake tensors the launchers only allocate their outputs
            return op

        return opaque

    @define("din_kernels::target_attention_fwd_triton")
    def fwd(
        query: Tensor,
        keys: Tensor,
        lengths: Tensor | None,
        offsets: Tensor | None,
        weights: list[Tensor],
        biases: list[Tensor],
        act_weights: list[Tensor],
        act_means: list[Tensor],
        act_vars: list[Tensor],
        activation: str,
        normalization: str,
        scale: float,
        training: bool,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        from ..triton import attention as _tr

        return _tr.target_attention_fwd(query, keys, lengths, offsets, weights, biases, act_weights, act_means,
                                        act_vars, activation, normalization, scale, training, eps)

    @define("din_kernels::target_attention_bwd_triton")
    def bwd(
        grad_out: Tensor | None,
        grad_scores: Tensor | None,
        query: Tensor,
        keys: Tensor,
        lengths: Tensor | None,
        offsets: Tensor | None,
        weights: list[Tensor],
        biases: list[Tensor],
        act_weights: list[Tensor],
        act_means: list[Tensor],
        act_vars: list[Tensor],
        stats: Tensor,
        w32: Tensor,
        out32: Tensor,
        activation: str,
        normalization: str,
        scale: float,
        training: bool,
        eps: float,
    ) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        from ..triton import attention as _tr

        return _tr.target_attention_bwd(grad_out, grad_scores, query, keys, lengths, offsets, weights, biases,
                                        act_weights, act_means, act_vars, stats, w32, out32, activation,
                                        normalization, scale, training, eps)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*_remember(ctx, inputs), *output[2:])  # dice_stats, w32, out32 last

    def backward(ctx, grad_out, grad_scores, grad_stats, grad_w32, grad_out32):
        saved = list(ctx.saved_tensors)
        outputs = saved[-3:]
        query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars = _unpack(ctx, saved[:-3])
        dq, dk, dw, db, da = bwd(grad_out, grad_scores, query, keys, lengths, offsets, weights, biases, act_weights,
                                 act_means, act_vars, *outputs, *ctx.attrs)
        return (dq, dk, None, None, dw, db, da, [None] * ctx.n_stats[0], [None] * ctx.n_stats[1], None, None, None,
                None, None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return fwd, bwd


# defined at import (torch.compile cannot trace an op's definition), when the optional triton package is present
_TRITON_OPS = _define_triton_ops() if importlib.util.find_spec("triton") is not None else None


def triton_ops() -> tuple:
    """``(fwd, bwd)``: the ``din_kernels::target_attention_{fwd,bwd}_triton`` ops (see :func:`_define_triton_ops`)."""
    if _TRITON_OPS is None:
        raise _backend.BackendUnavailableError(
            "backend 'triton' is not available for target_attention: the 'triton' package is not installed")
    return _TRITON_OPS


def _update_running_stats(act_means, act_vars, stats: Tensor, momentum: float) -> None:
    """Each hidden layer's Dice running statistics from its columns of ``stats`` [3, sum(H)]."""
    start = 0
    for rm, rv in zip(act_means, act_vars):
        mean, var, count = stats[:, start : start + rm.shape[0]].to(rm.dtype)
        start += rm.shape[0]
        update_running_stats_(rm, rv, mean, var, count, momentum)


def _stats_from_ref(stats) -> Tensor:
    return torch.stack([torch.cat([s[j].detach().expand_as(s[0]) for s in stats]) for j in range(3)])


def target_attention(
    query: Tensor,
    keys: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    lengths: Tensor | None = None,
    offsets: Tensor | None = None,
    *,
    activation: str = "sigmoid",
    act_weights: Sequence[Tensor] = (),
    act_means: Sequence[Tensor] = (),
    act_vars: Sequence[Tensor] = (),
    normalization: str = "none",
    softmax_scale: float | None = None,
    training: bool = False,
    momentum: float = 0.1,
    dice_eps: float = 1e-8,
    return_scores: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """DIN's local activation unit and weighted sum pooling (SPEC section 1), functional form.

    Args:
        query: ``[B, D]``, the candidate ad.
        keys: ``[B, T, D]`` padded (with ``lengths`` ``[B]``) or ``[N, D]`` jagged (with ``offsets`` ``[B + 1]``).
        weights, biases: the MLP's ``nn.Linear`` parameters ``[H1, 4D], [H2, H1], ..., [1, Hn]`` and their biases.
        activation: ``sigmoid`` | ``relu`` | ``prelu`` | ``dice``. ``act_weights`` holds the PReLU weights or the
            Dice alphas (one ``[H_i]`` per hidden layer); ``act_means``/``act_vars`` the Dice running statistics,
            updated in place (like ``F.batch_norm``) when ``training`` is True.
        normalization: ``none`` (the paper) or ``softmax`` (of ``softmax_scale * s``, default scale 1).
        return_scores: also return the weights ``w`` (``[B, T]`` padded, ``[N]`` jagged).
        backend: see :mod:`din_kernels.backend`. ``triton`` covers 1 or 2 hidden layers, D and widths up to 256
            whose blocks fit the GPU's shared memory (on an H200, hidden (80, 40): D up to 128 in float32, 256 in
            bfloat16/float16), float32/bfloat16/float16 inputs, and raises ``ValueError``/``TypeError`` beyond that
            (``auto`` then picks ``torch``).
    Returns:
        ``v_U`` ``[B, D]``, or ``(v_U, w)`` when ``return_scores``.
    """
    weights, biases, act_weights = list(weights), list(biases), list(act_weights)
    act_means, act_vars = list(act_means), list(act_vars)
    check_attention_inputs(query, keys, lengths, offsets, weights, biases, activation, act_weights, act_means,
                           act_vars, normalization, training)
    scale = 1.0 if softmax_scale is None else float(softmax_scale)
    name = _backend.resolve(backend, query.device, "target_attention", SUPPORTED)
    if name == "triton":
        from ..triton.attention import check_supported, supports

        if backend == "auto" and not supports(query, keys, weights):  # e.g. float64 or a deeper MLP
            name = "torch"
        else:
            check_supported(query, keys, weights)
    dice_training = activation == "dice" and training
    if name == "reference":
        if _backend.checks_enabled():
            if offsets is not None:
                check_offsets_values(offsets, keys.shape[0])
            else:
                check_lengths_values(lengths, keys.shape[1])
        out, w, stats = target_attention_ref(
            query, keys, weights, biases, lengths, offsets, activation, act_weights, act_means, act_vars,
            normalization, scale, training, dice_eps,
        )
        stats = _stats_from_ref(stats) if dice_training else None
    elif name == "triton":
        if _backend.checks_enabled():
            if offsets is not None:
                offsets = check_attention_index(offsets, keys.shape[0], True)
            else:
                lengths = check_attention_index(lengths, keys.shape[1], False)
        out, w, stats, _, _ = triton_ops()[0](
            query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, activation,
            normalization, scale, training, dice_eps,
        )
    else:
        # keep the first layer's pre-activation only when a backward can follow
        save_z1 = torch.is_grad_enabled() and any(t.requires_grad for t in (query, keys, *weights, *biases,
                                                                              *act_weights))
        out, w, stats, _ = target_attention_fwd_torch(
            query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, activation,
            normalization, scale, training, dice_eps, save_z1,
        )
    if dice_training:
        _update_running_stats(act_means, act_vars, stats, momentum)
    return (out, w) if return_scores else out
