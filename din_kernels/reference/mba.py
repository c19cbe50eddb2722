"""Mini-batch aware L2 regularisation (SPEC section 3, the paper's eq. 7), literally."""

from __future__ import annotations

import torch


def mba_l2_ref(
    weight: torch.Tensor,
    grad: torch.Tensor,
    ids: torch.Tensor,
    counts: torch.Tensor,
    lam: float,
    padding_idx: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad[j] += lam * W[j] / n[j]`` once per distinct id j of ``ids``; returns ``(new grad, penalty)``.

    Works out of place on a dense ``grad`` [K, D] (returns a new tensor); the penalty is
    ``lam / 2 * sum_j ||W[j]||^2 / n[j]`` over the same distinct ids (``n`` clamped to at least 1).
    """
    distinct = torch.unique(ids.reshape(-1))
    if padding_idx is not None:
        distinct = distinct[distinct != padding_idx]
    w = weight[distinct]
    n = counts[distinct].to(weight.dtype).clamp_min(1)
    out = grad.clone()
    out[distinct] += lam * w / n[:, None]
    penalty = lam / 2 * ((w * w).sum(1) / n).sum()
    return out, penalty
