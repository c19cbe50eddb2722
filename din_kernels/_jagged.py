"""Jagged (values + offsets, TorchRec's layout) <-> padded conversions shared by the reference and torch paths.

Memory safety does not depend on the value checks (SPEC section 5): every function here first clamps what it reads
of ``lengths`` (to ``[0, T]``) and ``offsets`` (to ``[0, N]``, then non-decreasing), which leaves valid input
unchanged, and rows of an invalid partition that no sample covers are dropped (weight 0, gradient 0). No shape here
depends on the values of ``offsets`` except the padded length ``T`` when it is not given.
"""

from __future__ import annotations

import torch


def safe_lengths(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``lengths`` [B] clamped to ``[0, T]`` (int64)."""
    return lengths.long().clamp(0, T)


def safe_offsets(offsets: torch.Tensor, N: int) -> torch.Tensor:
    """``offsets`` [B + 1] clamped to ``[0, N]`` and made non-decreasing (running maximum), int64."""
    off = offsets.long().clamp(0, N)
    return torch.cummax(off, 0).values if off.numel() else off


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """``offsets`` [B + 1] -> ``lengths`` [B] (int64)."""
    return (offsets[1:] - offsets[:-1]).long()


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``lengths`` [B] -> ``offsets`` [B + 1] (int64, starting at 0)."""
    out = lengths.new_zeros(lengths.shape[0] + 1, dtype=torch.long)
    torch.cumsum(lengths.long(), 0, out=out[1:])
    return out


class JaggedIndex:
    """Where each of the ``N`` jagged rows sits in the padded layout, for offsets made safe by :func:`safe_offsets`.

    Attributes:
        offsets: ``[B + 1]`` the safe offsets; ``lengths`` ``[B]``.
        b_idx, t_idx: ``[N]`` the sample and the position of each row; rows no sample covers (only with invalid
            offsets) point at a scratch sample ``B``, position 0.
        valid: ``[N]`` bool, False at those uncovered rows.
    """

    def __init__(self, offsets: torch.Tensor, N: int, B: int | None = None) -> None:
        """``B``: the batch size, ``offsets.shape[0] - 1``, when the caller has it as another tensor's size (under
        ``torch.export`` a size derived as ``offsets.shape[0] - 1`` is specialised away from 0 and 1, the batch's
        own size is not)."""
        B = offsets.shape[0] - 1 if B is None else B
        self.offsets = off = safe_offsets(offsets, N)
        self.lengths = off[1 : B + 1] - off[:B]
        rows = torch.arange(N, device=offsets.device)
        b = torch.searchsorted(off[1 : B + 1], rows, right=True)  # off[b] <= n < off[b + 1]; 0 when B = 0
        self.valid = (rows >= off[0]) & (b < B)
        self.b_idx = torch.where(self.valid, b, B)
        self.t_idx = torch.where(self.valid, rows - off[b.clamp_max(B)], 0)

    @property
    def B(self) -> int:
        return self.lengths.shape[0]


def max_length(lengths: torch.Tensor) -> int:
    return int(lengths.max()) if lengths.numel() else 0


def jagged_to_padded(values: torch.Tensor, offsets: torch.Tensor, T: int | None = None):
    """``values`` [N, ...] -> ``(padded [B, T, ...], lengths [B], index)`` with zero padding; ``T`` defaults to the
    longest sequence (a host sync). ``index`` (:class:`JaggedIndex`) maps back with :func:`padded_to_jagged`."""
    index = JaggedIndex(offsets, values.shape[0])
    if T is None:
        T = max_length(index.lengths)
    lengths = index.lengths.clamp_max(T)
    valid = index.valid & (index.t_idx < T)
    b_idx = torch.where(valid, index.b_idx, index.B)
    t_idx = torch.where(valid, index.t_idx, 0)
    padded = values.new_zeros((index.B + 1, max(T, 1)) + tuple(values.shape[1:]))
    padded[b_idx, t_idx] = values  # uncovered rows land in the scratch sample B
    index.b_idx, index.t_idx, index.valid = b_idx, t_idx, valid
    return padded[: index.B, :T], lengths, index


def padded_to_jagged(padded: torch.Tensor, index: JaggedIndex) -> torch.Tensor:
    """Inverse of :func:`jagged_to_padded` given its ``index``: ``[N, ...]``, zero at uncovered rows."""
    B, T = padded.shape[:2]
    b = index.b_idx.clamp_max(max(B - 1, 0))
    t = index.t_idx.clamp_max(max(T - 1, 0))
    if B == 0 or T == 0:
        return padded.new_zeros((index.b_idx.shape[0],) + tuple(padded.shape[2:]))
    rows = padded[b, t]
    keep = index.valid.reshape((-1,) + (1,) * (rows.dim() - 1))
    return torch.where(keep, rows, 0)


def padded_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T]`` bool, True at the valid positions t < lengths[b]."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def segment_sum(values: torch.Tensor, offsets: torch.Tensor, index: JaggedIndex | None = None) -> torch.Tensor:
    """``[B, ...]``: the sum of each sample's rows of ``values`` [N, ...] (memory-safe for any ``offsets``; rows no
    sample covers are left out). ``index``: the :class:`JaggedIndex` of ``offsets``, when the caller has it."""
    if index is None:
        index = JaggedIndex(offsets, values.shape[0])
    out = values.new_zeros((index.B + 1,) + tuple(values.shape[1:]))
    return out.index_add_(0, index.b_idx, values)[: index.B]


