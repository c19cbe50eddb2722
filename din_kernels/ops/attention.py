"""Target attention: the functional API, the ``torch.library`` ops of every backend and the dispatch.

Every backend has the same pair of ops, with the schemas ``ATTENTION_FWD`` / ``ATTENTION_BWD`` of
:mod:`din_kernels.ops.schema` (written once; the C++ extension registers the same strings)::

    din_kernels::target_attention_fwd_<backend>(Tensor query, Tensor keys, Tensor? lengths, Tensor? offsets,
        Tensor[] weights, Tensor[] biases, Tensor[] act_weights, Tensor[] act_means, Tensor[] act_vars,
        str activation, str normalization, float scale, bool training, float eps, bool save_z1)
        -> (Tensor out, Tensor scores, Tensor dice_stats, Tensor scores_acc, Tensor out_acc, Tensor z1)
    din_kernels::target_attention_bwd_<backend>(Tensor? grad_out, Tensor? grad_scores, <the forward's inputs>,
        Tensor dice_stats, Tensor scores_acc, Tensor out_acc, Tensor z1, <the options>)
        -> (Tensor grad_query, Tensor grad_keys, Tensor[] grad_weights, Tensor[] grad_biases,
            Tensor[] grad_act_weights)

for ``<backend>`` in ``reference``, ``torch`` and ``triton``, and ``din_kernels::target_attention_fwd`` / ``_bwd``
(no suffix) for the compiled extension, whose one op holds the ``cpu`` and ``cuda`` kernels. Each forward op has a
fake (meta) implementation and the same autograd formula (it saves the inputs and the last four outputs and calls its
backward op), so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace through all of them, and
``torch.library.opcheck`` tests them. The Dice running statistics are never written by an op: the functional updates
them from ``dice_stats`` with ``dice_update_running``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from .._config import MLP, AttentionConfig, AttentionInputs, AttentionSaved
from .._validate import check_attention_inputs, check_lengths_values, check_offsets_values
from ..reference._vjp import vjp
from ..reference.attention import compute_dtype, target_attention_ref
from ..torch_impl import attention as _torch_attention
from . import _define
from .dice import update_running_stats_, warn_if_nonfinite

SUPPORTED = ("reference", "torch", "triton", "cpu", "cuda")
KEEPS_Z1 = ("torch",)  # the backends whose forward keeps the first layer's pre-activation for the backward


N_TENSORS = 5  # query, keys, lengths, offsets, query_offsets: the schema's leading arguments


def _unflatten(args: tuple) -> tuple:
    """Schema arguments ``(query, keys, lengths, offsets, query_offsets, 5 tensor lists, 5 options, ...)`` ->
    ``(AttentionInputs, MLP, AttentionConfig, rest)``."""
    x = AttentionInputs(*args[:N_TENSORS])
    rest = args[N_TENSORS:]
    mlp = MLP(*(list(t) for t in rest[:5]))
    cfg = AttentionConfig(*rest[5:10])
    return x, mlp, cfg, rest[10:]


def _bwd_unflatten(args: tuple) -> tuple:
    """The backward schema's arguments after the two output gradients -> ``(AttentionInputs, MLP, AttentionConfig,
    AttentionSaved)``."""
    n = N_TENSORS + 5
    x, mlp, cfg, _ = _unflatten(args[:n] + args[n + 4:])
    return x, mlp, cfg, AttentionSaved(*args[n:n + 4])


def _scores_shape(query, keys, offsets, query_offsets) -> tuple:
    """``scores``' shape: keys' without D, or [Nq, T] / a data-dependent [sum_i L_u(i)] with ``query_offsets``."""
    if query_offsets is None:
        return tuple(keys.shape[:-1])
    if offsets is None:
        return (query.shape[0], keys.shape[1])
    return (torch.library.get_ctx().new_dynamic_size(),)


def _fwd_shapes(query, keys, offsets, query_offsets, weights, activation, normalization, training, z1: bool):
    """``[(shape, dtype)]`` of the six forward outputs (shared by every fake implementation)."""
    cd = compute_dtype(query, keys, *weights)
    B, D = query.shape
    scores = _scores_shape(query, keys, offsets, query_offsets)
    sum_h = sum(int(w.shape[0]) for w in weights[:-1]) if activation == "dice" and training else 0
    softmax = normalization == "softmax"
    return [
        ((B, D), query.dtype),
        (scores, query.dtype),
        ((3, sum_h), cd),
        (scores if softmax else (0,), cd),
        ((B if softmax else 0, D), cd),
        ((*scores, int(weights[0].shape[0])) if z1 and query_offsets is None else (0,), cd),
    ]


def _make_fake_fwd(keeps_z1: bool) -> Callable:
    def fake(query, keys, lengths, offsets, query_offsets, weights, biases, act_weights, act_means, act_vars,
             activation, normalization, scale, training, eps, save_z1):
        shapes = _fwd_shapes(query, keys, offsets, query_offsets, weights, activation, normalization, training,
                             keeps_z1 and save_z1)
        return tuple(query.new_empty(shape, dtype=dtype) for shape, dtype in shapes)

    return fake


def _fake_bwd(grad_out, grad_scores, query, keys, lengths, offsets, query_offsets, weights, biases, act_weights,
              act_means, act_vars, dice_stats, scores_acc, out_acc, z1, activation, normalization, scale, training,
              eps):
    return (torch.empty_like(query), torch.empty_like(keys), [torch.empty_like(w) for w in weights],
            [torch.empty_like(b) for b in biases], [torch.empty_like(a) for a in act_weights])


def _setup_context(ctx, inputs, output) -> None:
    x, mlp, cfg, _ = _unflatten(inputs)
    ctx.cfg = cfg.op_args()
    means, variances = ([], []) if cfg.training else (mlp.act_means, mlp.act_vars)  # training: written after this
    ctx.n = (len(mlp.weights), len(mlp.biases), len(mlp.act_weights), len(means), len(variances))
    ctx.n_stats = (len(mlp.act_means), len(mlp.act_vars))
    ctx.save_for_backward(*x, *mlp.weights, *mlp.biases, *mlp.act_weights, *means, *variances, *output[2:])


def _saved_inputs(ctx) -> tuple:
    saved = list(ctx.saved_tensors)
    head, rest = saved[:N_TENSORS], saved[N_TENSORS:]
    groups = []
    for n in ctx.n:
        groups.append(rest[:n])
        rest = rest[n:]
    return (*head, *groups), rest  # rest: dice_stats, scores_acc, out_acc, z1


def _make_backward(bwd_op) -> Callable:
    def backward(ctx, grad_out, grad_scores, *_unused):
        inputs, outputs = _saved_inputs(ctx)
        dq, dk, dw, db, da = bwd_op(grad_out, grad_scores, *inputs, *outputs, *ctx.cfg)
        none = [None] * ctx.n_stats[0], [None] * ctx.n_stats[1]
        return dq, dk, None, None, None, dw, db, da, *none, None, None, None, None, None, None

    return backward


def _register(fwd, bwd, keeps_z1: bool, compiled: bool = False):
    """Fake kernels and autograd of one backend's pair of ops."""
    if compiled:
        fwd = _define.compiled("target_attention_fwd", _make_fake_fwd(keeps_z1))
        bwd = _define.compiled("target_attention_bwd", _fake_bwd)
        if fwd is None:
            return None
        torch.library.register_autograd("din_kernels::target_attention_fwd", _make_backward(bwd),
                                        setup_context=_setup_context)
        return fwd, bwd
    fwd.register_autograd(_make_backward(bwd), setup_context=_setup_context)
    return fwd, bwd


