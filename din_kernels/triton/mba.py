"""Mini-batch aware L2 (SPEC section 3) in Triton: one kernel over the distinct ids of a batch.

The ids of a step are sorted once on the device (:func:`sort_segments`); equal ids then form segments. The grid has
one program per sorted position (times a block of D); the program at the start of a segment owns that distinct id j
and every other program does nothing. The owner

- optionally sums the output-gradient rows of its segment (the embedding backward, ``BLOCK_M`` rows at a time in the
  sorted order: each touched row is written exactly once, deterministic, no atomics),
- adds ``lam * W[j] / n[j]`` (``n`` clamped to at least 1) and writes the row (added in place into a dense grad, or
  stored into a fresh dense grad or into row ``rank`` of a compact ``[U, D]`` buffer for sparse grads),
- optionally writes its penalty share ``lam / 2 * ||W[j]||^2 / n[j]``.

Only the rows of ids in the batch are read or written: the cost is O(batch), independent of K. Nothing here syncs
with the host: sparse gradients hold one entry per lookup (zeros where a lookup is not its row's owner).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._alloc import empty
from ._launch import launch

# output modes of _mba_segment_kernel
OUT_NONE, OUT_ADD_AT_ID, OUT_STORE_AT_ID, OUT_STORE_AT_RANK = 0, 1, 2, 3


@triton.jit
def _mba_segment_kernel(
    sorted_ptr, perm_ptr, seg_end_ptr, rank_ptr, weight_ptr, counts_ptr, grad_out_ptr, out_ptr, penalty_ptr,
    M, K, D, lam, padding_idx, stride_wk, stride_wd, stride_gm, stride_gd, stride_ok, stride_od,
    HAS_GRAD_OUT: tl.constexpr, HAS_TERM: tl.constexpr, OUT_MODE: tl.constexpr, PENALTY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    acc_ty = penalty_ptr.dtype.element_ty
    i = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    j = tl.load(sorted_ptr + i).to(tl.int64)
    prev = tl.load(sorted_ptr + tl.maximum(i - 1, 0)).to(tl.int64)
    # owner of a distinct id: first of its segment, not the padding id, inside the table (memory safety)
    live = ((i == 0) | (j != prev)) & (j != padding_idx) & (j >= 0) & (j < K)
    row = tl.where(live, j, 0)
    use_w = live
    if not HAS_TERM:
        use_w = i < 0  # lam = 0: no row of the table is read
    w = tl.load(weight_ptr + row * stride_wk + cols * stride_wd, mask=col_ok & use_w, other=0.0).to(acc_ty)
    n = tl.maximum(tl.load(counts_ptr + row, mask=use_w, other=1).to(acc_ty), 1.0)
    if PENALTY:
        share = tl.sum(w * w, 0) / n * lam * 0.5
        tl.store(penalty_ptr + i * tl.num_programs(1) + pid_d, share.to(acc_ty))
    if OUT_MODE != 0:
        acc = (w * (lam / n)).to(acc_ty)  # lam arrives as float64 from inductor
        if HAS_GRAD_OUT:
            # the segment's output-gradient rows, BLOCK_M at a time in a fixed order (deterministic)
            end = tl.where(live, tl.load(seg_end_ptr + i), i)
            for k0 in range(i, end, BLOCK_M):
                ks = k0 + tl.arange(0, BLOCK_M)
                k_ok = ks < end
                src = tl.load(perm_ptr + ks, mask=k_ok, other=0).to(tl.int64)
                tile = tl.load(grad_out_ptr + src[:, None] * stride_gm + cols[None, :] * stride_gd,
                               mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc += tl.sum(tile.to(acc_ty), 0)
        ok = col_ok & live
        if OUT_MODE == 3:
            dst = out_ptr + tl.load(rank_ptr + i).to(tl.int64) * stride_ok + cols * stride_od
        else:
            dst = out_ptr + row * stride_ok + cols * stride_od
        if OUT_MODE == 1:
            acc += tl.load(dst, mask=ok, other=0.0).to(acc_ty)
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sort_segments(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sorts the ids of a step once, on their device, without a host sync.

    Args:
        ids: any shape, int32/int64.
    Returns:
        ``(sorted [M] int64, perm [M] int64, seg_end [M] int64)``: ``sorted = ids.flatten()[perm]`` (stable), and
        ``seg_end[i]`` is one past the last position of the segment of equal ids that contains ``i``.
    """
    flat = ids.reshape(-1).long()
    ordered, perm = torch.sort(flat, stable=True)
    M = ordered.shape[0]
    if M == 0:
        return ordered, perm, perm.clone()
    pos = torch.arange(M, device=ids.device)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    # the next segment start strictly after i (M if none): reverse running minimum of the start positions
    nxt = torch.where(starts, pos, M)
    nxt = torch.cat([nxt[1:], nxt.new_full((1,), M)])
    seg_end = nxt.flip(0).cummin(0).values.flip(0)
    return ordered, perm, seg_end


