"""Mini-batch aware L2 regularisation: the functional API, the ``torch.library`` ops of every backend and the
dispatch (SPEC section 3).

Every backend has the same five ops, with the schemas of :mod:`din_kernels.ops.schema`::

    din_kernels::mba_l2_dense_<backend>(Tensor weight, Tensor(a!) grad, Tensor ids, Tensor counts, float lam,
        int? padding_idx) -> Tensor                                   # the penalty; grad updated in place
    din_kernels::mba_penalty_<backend>(Tensor weight, Tensor ids, Tensor counts, float lam, int? padding_idx)
        -> Tensor
    din_kernels::mba_embedding_<backend>(Tensor weight, Tensor ids, Tensor counts, float lam, int? padding_idx,
        bool sparse) -> Tensor                                        # the lookup, with autograd
    din_kernels::mba_embedding_bwd_dense_<backend>(Tensor grad_out, Tensor ids, Tensor weight, Tensor counts,
        float lam, int? padding_idx) -> Tensor                        # [K, D]
    din_kernels::mba_embedding_bwd_sparse_<backend>(<the same>) -> (Tensor indices, Tensor values)  # [M], [M, D]

for ``reference``, ``torch`` and ``triton``, and ``din_kernels::<op>`` (no suffix) for the compiled extension's
``cuda`` kernels (csrc/cuda/mba.cu: one sort of the step's ids, then one warp per distinct id sums its output-gradient
rows and adds the MBA term, fused). No output's shape depends on the values of ``ids`` (the sparse gradient has one
entry per lookup, zero where a lookup is not the row's owner), so ``torch.compile(fullgraph=True)`` traces them. Every
op reads only rows ``0 <= id < K``: ids outside the table (possible only with the checks off) are skipped. The
compiled C++ CPU kernels do not cover MBA: its cost is a sort and a gather-scatter of the batch's rows, which the
``torch`` backend already runs in ATen's kernels (benchmarks/results: make bench's ``mba`` rows).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension
from .. import backend as _backend
from .._validate import check_device, check_float, check_index
from ..reference.mba import mba_l2_ref
from . import _define

SUPPORTED = ("reference", "torch", "triton", "cuda")


def _acc_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _valid(ids: Tensor, K: int, padding_idx: int | None) -> Tensor:
    """``ids.shape`` bool: inside the table and not the padding id."""
    valid = (ids >= 0) & (ids < K)
    return valid if padding_idx is None else valid & (ids != padding_idx)


def distinct_ids(ids: Tensor, K: int, padding_idx: int | None) -> Tensor:
    """The distinct ids of a batch inside ``[0, K)``, without ``padding_idx`` (``torch.unique``; a host sync on a
    GPU: the count is data-dependent)."""
    flat = ids.reshape(-1)
    return torch.unique(flat[_valid(flat, K, padding_idx)])


def mba_rows(weight: Tensor, distinct: Tensor, counts: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """``(lam * W[j] / n[j] for each distinct j  [U, D], penalty [])``, computed in float32 or better."""
    cd = _acc_dtype(weight)
    w = weight[distinct].to(cd)
    n = counts[distinct].to(cd).clamp_min(1)
    penalty = lam / 2 * ((w * w).sum(1) / n).sum()
    return lam * w / n.unsqueeze(1), penalty


# ------------------------------------------------------------------------------------------------ fake kernels


def _fake_penalty(weight, *args):
    return weight.new_empty(())


def _fake_embedding(weight, ids, counts, lam, padding_idx, sparse):
    return weight.new_empty((*ids.shape, weight.shape[1]))


def _fake_bwd_dense(grad_out, ids, weight, counts, lam, padding_idx):
    return torch.empty_like(weight)


def _fake_bwd_sparse(grad_out, ids, weight, counts, lam, padding_idx):
    M = ids.numel()
    return ids.new_empty(M, dtype=torch.long), weight.new_empty(M, weight.shape[1])


# ---------------------------------------------------------------------------------------------------- backends


def _lookup(weight, ids, counts, lam, padding_idx, sparse):
    """The forward of every backend: ``weight[ids]`` with the ids clamped into the table."""
    return F.embedding(ids.clamp(0, max(weight.shape[0] - 1, 0)), weight)


def _torch_l2_dense(weight, grad, ids, counts, lam, padding_idx):
    distinct = distinct_ids(ids, weight.shape[0], padding_idx)
    rows, penalty = mba_rows(weight, distinct, counts, lam)
    grad.index_add_(0, distinct, rows.to(grad.dtype))
    return penalty.to(weight.dtype)


def _torch_penalty(weight, ids, counts, lam, padding_idx):
    return mba_rows(weight, distinct_ids(ids, weight.shape[0], padding_idx), counts, lam)[1].to(weight.dtype)


def _flat_lookups(grad_out, ids, weight, padding_idx):
    """``(ids [M] clamped into the table, valid [M], grad_out [M, D] zero at invalid lookups)``."""
    K, D = weight.shape
    flat = ids.reshape(-1).long()
    valid = _valid(flat, K, padding_idx)
    safe = torch.where(valid, flat, 0)
    g = torch.where(valid[:, None], grad_out.reshape(-1, D), 0).to(weight.dtype)
    return safe, valid, g


def _torch_bwd_dense(grad_out, ids, weight, counts, lam, padding_idx):
    safe, valid, g = _flat_lookups(grad_out, ids, weight, padding_idx)
    grad = torch.zeros_like(weight).index_add_(0, safe, g)
    if lam:
        distinct = torch.unique(safe[valid])
        grad.index_add_(0, distinct, mba_rows(weight, distinct, counts, lam)[0].to(weight.dtype))
    return grad


def _torch_bwd_sparse(grad_out, ids, weight, counts, lam, padding_idx):
    """One entry per lookup: its output-gradient row plus ``lam * W[j] / (n[j] c[j])``, where ``c[j]`` is how often
    the step looks ``j`` up, so the entries of ``j`` sum to exactly its MBA term once."""
    safe, valid, values = _flat_lookups(grad_out, ids, weight, padding_idx)
    if lam and safe.numel():
        _, inverse, lookups = torch.unique(safe, return_inverse=True, return_counts=True)
        cd = _acc_dtype(weight)
        share = lam / (counts[safe].to(cd).clamp_min(1) * lookups[inverse].to(cd))
        term = weight[safe].to(cd) * torch.where(valid, share, 0)[:, None]
        values = values + term.to(weight.dtype)
    return safe, values


def _reference_l2_dense(weight, grad, ids, counts, lam, padding_idx):
    flat = ids.reshape(-1)
    new, penalty = mba_l2_ref(weight, grad, flat[_valid(flat, weight.shape[0], None)], counts, lam, padding_idx)
    grad.copy_(new)
    return penalty


def _reference_penalty(weight, ids, counts, lam, padding_idx):
    return _reference_l2_dense(weight, torch.zeros_like(weight), ids, counts, lam, padding_idx)


def _reference_bwd_dense(grad_out, ids, weight, counts, lam, padding_idx):
    """The embedding's gradient (a scatter-add of ``grad_out``), then eq. 7 literally."""
    safe, valid, g = _flat_lookups(grad_out, ids, weight, padding_idx)
    grad = torch.zeros_like(weight).index_add_(0, safe, g)
    _reference_l2_dense(weight, grad, safe[valid], counts, lam, padding_idx)
    return grad