# ------------------------------------------------------------------------------------------- the Python backends


def _torch_fwd(*args):
    x, mlp, cfg, (save_z1,) = _unflatten(args)
    with torch.no_grad():
        return _torch_attention.attention_fwd(*x, mlp, cfg, save_z1)


def _torch_bwd(grad_out, grad_scores, *args):
    x, mlp, cfg, saved = _bwd_unflatten(args)
    return _torch_attention.attention_bwd(grad_out, grad_scores, *x, mlp, saved, cfg)


def _reference_outputs(x: AttentionInputs, mlp: MLP, cfg: AttentionConfig):
    out, w, stats = target_attention_ref(x.query, x.keys, mlp.weights, mlp.biases, x.lengths, x.offsets,
                                         cfg.activation, mlp.act_weights, mlp.act_means, mlp.act_vars,
                                         cfg.normalization, cfg.scale, cfg.training, cfg.eps, x.query_offsets)
    return out, w, stats


def _reference_fwd(*args):
    x, mlp, cfg, _ = _unflatten(args)
    with torch.no_grad():
        out, w, stats = _reference_outputs(x, mlp, cfg)
    cd = compute_dtype(x.query, x.keys, *mlp.weights)
    B, D = x.query.shape
    sum_h = sum(mlp.widths) if cfg.dice_training else 0
    dice_stats = (torch.stack([torch.cat([s[j].expand_as(s[0]) for s in stats]) for j in range(3)]).to(cd)
                  if cfg.dice_training else x.query.new_zeros(3, sum_h, dtype=cd))
    if cfg.softmax:
        scores_acc, out_acc = w.to(cd, copy=True), out.to(cd, copy=True)
    else:
        scores_acc, out_acc = x.query.new_empty(0, dtype=cd), x.query.new_empty(0, D, dtype=cd)
    return out, w, dice_stats, scores_acc, out_acc, x.query.new_empty(0, dtype=cd)