def _acc_dtype(weight: Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _run_segments(segments, weight, counts, lam, padding_idx, out=None, out_mode=OUT_NONE, grad_out=None, rank=None,
            penalty=False) -> Tensor | None:
    """Runs the segment kernel; returns the penalty (0-dim, float32 or float64) when ``penalty``."""
    ordered, perm, seg_end = segments
    M = ordered.shape[0]
    K, D = weight.shape
    acc = _acc_dtype(weight)
    block_d = min(triton.next_power_of_2(max(D, 1)), 256)
    grid = (M, triton.cdiv(D, block_d))
    shares = empty(M, grid[1], dtype=acc, device=weight.device) if penalty else weight.new_empty(1, dtype=acc)
    if M and D:
        launch(
            _mba_segment_kernel, grid,
            ordered, perm, seg_end, ordered if rank is None else rank, weight, counts,
            weight if grad_out is None else grad_out, weight if out is None else out, shares,
            M, K, D, lam, -1 if padding_idx is None else padding_idx, weight.stride(0), weight.stride(1),
            *(grad_out.stride() if grad_out is not None else (0, 0)), *(out.stride() if out is not None else (0, 0)),
            HAS_GRAD_OUT=grad_out is not None, HAS_TERM=lam != 0, OUT_MODE=out_mode, PENALTY=penalty,
            BLOCK_M=max(min(2048 // block_d, 32), 1), BLOCK_D=block_d,
        )
    elif penalty:
        shares.zero_()
    return shares.sum() if penalty else None


def mba_l2_dense(weight: Tensor, grad: Tensor, ids: Tensor, counts: Tensor, lam: float,
                 padding_idx: int | None) -> Tensor:
    """``grad [K, D]`` += ``lam * W[j] / n[j]`` in place for each distinct id j of ``ids``; returns the penalty
    (0-dim, float32, or float64 for a float64 table)."""
    return _run_segments(sort_segments(ids), weight, counts, lam, padding_idx, out=grad, out_mode=OUT_ADD_AT_ID,
                   penalty=True)


def mba_penalty(segments: tuple[Tensor, Tensor, Tensor], weight: Tensor, counts: Tensor, lam: float,
                padding_idx: int | None) -> Tensor:
    """``lam / 2 * sum_j ||W[j]||^2 / n[j]`` over the distinct ids of ``segments`` (:func:`sort_segments`)."""
    return _run_segments(segments, weight, counts, lam, padding_idx, penalty=True)


def embedding_backward_dense(grad_out: Tensor, segments: tuple[Tensor, Tensor, Tensor], weight: Tensor,
                             counts: Tensor, lam: float, padding_idx: int | None) -> Tensor:
    """The embedding's dense gradient ``[K, D]`` with the MBA term: row j (a distinct id of the batch) is
    ``sum of grad_out rows looking up j + lam * W[j] / n[j]``; other rows are 0.

    Args:
        grad_out: ``[M, D]``, the output gradient of the ``M`` lookups in the order of ``ids.flatten()``.
        segments: :func:`sort_segments` of those ids.
    """
    grad = torch.zeros_like(weight)
    _run_segments(segments, weight, counts, lam, padding_idx, out=grad, out_mode=OUT_STORE_AT_ID, grad_out=grad_out)
    return grad


def embedding_backward_sparse(grad_out: Tensor, segments: tuple[Tensor, Tensor, Tensor], weight: Tensor,
                              counts: Tensor, lam: float, padding_idx: int | None) -> tuple[Tensor, Tensor]:
    """As :func:`embedding_backward_dense`, as the entries of an uncoalesced sparse COO gradient with one entry per
    lookup, in sorted order: ``(indices [M] = the sorted ids clamped into the table, values [M, D])``; the first
    position of each distinct id's segment holds its row, the others (and the padding id's) hold zeros. No shape
    depends on the ids' values, and nothing syncs with the host."""
    ordered = segments[0]
    M = ordered.shape[0]
    values = torch.zeros(M, weight.shape[1], dtype=weight.dtype, device=weight.device)
    rank = torch.arange(M, device=weight.device)
    _run_segments(segments, weight, counts, lam, padding_idx, out=values, out_mode=OUT_STORE_AT_RANK,
                  grad_out=grad_out, rank=rank)
    return ordered.clamp(0, max(weight.shape[0] - 1, 0)), values
