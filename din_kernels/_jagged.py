"""Jagged (values + offsets, TorchRec's layout) <-> padded conversions shared by the reference and torch paths."""

from __future__ import annotations

import torch


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """``offsets`` [B + 1] -> ``lengths`` [B] (int64)."""
    return (offsets[1:] - offsets[:-1]).long()


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``lengths`` [B] -> ``offsets`` [B + 1] (int64, starting at 0)."""
    out = lengths.new_zeros(lengths.shape[0] + 1, dtype=torch.long)
    torch.cumsum(lengths.long(), 0, out=out[1:])
    return out


def jagged_index(offsets: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row and column of each of the ``N`` jagged rows in the padded layout, and the lengths.

    Returns ``(b_idx [N], t_idx [N], lengths [B])``.
    """
    lengths = lengths_from_offsets(offsets)
    B = lengths.shape[0]
    b_idx = torch.repeat_interleave(torch.arange(B, device=offsets.device), lengths, output_size=N)
    t_idx = torch.arange(N, device=offsets.device) - offsets[:-1].long()[b_idx]
    return b_idx, t_idx, lengths


def max_length(lengths: torch.Tensor) -> int:
    return int(lengths.max()) if lengths.numel() else 0


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, T: int | None = None):
    """``values`` [N, ...] -> ``(padded [B, T, ...], lengths [B], (b_idx, t_idx))`` with zero padding."""
    b_idx, t_idx, lengths = jagged_index(offsets, values.shape[0])
    if T is None:
        T = max_length(lengths)
    padded = values.new_zeros((lengths.shape[0], T) + tuple(values.shape[1:]))
    padded[b_idx, t_idx] = values
    return padded, lengths, (b_idx, t_idx)


def padded_to_jagged(padded: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`jagged_to_padded` given its ``(b_idx, t_idx)``."""
    return padded[index[0], index[1]]


def padded_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T]`` bool, True at the valid positions t < lengths[b]."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]
