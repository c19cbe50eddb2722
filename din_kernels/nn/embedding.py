"""MBAEmbedding: an embedding table whose backward adds the mini-batch aware L2 term (SPEC section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backend as _backend
from .._validate import check_index
from ..ops.mba import check_id_range, distinct_ids, mba_embedding_bwd_triton, mba_rows

SUPPORTED = ("torch", "triton")


class _MBAEmbeddingFunction(torch.autograd.Function):
    """Lookup forward; backward = the embedding's gradient scatter plus ``lam * W[j] / n[j]`` per distinct id."""

    @staticmethod
    def forward(ctx, weight, ids, counts, lam, padding_idx, sparse):
        distinct = distinct_ids(ids, padding_idx)
        ctx.save_for_backward(ids, distinct, counts, weight)
        ctx.lam, ctx.padding_idx, ctx.sparse = lam, padding_idx, sparse
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        ids, distinct, counts, weight = ctx.saved_tensors
        flat_ids = ids.reshape(-1)
        flat_grad = grad_out.reshape(-1, weight.shape[1])
        if ctx.padding_idx is not None:
            keep = flat_ids != ctx.padding_idx
            flat_ids, flat_grad = flat_ids[keep], flat_grad[keep]
        if ctx.lam:
            rows = mba_rows(weight.detach(), distinct, counts, ctx.lam)[0].to(weight.dtype)
        else:
            distinct, rows = distinct[:0], weight.new_empty(0, weight.shape[1])
        if ctx.sparse:
            index = torch.cat([flat_ids, distinct]).unsqueeze(0)
            values = torch.cat([flat_grad.to(weight.dtype), rows])
            grad = torch.sparse_coo_tensor(index, values, weight.shape, check_invariants=False)
            return grad, None, None, None, None, None
        grad = torch.zeros_like(weight)
        grad.index_add_(0, flat_ids, flat_grad.to(weight.dtype))
        grad.index_add_(0, distinct, rows)
        return grad, None, None, None, None, None


class _MBAEmbeddingTritonFunction(torch.autograd.Function):
    """Lookup forward; backward = one Triton kernel over the distinct ids (sorted once, in the forward) that sums
    each id's output-gradient rows and adds ``lam * W[j] / n[j]``, writing every touched row once."""

    @staticmethod
    def forward(ctx, weight, ids, segments, counts, lam, padding_idx, sparse):
        ctx.save_for_backward(*segments, counts, weight)
        ctx.lam, ctx.padding_idx, ctx.sparse, ctx.ids_shape = lam, padding_idx, sparse, ids.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        from ..triton import mba as _tmba

        ordered, perm, seg_end, counts, weight = ctx.saved_tensors
        flat_grad = grad_out.reshape(-1, weight.shape[1])
        if ctx.sparse:
            grad = _tmba.embedding_backward_sparse(flat_grad, (ordered, perm, seg_end), weight.detach(), counts,
                                                   ctx.lam, ctx.padding_idx)
        else:
            grad = mba_embedding_bwd_triton(flat_grad, ordered, perm, seg_end, weight.detach(), counts, ctx.lam,
                                            ctx.padding_idx)
        return grad, None, None, None, None, None, None


class MBAEmbedding(nn.Module):
    """``nn.Embedding`` with the paper's mini-batch aware L2 regulariser in its backward.

    One forward call takes every lookup of the table in a step (e.g. the candidate ad's ids and the behaviours'
    ids, which share the item table in DIN): ``ad, hist = table(ad_ids, hist_ids)``. The backward then adds
    ``lam * W[j] / n[j]`` once for each distinct id j of the step, fused with the gradient scatter; only the rows
    of the batch are read or written. Calling the module twice in one step applies the term twice.

    Args:
        num_embeddings, embedding_dim: K, D.
        counts: ``[K]`` ``n_j``, in how many training samples id j occurs (:func:`din_kernels.mba_counts`);
            default all ones. Clamped to at least 1.
        lam: the regularisation strength (0 disables the term).
        padding_idx: an id whose row gets no gradient and no regularisation.
        sparse: sparse COO gradients (for ``torch.optim.SparseAdam``/``SGD``).
        backend: ``"auto"`` (``"triton"`` on CUDA when available, else ``"torch"``), ``"torch"`` (scatter-add plus
            ``index_add_`` of the MBA rows) or ``"triton"`` (the ids sorted once per step on the device, then one
            kernel over the distinct ids: deterministic, no atomics, no host sync for dense gradients).
    Attributes:
        last_penalty: ``lam / 2 * sum_j ||W[j]||^2 / n[j]`` of the last forward's distinct ids (for logging).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, counts: Tensor | None = None, lam: float = 0.0,
                 padding_idx: int | None = None, sparse: bool = False, _weight: Tensor | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.backend = backend
        if padding_idx is not None and not 0 <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx must lie in [0, {num_embeddings - 1}], got {padding_idx}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.lam, self.padding_idx, self.sparse = float(lam), padding_idx, sparse
        if _weight is None:
            _weight = torch.randn(num_embeddings, embedding_dim)
            if padding_idx is not None:
                _weight[padding_idx] = 0
        elif _weight.shape != (num_embeddings, embedding_dim):
            raise ValueError(f"_weight must have shape [{num_embeddings}, {embedding_dim}], got {tuple(_weight.shape)}")
        self.weight = nn.Parameter(_weight)
        if counts is None:
            counts = torch.ones(num_embeddings, dtype=torch.long)
        elif counts.shape != (num_embeddings,):
            raise ValueError(f"counts must have shape [{num_embeddings}], got {tuple(counts.shape)}")
        self.register_buffer("counts", counts.clone())
        self.last_penalty: Tensor | None = None

    def forward(self, *ids: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Each ``ids[i]`` of any shape ``S_i`` gives an output ``S_i + [D]``; one input gives one tensor."""
        if not ids:
            raise ValueError("MBAEmbedding needs at least one ids tensor")
        for i, t in enumerate(ids):
            check_index(f"ids[{i}]", t)
        flat = torch.cat([t.reshape(-1).long() for t in ids]) if len(ids) > 1 else ids[0]
        check_id_range(flat, self.num_embeddings)
        name = _backend.resolve(self.backend, self.weight.device, "MBAEmbedding", SUPPORTED)
        if name == "triton":
            from ..triton import mba as _tmba

            needs_grad = torch.is_grad_enabled() and self.weight.requires_grad
            if needs_grad or self.lam:
                with torch.no_grad():
                    segments = _tmba.sort_segments(flat)  # once per step, on the device
                    if self.lam:
                        self.last_penalty = _tmba.mba_penalty(segments, self.weight, self.counts, self.lam,
                                                              self.padding_idx).to(self.weight.dtype)
            if needs_grad:
                out = _MBAEmbeddingTritonFunction.apply(self.weight, flat, segments, self.counts, self.lam,
                                                        self.padding_idx, self.sparse)
            else:
                out = F.embedding(flat, self.weight, self.padding_idx)
        else:
            out = _MBAEmbeddingFunction.apply(self.weight, flat, self.counts, self.lam, self.padding_idx,
                                              self.sparse)
            if self.lam:
                with torch.no_grad():
                    self.last_penalty = mba_rows(self.weight, distinct_ids(flat, self.padding_idx), self.counts,
                                                 self.lam)[1]
        if len(ids) == 1:
            return out
        parts = out.split([t.numel() for t in ids])
        return tuple(p.reshape(*t.shape, self.embedding_dim) for p, t in zip(parts, ids))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, lam={self.lam}, padding_idx={self.padding_idx}, "
                f"sparse={self.sparse}, backend={self.backend!r}")