def _reference_bwd_sparse(grad_out, ids, weight, counts, lam, padding_idx):
    """The dense rows of :func:`_reference_bwd_dense`, each held by the first lookup of its id."""
    dense = _reference_bwd_dense(grad_out, ids, weight, counts, lam, padding_idx)
    safe, valid, _ = _flat_lookups(grad_out, ids, weight, padding_idx)
    M = safe.numel()
    _, inverse = torch.unique(safe, return_inverse=True)
    positions = torch.arange(M, device=safe.device)
    first = torch.full((M,), M, dtype=torch.long, device=safe.device).scatter_reduce(0, inverse, positions, "amin")
    owner = valid & (positions == first[inverse])
    return safe, torch.where(owner[:, None], dense[safe], 0)


def _triton_l2_dense(weight, grad, ids, counts, lam, padding_idx):
    from ..triton import mba as _tmba

    return _tmba.mba_l2_dense(weight, grad, ids, counts, lam, padding_idx).to(weight.dtype)


def _triton_penalty(weight, ids, counts, lam, padding_idx):
    from ..triton import mba as _tmba

    return _tmba.mba_penalty(_tmba.sort_segments(ids), weight, counts, lam, padding_idx).to(weight.dtype)


def _triton_bwd_dense(grad_out, ids, weight, counts, lam, padding_idx):
    from ..triton import mba as _tmba

    segments = _tmba.sort_segments(ids)
    return _tmba.embedding_backward_dense(grad_out.reshape(-1, weight.shape[1]), segments, weight, counts, lam,
                                          padding_idx)


