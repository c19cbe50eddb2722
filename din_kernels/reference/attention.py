"""Target attention (SPEC section 1), literally: the ``[q, k, q - k, q * k]`` concatenation and the MLP.

This is the oracle of every attention backend. It is written for clarity, not speed, and runs in float64 when
given float64 tensors (float32 otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._jagged import jagged_to_padded, padded_mask, padded_to_jagged, repeat_histories
from .dice import dice_ref, masked_moments


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, otherwise float32 (bf16/fp16 inputs accumulate in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def target_attention_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    activation: str = "sigmoid",
    act_weights: Sequence[torch.Tensor] = (),
    act_means: Sequence[torch.Tensor] = (),
    act_vars: Sequence[torch.Tensor] = (),
    normalization: str = "none",
    softmax_scale: float = 1.0,
    training: bool = False,
    dice_eps: float = 1e-8,
    query_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """The local activation unit and the weighted sum.

    With ``query_offsets`` [U + 1] (several candidates per history), ``query`` is [Nq, D] and the keys describe U
    users: each user's history is repeated once per candidate, literally (:func:`din_kernels._jagged.
    repeat_histories`), and the op runs on the repeated batch.

    Args:
        query: ``[B, D]``.
        keys: ``[B, T, D]`` with ``lengths`` ``[B]``, or ``[N, D]`` with ``offsets`` ``[B + 1]``.
        weights, biases: the ``nn.Linear`` parameters, ``[H1, 4D], ..., [1, Hn]`` and ``[H1], ..., [1]``.
        activation: ``sigmoid``, ``relu``, ``prelu`` (``act_weights[i]`` ``[H_i]``) or ``dice``
            (``act_weights[i]`` the alphas; ``act_means``/``act_vars`` the running statistics used in eval).
        normalization: ``none`` (the paper) or ``softmax`` of ``softmax_scale * s`` over the valid positions.
        training: Dice takes batch statistics over the valid behaviours of the whole batch when True.
    Returns:
        ``(v_U [B, D], w [B, T] or [N], dice_stats)`` where ``dice_stats`` holds ``(mean, biased var, count)`` of
        each hidden layer in Dice training, else is empty. Outputs are in ``query``'s dtype.
    """
    if query_offsets is not None:
        keys, lengths, offsets = repeat_histories(keys, lengths, offsets, query_offsets, query.shape[0])
    params = [*weights, *biases, *act_weights]
    cd = compute_dtype(query, keys, *params)
    jagged = offsets is not None
    if jagged:
        keys_p, lengths, index = jagged_to_padded(keys, offsets)
    else:
        keys_p = keys
    B, T, D = keys_p.shape
    mask = padded_mask(lengths, T)
    q = query.to(cd)[:, None, :].expand(B, T, D)
    k = torch.where(mask[..., None], keys_p.to(cd), 0.0)  # padding content never matters
    h = torch.cat([q, k, q - k, q * k], dim=-1)  # [B, T, 4D]
    stats = []
    for i in range(len(weights) - 1):
        h = F.linear(h, weights[i].to(cd), biases[i].to(cd))
        if activation == "sigmoid":
            h = torch.sigmoid(h)
        elif activation == "relu":
            h = torch.relu(h)
        elif activation == "prelu":
            h = torch.where(h >= 0, h, act_weights[i].to(cd) * h)
        elif activation == "dice":
            if training:
                mean, var, count = masked_moments(h, mask)
                stats.append((mean, var, count))
            else:
                mean, var = act_means[i].to(cd), act_vars[i].to(cd)
            h = dice_ref(h, act_weights[i].to(cd), mean, var, training=False, eps=dice_eps)[0]
        else:
            raise ValueError(f"activation must be one of sigmoid, relu, prelu, dice; got {activation!r}")
    s = F.linear(h, weights[-1].to(cd), biases[-1].to(cd)).squeeze(-1)  # [B, T]
    if normalization == "none":
        w = torch.where(mask, s, 0.0)
    elif normalization == "softmax":
        logits = torch.where(mask, softmax_scale * s, float("-inf"))
        m = logits.amax(dim=-1, keepdim=True) if T > 0 else logits.new_zeros(B, 1)
        m = torch.where(torch.isfinite(m), m, 0.0).detach()
        e = torch.where(mask, torch.exp(logits - m), 0.0)
        denom = e.sum(dim=-1, keepdim=True)
        w = e / torch.where(denom > 0, denom, 1.0)
    else:
        raise ValueError(f"normalization must be 'none' or 'softmax', got {normalization!r}")
    out = (w[..., None] * k).sum(dim=1)
    if jagged:
        w = padded_to_jagged(w, index)
    return out.to(query.dtype), w.to(query.dtype), stats