def _reference_bwd(grad_out, grad_scores, *args):
    """Autograd through the literal forward, recomputed (the oracle's gradients; see :mod:`..reference._vjp`)."""
    x, mlp, cfg, _ = _bwd_unflatten(args)
    n_act = len(mlp.weights) - 1 if cfg.activation == "dice" else 0
    if cfg.training and n_act:  # the running statistics are not used (nor saved) in training
        mlp = mlp._replace(act_means=[x.query.new_zeros(h) for h in mlp.widths[:n_act]],
                           act_vars=[x.query.new_ones(h) for h in mlp.widths[:n_act]])
    nw, nb = len(mlp.weights), len(mlp.biases)

    def forward(q, k, *params):
        p = list(params)
        grad_mlp = mlp._replace(weights=p[:nw], biases=p[nw:nw + nb], act_weights=p[nw + nb:])
        return _reference_outputs(x._replace(query=q, keys=k), grad_mlp, cfg)[:2]

    grads = vjp(forward, [x.query, x.keys, *mlp.weights, *mlp.biases, *mlp.act_weights], [grad_out, grad_scores])
    return grads[0], grads[1], grads[2:2 + nw], grads[2 + nw:2 + nw + nb], grads[2 + nw + nb:]


_OPS: dict[str, tuple | None] = {
    "reference": _register(_define.define("target_attention_fwd", "reference", _reference_fwd,
                                          _make_fake_fwd(False)),
                           _define.define("target_attention_bwd", "reference", _reference_bwd, _fake_bwd), False),
    "torch": _register(_define.define("target_attention_fwd", "torch", _torch_fwd, _make_fake_fwd(True)),
                       _define.define("target_attention_bwd", "torch", _torch_bwd, _fake_bwd), True),
}


def _triton_fwd(*args):
    from ..triton import attention as _tr

    x, mlp, cfg, _ = _unflatten(args)
    out, w, stats, w32, out32 = _tr.target_attention_fwd(*x[:4], *mlp, *cfg.op_args(), query_offsets=x.query_offsets)
    scores_acc = w32.view(w.shape) if cfg.softmax else w32
    return out, w, stats, scores_acc, out32, x.query.new_empty(0, dtype=torch.float32)


def _triton_bwd(grad_out, grad_scores, *args):
    from ..triton import attention as _tr

    x, mlp, cfg, saved = _bwd_unflatten(args)
    return _tr.target_attention_bwd(grad_out, grad_scores, *x[:4], *mlp, saved.dice_stats,
                                    saved.scores_acc.reshape(-1), saved.out_acc, *cfg.op_args(),
                                    query_offsets=x.query_offsets)


# defined at import (torch.compile cannot trace an op's definition), when the optional triton package is present
if importlib.util.find_spec("triton") is not None:
    _OPS["triton"] = _register(_define.define("target_attention_fwd", "triton", _triton_fwd, _make_fake_fwd(False)),
                               _define.define("target_attention_bwd", "triton", _triton_bwd, _fake_bwd), False)