def _triton_bwd_sparse(grad_out, ids, weight, counts, lam, padding_idx):
    from ..triton import mba as _tmba

    segments = _tmba.sort_segments(ids)
    return _tmba.embedding_backward_sparse(grad_out.reshape(-1, weight.shape[1]), segments, weight, counts, lam,
                                           padding_idx)


# a family's ops: key -> (op name, fake kernel)
_FAKES = {"l2_dense": ("mba_l2_dense", _fake_penalty), "penalty": ("mba_penalty", _fake_penalty),
          "embedding": ("mba_embedding", _fake_embedding), "bwd_dense": ("mba_embedding_bwd_dense", _fake_bwd_dense),
          "bwd_sparse": ("mba_embedding_bwd_sparse", _fake_bwd_sparse)}


def _define_family(backend: str, l2_dense, penalty, bwd_dense, bwd_sparse) -> dict:
    fns = {"l2_dense": l2_dense, "penalty": penalty, "embedding": _lookup, "bwd_dense": bwd_dense,
           "bwd_sparse": bwd_sparse}
    fam = {key: _define.define(op, backend, fns[key], fake) for key, (op, fake) in _FAKES.items()}
    backward, setup_context = _embedding_autograd(fam)
    fam["embedding"].register_autograd(backward, setup_context=setup_context)
    return fam


def _compiled_family() -> dict | None:
    """The compiled extension's MBA ops (``din_kernels::mba_*``, CUDA kernels), with their fake kernels and the
    embedding's autograd; None when the extension is not loaded or was built without them."""
    if not _extension.loaded() or not hasattr(torch.ops.din_kernels, "mba_embedding"):
        return None
    fam = {key: _define.compiled(op, fake) for key, (op, fake) in _FAKES.items()}
    backward, setup_context = _embedding_autograd(fam)
    torch.library.register_autograd("din_kernels::mba_embedding", backward, setup_context=setup_context)
    return fam


def _embedding_autograd(fam: dict) -> tuple:
    """``(backward, setup_context)`` of a family's ``mba_embedding``: the table's gradient from its backward ops."""

    def setup_context(ctx, inputs, output):
        weight, ids, counts, lam, padding_idx, sparse = inputs
        ctx.lam, ctx.padding_idx, ctx.sparse = lam, padding_idx, sparse
        ctx.save_for_backward(weight, ids, counts)

    def backward(ctx, grad_out):
        weight, ids, counts = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, weight.shape[1])
        if ctx.sparse:
            indices, values = fam["bwd_sparse"](grad_out, ids, weight, counts, ctx.lam, ctx.padding_idx)
            grad = torch.sparse_coo_tensor(indices.unsqueeze(0), values, weight.shape, check_invariants=False)
        else:
            grad = fam["bwd_dense"](grad_out, ids, weight, counts, ctx.lam, ctx.padding_idx)
        return grad, None, None, None, None, None

    return backward, setup_context


_OPS: dict[str, dict] = {
    "reference": _define_family("reference", _reference_l2_dense, _reference_penalty, _reference_bwd_dense,
                                _reference_bwd_sparse),
    "torch": _define_family("torch", _torch_l2_dense, _torch_penalty, _torch_bwd_dense, _torch_bwd_sparse),
}
if importlib.util.find_spec("triton") is not None:
    _OPS["triton"] = _define_family("triton", _triton_l2_dense, _triton_penalty, _triton_bwd_dense,
                                    _triton_bwd_sparse)
_compiled = _compiled_family()
if _compiled is not None:
    _OPS["cuda"] = _compiled


def ops(backend: str) -> dict:
    """The MBA ops of a concrete backend: ``{"l2_dense", "penalty", "embedding", "bwd_dense", "bwd_sparse"}``."""
    if backend not in _OPS:
        raise _backend.BackendUnavailableError(f"backend {backend!r} does not implement mba_l2 (available: "
                                               f"{tuple(_OPS)})")
    return _OPS[backend]


@torch.library.custom_op("din_kernels::check_ids", mutates_args=())
def check_ids(ids: Tensor, num_embeddings: int) -> Tensor:
    """Value check of ``ids`` (``0 <= id < num_embeddings``); returns a copy that the lookup consumes, so the check
    stays in a compiled graph (it reads the tensor: a host sync on a GPU; off with ``din_kernels.checks(False)``)."""
    if ids.numel():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"ids must lie in [0, {num_embeddings - 1}] (K = {num_embeddings}), got [{lo}, {hi}]")
    return ids.clone()


