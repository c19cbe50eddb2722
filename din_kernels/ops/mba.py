"""Mini-batch aware L2 regularisation: the functional API, the ``torch.library`` op and the dispatch (SPEC 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._validate import check_device, check_float, check_index
from ..reference.mba import mba_l2_ref
from ..triton._launch import kernel_op

SUPPORTED = ("reference", "torch", "triton")


def distinct_ids(ids: Tensor, padding_idx: int | None) -> Tensor:
    """The distinct ids of a batch, on its device (``torch.unique``), without ``padding_idx``."""
    distinct = torch.unique(ids.reshape(-1))
    if padding_idx is not None:
        distinct = distinct[distinct != padding_idx]
    return distinct


def mba_rows(weight: Tensor, distinct: Tensor, counts: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """``(lam * W[j] / n[j] for each distinct j  [U, D], penalty [])``, computed in float32 or better."""
    cd = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight[distinct].to(cd)
    n = counts[distinct].to(cd).clamp_min(1)
    penalty = lam / 2 * ((w * w).sum(1) / n).sum()
    return lam * w / n.unsqueeze(1), penalty


def _fake_penalty(weight, *args):
    return weight.new_empty(())


@torch.library.custom_op("din_kernels::mba_l2_dense_torch", mutates_args=("grad",))
def mba_l2_dense_torch(weight: Tensor, grad: Tensor, ids: Tensor, counts: Tensor, lam: float,
                       padding_idx: int | None) -> Tensor:
    """Adds ``lam * W[j] / n[j]`` to ``grad[j]`` for each distinct id j; returns the penalty (0-dim)."""
    distinct = distinct_ids(ids, padding_idx)
    rows, penalty = mba_rows(weight, distinct, counts, lam)
    grad.index_add_(0, distinct, rows.to(grad.dtype))
    return penalty.to(weight.dtype)


mba_l2_dense_torch.register_fake(_fake_penalty)


@kernel_op("din_kernels::mba_l2_dense_triton", _fake_penalty, mutates_args=("grad",))
def mba_l2_dense_triton(weight: Tensor, grad: Tensor, ids: Tensor, counts: Tensor, lam: float,
                        padding_idx: int | None) -> Tensor:
    """As :func:`mba_l2_dense_torch`, in one Triton kernel over the distinct ids (sorted once on the device, no host
    sync); returns the penalty (0-dim)."""
    from ..triton import mba as _tmba

    return _tmba.mba_l2_dense(weight, grad, ids, counts, lam, padding_idx).to(weight.dtype)


def _fake_embedding_bwd(grad_out, sorted_ids, perm, seg_end, weight, counts, lam, padding_idx):
    return torch.empty_like(weight)


@kernel_op("din_kernels::mba_embedding_bwd_triton", _fake_embedding_bwd)
def mba_embedding_bwd_triton(grad_out: Tensor, sorted_ids: Tensor, perm: Tensor, seg_end: Tensor, weight: Tensor,
                             counts: Tensor, lam: float, padding_idx: int | None) -> Tensor:
    """The dense gradient ``[K, D]`` of an embedding lookup plus the MBA term, fused: one Triton kernel over the
    distinct ids writes each touched row once (``sum of its grad_out rows + lam * W[j] / n[j]``).

    Args:
        grad_out: ``[M, D]``, the output gradient of the lookups ``ids.flatten()``.
        sorted_ids, perm, seg_end: ``[M]`` int64, :func:`din_kernels.triton.mba.sort_segments` of those ids.
        weight: ``[K, D]``; counts: ``[K]``.
    """
    from ..triton import mba as _tmba

    return _tmba.embedding_backward_dense(grad_out, (sorted_ids, perm, seg_end), weight, counts, lam, padding_idx)


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


def check_id_range(ids: Tensor, num_embeddings: int) -> None:
    """Value check of ``ids`` (0 <= id < K); reads the tensor, so it runs only while checks are enabled."""
    if ids.numel() and _backend.checks_enabled():
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_embeddings:
            raise ValueError(f"ids must lie in [0, {num_embeddings - 1}] (K = {num_embeddings}), got [{lo}, {hi}]")


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
        grad: ``[K, D]`` dense (updated in place and returned) or sparse COO (a new sparse grad is returned).
        ids: any shape, int32/int64: the ids looked up in the batch (all lookups of this table in the step).
        counts: ``[K]``: in how many training samples id j occurs.
    Returns:
        ``(grad, penalty)`` with ``penalty = lam / 2 * sum_j ||W[j]||^2 / n[j]`` (0-dim).
    """
    check_index("ids", ids)
    check_mba_inputs(weight, grad, ids, counts)
    check_id_range(ids, weight.shape[0])
    name = _backend.resolve(backend, weight.device, "mba_l2", SUPPORTED)
    if grad.is_sparse:
        if name == "triton":
            from ..triton import mba as _tmba

            distinct, rows, penalty = _tmba.mba_rows_sparse(weight, ids, counts, lam, padding_idx)
        else:
            distinct = distinct_ids(ids, padding_idx)
            rows, penalty = mba_rows(weight, distinct, counts, lam)
        added = torch.sparse_coo_tensor(distinct.unsqueeze(0), rows.to(grad.dtype), grad.shape,
                                        check_invariants=False)
        return (grad + added).coalesce(), penalty.to(weight.dtype)
    if name == "triton":
        return grad, mba_l2_dense_triton(weight, grad, ids, counts, lam, padding_idx)
    if name == "reference":
        new, penalty = mba_l2_ref(weight, grad, ids, counts, lam, padding_idx)
        grad.copy_(new)
        return grad, penalty
    return grad, mba_l2_dense_torch(weight, grad, ids, counts, lam, padding_idx)


def mba_counts(ids: Tensor, num_embeddings: int, padding_idx: int | None = None) -> Tensor:
    """``n [K]`` for MBA: in how many samples (rows of ``ids`` [S, L], or entries of a 1-D ``ids``) each id occurs,
    counting an id once per sample however often the sample repeats it. Run it over the whole training split."""
    check_index("ids", ids)
    rows = ids.flatten(1) if ids.dim() > 1 else ids.reshape(-1, 1)
    check_id_range(rows, num_embeddings)
    if rows.numel() == 0:
        return torch.zeros(num_embeddings, dtype=torch.long, device=ids.device)
    ordered = rows.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    kept = ordered[first]
    if padding_idx is not None:
        kept = kept[kept != padding_idx]
    return torch.bincount(kept.long(), minlength=num_embeddings)