_OPS["compiled"] = _register(None, None, False, compiled=True)


# the backends whose ops are defined here ("cpu" and "cuda" share the compiled ops, which may be missing)
_DEFINED = tuple(n for n in SUPPORTED if _OPS.get("compiled" if n in ("cpu", "cuda") else n) is not None)


def ops(backend: str) -> tuple:
    """``(fwd, bwd)``: the ops of a concrete backend (``cpu`` and ``cuda`` share the compiled pair)."""
    key = "compiled" if backend in ("cpu", "cuda") else backend
    pair = _OPS.get(key)
    if pair is None:
        raise _backend.BackendUnavailableError(
            f"backend {backend!r} is not available for target_attention: "
            + (_backend.unavailable_reason(backend, torch.device("cuda" if backend == "triton" else backend),
                                           "target_attention") or "its ops are not defined"))
    return pair


@torch.library.custom_op("din_kernels::check_attention_index", mutates_args=())
def check_attention_index(index: Tensor, bound: int, jagged: bool, name: str = "") -> Tensor:
    """Value check of ``lengths`` [B] (``0 <= lengths[b] <= bound = T``) or ``offsets`` [B + 1] (a partition of
    ``bound = N`` rows; ``name`` "query_offsets": of the ``bound`` query rows); returns a copy of ``index`` that the
    kernel op consumes, so the check stays in a compiled graph (it reads the tensor: a device-to-host sync on a GPU;
    switch it off with ``din_kernels.checks(False)``)."""
    if jagged and name:  # query_offsets of the query rows; candidate_offsets (DIN.rank) of the candidates
        check_offsets_values(index, bound, name, {"query_offsets": "query rows"}.get(name, "candidates"))
    elif jagged:
        check_offsets_values(index, bound)
    else:
        check_lengths_values(index, bound)
    return index.clone()


@check_attention_index.register_fake
def _(index, bound, jagged, name=""):
    return torch.empty_like(index)


def _update_running_stats(act_means, act_vars, stats: Tensor, momentum: float | Sequence[float]) -> None:
    """Each hidden layer's Dice running statistics from its columns of ``stats`` [3, sum(H)] (``momentum``: one for
    all layers or one per layer)."""
    momenta = [momentum] * len(act_means) if isinstance(momentum, (int, float)) else list(momentum)
    if len(momenta) != len(act_means):
        raise ValueError(f"momentum must be one float or one per hidden layer ({len(act_means)}), got {momentum}")
    start = 0
    for rm, rv, m in zip(act_means, act_vars, momenta):
        update_running_stats_(rm, rv, stats[:, start : start + rm.shape[0]], float(m))
        start += rm.shape[0]


def _supports(name: str, query: Tensor, keys: Tensor, mlp: MLP) -> bool:
    """Whether backend ``name`` covers these sizes and dtypes (``auto`` skips those that do not)."""
    if name == "triton":
        from ..triton.attention import supports

        return supports(query, keys, mlp.weights)
    if name in ("cpu", "cuda"):
        from .. import _extension

        return _extension.supports_attention(name, query, keys, mlp)
    return True


def _check_supported(name: str, query: Tensor, keys: Tensor, mlp: MLP) -> None:
    if name == "triton":
        from ..triton.attention import check_supported

        check_supported(query, keys, mlp.weights)
    elif name in ("cpu", "cuda"):
        from .. import _extension

        _extension.check_attention(name, query, keys, mlp)