@check_ids.register_fake
def _(ids, num_embeddings):
    return torch.empty_like(ids)


def check_id_range(ids: Tensor, num_embeddings: int) -> Tensor:
    """``ids`` after the value check (a checked copy while checks are enabled, ``ids`` itself when they are off)."""
    return check_ids(ids, num_embeddings) if _backend.checks_enabled() else ids


def check_mba_inputs(weight: Tensor, grad: Tensor, ids: Tensor, counts: Tensor) -> None:
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [K, D], got shape {tuple(weight.shape)}")
    if grad.shape != weight.shape:
        raise ValueError(f"grad must have the shape of weight {tuple(weight.shape)}, got {tuple(grad.shape)}")
    if grad.is_sparse and grad.sparse_dim() != 1:
        raise ValueError(f"a sparse grad must have sparse_dim 1 (rows, as nn.Embedding(sparse=True) gives), got "
                         f"sparse_dim {grad.sparse_dim()}")
    if counts.dim() != 1 or counts.shape[0] != weight.shape[0]:
        raise ValueError(f"counts must have shape [K] = [{weight.shape[0]}], got {tuple(counts.shape)}")
    check_device(weight.device, grad=grad, ids=ids, counts=counts)


def mba_l2_(
    weight: Tensor,
    grad: Tensor,
    ids: Tensor,
    counts: Tensor,
    lam: float,
    padding_idx: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Mini-batch aware L2 (the paper's eq. 7) on the rows of one batch.

    ``grad[j] += lam * W[j] / n[j]`` once for each distinct id j of ``ids`` (j != ``padding_idx``), with
    ``n = counts.clamp(min=1)``; the rows of other ids are neither read nor written.

    Args:
        weight: ``[K, D]`` embedding table.
        grad: ``[K, D]`` dense (updated in place and returned) or sparse COO (a new, coalesced sparse grad is
            returned).
        ids: any shape, int32/int64: the ids looked up in the batch (all lookups of this table in the step). Ids
            outside ``[0, K)`` raise ``ValueError``; with ``din_kernels.checks(False)`` they are skipped instead.
        counts: ``[K]``: in how many training samples id j occurs.
    Returns:
        ``(grad, penalty)`` with ``penalty = lam / 2 * sum_j ||W[j]||^2 / n[j]`` (0-dim).
    """
    check_index("ids", ids)
    check_mba_inputs(weight, grad, ids, counts)
    ids = check_id_range(ids, weight.shape[0])
    fam = ops(_backend.resolve(backend, weight.device, "mba_l2", SUPPORTED))
    lam = float(lam)
    if grad.is_sparse:
        zeros = weight.new_zeros(ids.numel(), weight.shape[1])
        indices, values = fam["bwd_sparse"](zeros, ids, weight.detach(), counts, lam, padding_idx)
        keep = _valid(indices, weight.shape[0], padding_idx)
        indices, values = indices[keep], values[keep]  # no entry for the padding id (eager: coalesce syncs anyway)
        added = torch.sparse_coo_tensor(indices.unsqueeze(0), values.to(grad.dtype), grad.shape,
                                        check_invariants=False)
        penalty = fam["penalty"](weight.detach(), ids, counts, lam, padding_idx)
        return (grad + added).coalesce(), penalty
    return grad, fam["l2_dense"](weight.detach(), grad, ids, counts, lam, padding_idx)


def mba_counts(ids: Tensor, num_embeddings: int, padding_idx: int | None = None) -> Tensor:
    """``n [K]`` for MBA: in how many samples (rows of ``ids`` [S, L], or entries of a 1-D ``ids``) each id occurs,
    counting an id once per sample however often the sample repeats it. Run it over the whole training split."""
    check_index("ids", ids)
    rows = ids.flatten(1) if ids.dim() > 1 else ids.reshape(-1, 1)
    rows = check_id_range(rows, num_embeddings)
    if rows.numel() == 0:
        return torch.zeros(num_embeddings, dtype=torch.long, device=ids.device)
    ordered = rows.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    kept = ordered[first]
    kept = kept[_valid(kept, num_embeddings, padding_idx)]
    return torch.bincount(kept.long(), minlength=num_embeddings)