class CandidateIndex:
    """Several candidates per history: which user each of the ``Nq`` query rows belongs to, for ``query_offsets``
    [U + 1] made safe by :func:`safe_offsets` (memory-safe for any values; rows no user covers have no history).

    Attributes:
        user: ``[Nq]`` int64, the user of each candidate, clamped into ``[0, U)`` (0 when U = 0).
        valid: ``[Nq]`` bool, False for candidates no user covers.
    """

    def __init__(self, query_offsets: torch.Tensor, Nq: int) -> None:
        index = JaggedIndex(query_offsets, Nq)
        U = index.B
        self.valid = index.valid
        self.user = torch.where(index.valid, index.b_idx, 0).clamp_max(max(U - 1, 0))
        self.U = U

    def lengths(self, user_lengths: torch.Tensor) -> torch.Tensor:
        """``[Nq]``: each candidate's history length (0 for uncovered candidates)."""
        if self.U == 0:
            return torch.zeros_like(self.user)
        return torch.where(self.valid, user_lengths.long()[self.user], 0)


def repeat_histories(keys: torch.Tensor, lengths: torch.Tensor | None, offsets: torch.Tensor | None,
                     query_offsets: torch.Tensor, Nq: int):
    """The literal repeat of each user's history once per candidate (the oracle's layout; the fast paths never build
    it): ``(keys_rep, lengths_rep, offsets_rep)`` with ``keys_rep`` [Nq, T, D] and ``lengths_rep`` [Nq] padded, or
    ``[sum_i L_u(i), D]`` and ``offsets_rep`` [Nq + 1] jagged. Indexing ``keys`` keeps autograd: the keys' gradient
    sums over each user's candidates."""
    cand = CandidateIndex(query_offsets, Nq)
    if offsets is None:
        T = keys.shape[1]
        rep_len = cand.lengths(safe_lengths(lengths, T))
        if cand.U == 0:
            return keys.new_zeros(Nq, T, keys.shape[-1]), rep_len, None
        return keys[cand.user], rep_len, None
    users = JaggedIndex(offsets, keys.shape[0])
    rep_len = cand.lengths(users.lengths)
    rep_offsets = offsets_from_lengths(rep_len)
    R = int(rep_offsets[-1])
    owner = torch.repeat_interleave(torch.arange(Nq, device=keys.device), rep_len, output_size=R)
    starts = users.offsets[:-1][cand.user] if cand.U else torch.zeros_like(cand.user)
    rows = starts[owner] + torch.arange(R, device=keys.device) - rep_offsets[:-1][owner]
    return keys[rows], None, rep_offsets