def target_attention(
    query: Tensor,
    keys: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor],
    lengths: Tensor | None = None,
    offsets: Tensor | None = None,
    *,
    query_offsets: Tensor | None = None,
    activation: str = "sigmoid",
    act_weights: Sequence[Tensor] = (),
    act_means: Sequence[Tensor] = (),
    act_vars: Sequence[Tensor] = (),
    normalization: str = "none",
    softmax_scale: float | None = None,
    training: bool = False,
    momentum: float | Sequence[float] = 0.1,
    dice_eps: float = 1e-8,
    return_scores: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """DIN's local activation unit and weighted sum pooling (SPEC section 1), functional form.

    Args:
        query: ``[B, D]``, the candidate ad.
        keys: ``[B, T, D]`` padded (with ``lengths`` ``[B]``; ``lengths=None`` means all T valid) or ``[N, D]``
            jagged (with ``offsets`` ``[B + 1]``). Invalid ``lengths``/``offsets`` values raise ``ValueError``;
            with ``din_kernels.checks(False)`` they are clamped instead (no error, no access out of bounds, an
            unspecified result).
        query_offsets: ``[U + 1]``, several candidates per history (ranking many ads for one user; sampled
            negatives in training): ``query`` is then ``[Nq, D]``, the candidates of user u are its rows
            ``query_offsets[u] : query_offsets[u + 1]``, and ``keys``/``lengths``/``offsets`` describe the U users.
            The result equals the op on each user's history repeated once per candidate (``v_U`` ``[Nq, D]``,
            scores ``[Nq, T]`` padded or ``[sum_i L_u(i)]`` jagged in candidate order), without building that
            repeat: each user's keys are read once for a tile of its candidates.
        weights, biases: the MLP's ``nn.Linear`` parameters ``[H1, 4D], [H2, H1], ..., [1, Hn]`` and their biases.
        activation: ``sigmoid`` | ``relu`` | ``prelu`` | ``dice``. ``act_weights`` holds the PReLU weights or the
            Dice alphas (one ``[H_i]`` per hidden layer); ``act_means``/``act_vars`` the Dice running statistics,
            updated in place (like ``F.batch_norm``, with ``momentum``: one float or one per hidden layer) when
            ``training`` is True; a batch whose statistics are not finite leaves them unchanged.
        normalization: ``none`` (the paper) or ``softmax`` (of ``softmax_scale * s``, default scale 1).
        return_scores: also return the weights ``w`` (``[B, T]`` padded, ``[N]`` jagged; see ``query_offsets``).
        backend: see :mod:`din_kernels.backend`. ``triton`` covers 1 or 2 hidden layers, D and widths up to 256
            whose blocks fit the GPU's shared memory (on an H200, hidden (80, 40): D up to 128 in float32, 256 in
            bfloat16/float16), float32/bfloat16/float16 inputs, and raises ``ValueError``/``TypeError`` beyond that;
            ``cpu`` covers 1 to 3 hidden layers of widths up to 256 in float32/bfloat16/float64. ``auto`` skips a
            backend that does not cover the call.
    Returns:
        ``v_U`` ``[B, D]``, or ``(v_U, w)`` when ``return_scores``.
    """
    mlp = MLP(list(weights), list(biases), list(act_weights), list(act_means), list(act_vars))
    if lengths is None and offsets is None and keys.dim() == 3:  # padded keys, every position valid
        lengths = torch.full((keys.shape[0],), keys.shape[1], dtype=torch.long, device=keys.device)
    check_attention_inputs(query, keys, lengths, offsets, *mlp[:2], activation, *mlp[2:], normalization, training,
                           query_offsets)
    cfg = AttentionConfig(activation, normalization, 1.0 if softmax_scale is None else float(softmax_scale),
                          bool(training), float(dice_eps))
    covering = tuple(n for n in SUPPORTED if n in _DEFINED and _supports(n, query, keys, mlp)) \
        if backend == "auto" else None
    name = _define.resolve(backend, query.device, "target_attention", SUPPORTED, covering)
    _check_supported(name, query, keys, mlp)
    if _backend.checks_enabled():
        if offsets is not None:
            offsets = check_attention_index(offsets, keys.shape[0], True)
        else:
            lengths = check_attention_index(lengths, keys.shape[1], False)
        if query_offsets is not None:
            query_offsets = check_attention_index(query_offsets, query.shape[0], True, "query_offsets")
    fwd, _ = ops(name)
    # keep the first layer's pre-activation only when a backward can follow
    save_z1 = name in KEEPS_Z1 and query_offsets is None and torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, keys, *mlp.weights, *mlp.biases, *mlp.act_weights))
    out, w, stats, *_ = fwd(query, keys, lengths, offsets, query_offsets, *mlp.op_args(), *cfg.op_args(), save_z1)
    if cfg.dice_training:
        _update_running_stats(mlp.act_means, mlp.act_vars, stats, momentum)
        warn_if_nonfinite(stats, "target_attention")
    return (out, w) if return_scores else out
