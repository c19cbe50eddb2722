"""MBAEmbedding: an embedding table whose backward adds the mini-batch aware L2 term (SPEC section 3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import backend as _backend
from .._validate import check_index
from ..ops import mba as _mba

SUPPORTED = _mba.SUPPORTED


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
        backend: ``"auto"`` (``"triton"`` on CUDA when available, else ``"torch"``), ``"reference"`` (the
            scatter-add, then eq. 7 literally), ``"torch"`` (scatter-add plus ``index_add_`` of the MBA rows) or
            ``"triton"`` (the ids sorted on the device, then one kernel over the distinct ids: deterministic, no
            atomics, no host sync). Sparse gradients hold one entry per lookup (see
            :mod:`din_kernels.ops.mba`). Both gradient layouts work under ``torch.compile(fullgraph=True)``, with
            the id check in the graph or switched off.
    Attributes:
        last_penalty: ``lam / 2 * sum_j ||W[j]||^2 / n[j]`` of the last training forward's distinct ids (for
            logging; a forward in eval mode leaves it as it was).
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
        """Each ``ids[i]`` of any shape ``S_i`` gives an output ``S_i + [D]``; one input gives one tensor.

        Ids outside ``[0, K)`` raise ``ValueError``; with ``din_kernels.checks(False)`` they read the nearest row
        (clamped) and give no gradient or MBA term."""
        if not ids:
            raise ValueError("MBAEmbedding needs at least one ids tensor")
        for i, t in enumerate(ids):
            check_index(f"ids[{i}]", t)
        flat = torch.cat([t.reshape(-1).long() for t in ids]) if len(ids) > 1 else ids[0]
        flat = _mba.check_id_range(flat, self.num_embeddings)
        fam = _mba.ops(_backend.resolve(self.backend, self.weight.device, "MBAEmbedding", SUPPORTED))
        if self.lam and self.training:  # for logging a training step; eval (and an exported program) skips it
            with torch.no_grad():
                self.last_penalty = fam["penalty"](self.weight, flat, self.counts, self.lam, self.padding_idx)
        out = fam["embedding"](self.weight, flat, self.counts, self.lam, self.padding_idx, self.sparse)
        if len(ids) == 1:
            return out
        parts = out.split([t.numel() for t in ids])
        return tuple(p.reshape(*t.shape, self.embedding_dim) for p, t in zip(parts, ids))

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, lam={self.lam}, padding_idx={self.padding_idx}, "
                f"sparse={self.sparse}, backend={self.backend!r}")
