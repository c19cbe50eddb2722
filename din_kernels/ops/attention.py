"""Target attention: the functional API, the ``torch.library`` ops and the dispatch to a backend.

Each kernel backend owns a pair of ops, ``din_kernels::target_attention_fwd_<backend>`` and ``..._bwd_<backend>``,
with a fake (meta) implementation and autograd, so ``torch.compile(fullgraph=True)`` traces through them and
``torch.library.opcheck`` can test them. The ``reference`` backend is plain autograd PyTorch and needs no op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from .._validate import check_attention_inputs, check_lengths_values, check_offsets_values
from ..reference.attention import compute_dtype, target_attention_ref
from ..torch_impl import attention as _torch_attention
from .dice import update_running_stats_

SUPPORTED = ("reference", "torch")


def _fake_fwd(query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, activation,
              normalization, scale, training, eps):
    cd = compute_dtype(query, keys, *weights, *biases, *act_weights)
    widths = sum(w.shape[0] for w in weights[:-1]) if activation == "dice" and training else 0
    return (
        query.new_empty(query.shape),
        query.new_empty(keys.shape[:-1]),
        query.new_empty((3, widths), dtype=cd),
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
) -> tuple[Tensor, Tensor, Tensor]:
    """``(v_U, w, dice_stats)``: see :func:`din_kernels.torch_impl.attention.attention_fwd`."""
    with torch.no_grad():
        return _torch_attention.attention_fwd(
            query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, activation,
            normalization, scale, training, eps,
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
    activation: str,
    normalization: str,
    scale: float,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    dq, dk, dw, db, da = _torch_attention.attention_bwd(
        grad_out, grad_scores, query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars,
        activation, normalization, scale, training, eps,
    )
    return dq, dk, dw, db, da


@target_attention_bwd_torch.register_fake
def _(grad_out, grad_scores, query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars,
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


def _setup_context(ctx, inputs, output):
    (query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, *attrs) = inputs
    ctx.attrs = attrs
    ctx.n_stats = (len(act_means), len(act_vars))
    if attrs[3]:  # training: the backward takes the batch statistics, and the running ones change in place
        act_means, act_vars = [], []
    ctx.n = (len(weights), len(biases), len(act_weights), len(act_means), len(act_vars))
    ctx.has_lengths, ctx.has_offsets = lengths is not None, offsets is not None
    saved = [query, keys, *(t for t in (lengths, offsets) if t is not None), *weights, *biases, *act_weights,
             *act_means, *act_vars]
    ctx.save_for_backward(*saved)


def _unpack(ctx):
    saved = list(ctx.saved_tensors)
    query, keys = saved[:2]
    rest = saved[2:]
    lengths = rest.pop(0) if ctx.has_lengths else None
    offsets = rest.pop(0) if ctx.has_offsets else None
    groups = []
    for n in ctx.n:
        groups.append(rest[:n])
        rest = rest[n:]
    return query, keys, lengths, offsets, *groups


def _backward(ctx, grad_out, grad_scores, grad_stats):
    query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars = _unpack(ctx)
    dq, dk, dw, db, da = target_attention_bwd_torch(
        grad_out, grad_scores, query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars,
        *ctx.attrs,
    )
    return dq, dk, None, None, dw, db, da, [None] * ctx.n_stats[0], [None] * ctx.n_stats[1], None, None, None, None, None


target_attention_fwd_torch.register_autograd(_backward, setup_context=_setup_context)


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
        backend: see :mod:`din_kernels.backend`.
    Returns:
        ``v_U`` ``[B, D]``, or ``(v_U, w)`` when ``return_scores``.
    """
    weights, biases, act_weights = list(weights), list(biases), list(act_weights)
    act_means, act_vars = list(act_means), list(act_vars)
    check_attention_inputs(query, keys, lengths, offsets, weights, biases, activation, act_weights, act_means,
                           act_vars, normalization, training)
    scale = 1.0 if softmax_scale is None else float(softmax_scale)
    name = _backend.resolve(backend, query.device, "target_attention", SUPPORTED)
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
    else:
        out, w, stats = target_attention_fwd_torch(
            query, keys, lengths, offsets, weights, biases, act_weights, act_means, act_vars, activation,
            normalization, scale, training, dice_eps,
        )
    if dice_training:
        _update_running_stats(act_means, act_vars, stats, momentum)
    return (out, w) if return_scores else out
