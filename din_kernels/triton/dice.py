"""Dice (SPEC section 2) in Triton: the kernels and their launchers.

Layout: ``x`` is viewed as ``[N, C]`` (every position a row, the channels the last dim); ``mask`` as ``[N]``.

Training forward, three launches plus one for the running statistics:

1. ``_dice_stats_partial_kernel``: grid ``(P, cdiv(C, BLOCK_C))``; program p reduces a contiguous run of row tiles to
   (count, mean, M2) of its selected rows, tile by tile with Chan et al.'s pairwise merge (fp32 or fp64 accumulation).
2. ``_dice_stats_finalize_kernel``: grid ``(cdiv(C, BLOCK_C),)``; merges the P partials exactly
   (``M2 = sum M2_p + sum n_p (mean_p - mean)^2``) into ``stats [3, C]`` = (mean, biased var, count).
3. ``_dice_fwd_kernel``: the elementwise ``y = x * (alpha + (1 - alpha) * p)``.
4. ``_dice_update_running_kernel``: ``nn.BatchNorm1d``'s running update with the unbiased variance.

Backward (see :mod:`din_kernels.torch_impl.dice` for the formula): one reduction pass
(``_dice_bwd_reduce_kernel``: per-program partial sums of ``gp``, ``gp * u`` and ``dy * x * (1 - p)``, summed over
the P programs) and one elementwise pass (``_dice_bwd_kernel``); nothing of size ``[N, C]`` is saved but ``x``.

Bytes moved for ``N x C`` elements of ``s`` bytes: forward ``3 N C s`` (read x twice, write y), backward
``5 N C s`` (read x, dy twice, write dx), plus ``N`` bytes per mask read and ``O(P C)`` for the partials.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._alloc import empty
from ._launch import launch

# Programs of a reduction pass (over all column blocks): enough to fill an H100/H200 a few times over.
MAX_REDUCE_PROGRAMS = 1024
TILE_ELEMENTS = 2048  # per program and tile: 16 fp32 values a thread with 4 warps


@triton.jit
def _sigmoid_pre(x, mean, r, w, b, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``(u, p)``: the normalised input and the switch ``sigmoid(w * u + b)``."""
    u = (x - mean) * r
    a = u
    if HAS_WEIGHT:
        a = a * w
    if HAS_BIAS:
        a = a + b
    e = tl.exp(-tl.abs(a))  # no overflow for large |a|; small p keeps its relative precision
    p = tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return u, p


@triton.jit
def _dice_stats_partial_kernel(
    x_ptr, mask_ptr, pcount_ptr, pmean_ptr, pm2_ptr,
    N, C, stride_xn, stride_xc, tiles_per_prog,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = pmean_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    n_a = tl.zeros([BLOCK_C], acc_ty)
    mean_a = tl.zeros([BLOCK_C], acc_ty)
    m2_a = tl.zeros([BLOCK_C], acc_ty)
    row0 = pid * tiles_per_prog * BLOCK_N
    for t in range(0, tiles_per_prog):
        rows = row0 + t * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        sel = rows < N
        if HAS_MASK:
            sel = sel & (tl.load(mask_ptr + rows, mask=sel, other=0) != 0)
        valid = sel[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xc, mask=valid, other=0.0).to(acc_ty)
        n_b = tl.sum(sel.to(acc_ty), 0)
        mean_b = tl.sum(x, 0) / tl.maximum(n_b, 1.0)
        d = tl.where(valid, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, 0)
        n = n_a + n_b
        frac = n_b / tl.maximum(n, 1.0)
        delta = mean_b - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_b + delta * delta * n_a * frac
        n_a = n
    out = pid * C + cols
    tl.store(pcount_ptr + out, n_a, mask=col_ok)
    tl.store(pmean_ptr + out, mean_a, mask=col_ok)
    tl.store(pm2_ptr + out, m2_a, mask=col_ok)


@triton.jit
def _load_partials(pcount_ptr, pmean_ptr, pm2_ptr, p0, cols, col_ok, P, C, BLOCK_P: tl.constexpr):
    """``(count, mean, M2)`` tiles ``[BLOCK_P, BLOCK_C]`` of the partials ``p0 .. p0 + BLOCK_P`` (zeros past P)."""
    ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
    ok = (ps < P)[:, None] & col_ok[None, :]
    idx = ps[:, None] * C + cols[None, :]
    cnt = tl.load(pcount_ptr + idx, mask=ok, other=0.0)
    return cnt, tl.load(pmean_ptr + idx, mask=ok, other=0.0), tl.load(pm2_ptr + idx, mask=ok, other=0.0)


@triton.jit
def _dice_stats_finalize_kernel(
    pcount_ptr, pmean_ptr, pm2_ptr, stats_ptr, P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = stats_ptr.dtype.element_ty
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    n = tl.zeros([BLOCK_C], acc_ty)
    s = tl.zeros([BLOCK_C], acc_ty)
    for p0 in range(0, P, BLOCK_P):
        cnt, mean_p, _ = _load_partials(pcount_ptr, pmean_ptr, pm2_ptr, p0, cols, col_ok, P, C, BLOCK_P)
        n += tl.sum(cnt, 0)
        s += tl.sum(cnt * mean_p, 0)
    mean = s / tl.maximum(n, 1.0)
    m2 = tl.zeros([BLOCK_C], acc_ty)
    for p0 in range(0, P, BLOCK_P):
        cnt, mean_p, m2_p = _load_partials(pcount_ptr, pmean_ptr, pm2_ptr, p0, cols, col_ok, P, C, BLOCK_P)
        d = mean_p - mean[None, :]
        m2 += tl.sum(m2_p + cnt * d * d, 0)
    tl.store(stats_ptr + cols, mean, mask=col_ok)
    tl.store(stats_ptr + C + cols, m2 / tl.maximum(n, 1.0), mask=col_ok)
    tl.store(stats_ptr + 2 * C + cols, n, mask=col_ok)


@triton.jit
def _load_channel_params(stats_ptr, alpha_ptr, weight_ptr, bias_ptr, cols, col_ok, C, eps,
                         ALPHA_SCALAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``(mean, r = 1 / sqrt(var + eps), alpha, weight, bias)`` of the channels ``cols``, in the stats dtype."""
    acc_ty = stats_ptr.dtype.element_ty
    mean = tl.load(stats_ptr + cols, mask=col_ok, other=0.0)
    var = tl.load(stats_ptr + C + cols, mask=col_ok, other=1.0)
    r = 1.0 / tl.sqrt((var + eps).to(acc_ty))
    if ALPHA_SCALAR:
        alpha = tl.load(alpha_ptr + cols * 0, mask=col_ok, other=0.0).to(acc_ty)
    else:
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    w = mean
    b = mean
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    return mean, r, alpha, w, b


@triton.jit
def _dice_fwd_kernel(
    x_ptr, y_ptr, stats_ptr, alpha_ptr, weight_ptr, bias_ptr,
    N, C, stride_xn, stride_xc, eps,
    ALPHA_SCALAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean, r, alpha, w, b = _load_channel_params(stats_ptr, alpha_ptr, weight_ptr, bias_ptr, cols, col_ok, C, eps,
                                                ALPHA_SCALAR, HAS_WEIGHT, HAS_BIAS)
    ok = (rows < N)[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xc, mask=ok, other=0.0).to(acc_ty)
    _, p = _sigmoid_pre(x, mean[None, :], r[None, :], w[None, :], b[None, :], HAS_WEIGHT, HAS_BIAS)
    y = x * (alpha[None, :] + (1.0 - alpha[None, :]) * p)
    tl.store(y_ptr + rows[:, None] * C + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dice_update_running_kernel(rmean_ptr, rvar_ptr, stats_ptr, C, momentum, BLOCK_C: tl.constexpr):
    acc_ty = stats_ptr.dtype.element_ty
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean = tl.load(stats_ptr + cols, mask=col_ok, other=0.0)
    var = tl.load(stats_ptr + C + cols, mask=col_ok, other=0.0)
    n = tl.load(stats_ptr + 2 * C + cols, mask=col_ok, other=0.0)
    unbiased = var * n / tl.maximum(n - 1.0, 1.0)
    rm = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    rv = tl.load(rvar_ptr + cols, mask=col_ok, other=0.0).to(acc_ty)
    new_mean = (rm + momentum * (mean - rm)).to(acc_ty)
    new_var = (rv + momentum * (unbiased - rv)).to(acc_ty)
    # a batch with no selected position, or with non-finite statistics, leaves the channel unchanged
    finite = (tl.abs(mean) < float("inf")) & (tl.abs(unbiased) < float("inf"))  # False for NaN too
    keep = col_ok & (n > 0) & finite
    tl.store(rmean_ptr + cols, new_mean.to(rmean_ptr.dtype.element_ty), mask=keep)
    tl.store(rvar_ptr + cols, new_var.to(rvar_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _dice_bwd_reduce_kernel(
    dy_ptr, x_ptr, stats_ptr, alpha_ptr, weight_ptr, bias_ptr, partial_ptr,
    N, C, P, stride_dn, stride_dc, stride_xn, stride_xc, eps, tiles_per_prog,
    ALPHA_SCALAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partials ``[3, P, C]``: sums of ``gp``, ``gp * u`` and ``dy * x * (1 - p)`` over program p's rows."""
    acc_ty = stats_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mean, r, alpha, w, b = _load_channel_params(stats_ptr, alpha_ptr, weight_ptr, bias_ptr, cols, col_ok, C, eps,
                                                ALPHA_SCALAR, HAS_WEIGHT, HAS_BIAS)
    s_gp = tl.zeros([BLOCK_C], acc_ty)
    s_gpu = tl.zeros([BLOCK_C], acc_ty)
    s_da = tl.zeros([BLOCK_C], acc_ty)
    row0 = pid * tiles_per_prog * BLOCK_N
    for t in range(0, tiles_per_prog):
        rows = row0 + t * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        ok = (rows < N)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xc, mask=ok, other=0.0).to(acc_ty)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dn + cols[None, :] * stride_dc, mask=ok, other=0.0).to(acc_ty)
        u, p = _sigmoid_pre(x, mean[None, :], r[None, :], w[None, :], b[None, :], HAS_WEIGHT, HAS_BIAS)
        dyx = dy * x
        gp = dyx * (1.0 - alpha[None, :]) * p * (1.0 - p)
        s_gp += tl.sum(gp, 0)
        s_gpu += tl.sum(gp * u, 0)
        s_da += tl.sum(dyx * (1.0 - p), 0)
    out = pid * C + cols
    tl.store(partial_ptr + out, s_gp, mask=col_ok)
    tl.store(partial_ptr + P * C + out, s_gpu, mask=col_ok)
    tl.store(partial_ptr + 2 * P * C + out, s_da, mask=col_ok)


@triton.jit
def _dice_bwd_kernel(
    dy_ptr, x_ptr, mask_ptr, dx_ptr, stats_ptr, sums_ptr, alpha_ptr, weight_ptr, bias_ptr,
    N, C, stride_dn, stride_dc, stride_xn, stride_xc, eps,
    TRAINING: tl.constexpr, HAS_MASK: tl.constexpr, ALPHA_SCALAR: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``dx = dy (alpha + (1 - alpha) p) + r g - [selected] r / n (sum g + u sum g u)`` with ``g = gp * weight``."""
    acc_ty = stats_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    row_ok = rows < N
    mean, r, alpha, w, b = _load_channel_params(stats_ptr, alpha_ptr, weight_ptr, bias_ptr, cols, col_ok, C, eps,
                                                ALPHA_SCALAR, HAS_WEIGHT, HAS_BIAS)
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xn + cols[None, :] * stride_xc, mask=ok, other=0.0).to(acc_ty)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dn + cols[None, :] * stride_dc, mask=ok, other=0.0).to(acc_ty)
    u, p = _sigmoid_pre(x, mean[None, :], r[None, :], w[None, :], b[None, :], HAS_WEIGHT, HAS_BIAS)
    g = dy * x * (1.0 - alpha[None, :]) * p * (1.0 - p)
    if HAS_WEIGHT:
        g = g * w[None, :]
    dx = dy * (alpha[None, :] + (1.0 - alpha[None, :]) * p) + r[None, :] * g
    if TRAINING:
        n = tl.load(stats_ptr + 2 * C + cols, mask=col_ok, other=1.0)
        s_g = tl.load(sums_ptr + cols, mask=col_ok, other=0.0)
        s_gu = tl.load(sums_ptr + C + cols, mask=col_ok, other=0.0)
        if HAS_WEIGHT:
            s_g = s_g * w
            s_gu = s_gu * w
        coef = -r / tl.maximum(n, 1.0)
        corr = coef[None, :] * (s_g[None, :] + u * s_gu[None, :])
        if HAS_MASK:
            sel = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
            corr = tl.where(sel[:, None], corr, 0.0)
        dx = dx + corr
    tl.store(dx_ptr + rows[:, None] * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# launchers


def _blocks(C: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_C)``: a tile of about ``TILE_ELEMENTS`` elements, channels padded to a power of two."""
    block_c = min(triton.next_power_of_2(max(C, 1)), 128)
    return max(TILE_ELEMENTS // block_c, 16), block_c


def _reduce_grid(N: int, C: int, block_n: int, block_c: int) -> tuple[int, int, int]:
    """``(P, tiles_per_prog, col_blocks)`` of a reduction pass: at most ``MAX_REDUCE_PROGRAMS`` programs."""
    col_blocks = triton.cdiv(C, block_c)
    tiles = triton.cdiv(N, block_n)
    per_col = max(MAX_REDUCE_PROGRAMS // col_blocks, 1)
    tiles_per_prog = triton.cdiv(tiles, per_col)
    return triton.cdiv(tiles, tiles_per_prog), tiles_per_prog, col_blocks


def _flat(t: Tensor, C: int) -> Tensor:
    return t.reshape(-1, C)


def _flat_mask(mask: Tensor | None, N: int) -> Tensor | None:
    return None if mask is None else mask.reshape(N).view(torch.uint8)


def batch_stats(x: Tensor, mask: Tensor | None, acc_dtype: torch.dtype) -> Tensor:
    """``stats [3, C]`` = (mean, biased variance, count) of ``x`` ``[..., C]`` over the positions where ``mask``
    ``[...]`` is True (all when None); zeros when none is selected."""
    C = x.shape[-1]
    x2 = _flat(x, C)
    N = x2.shape[0]
    stats = empty(3, C, dtype=acc_dtype, device=x.device)
    if C == 0:
        return stats
    block_n, block_c = _blocks(C)
    if N == 0:
        stats.zero_()
        return stats
    P, tiles_per_prog, col_blocks = _reduce_grid(N, C, block_n, block_c)
    pcount, pmean, pm2 = (empty(P, C, dtype=acc_dtype, device=x.device) for _ in range(3))
    m = _flat_mask(mask, N)
    launch(
        _dice_stats_partial_kernel, (P, col_blocks),
        x2, x2 if m is None else m, pcount, pmean, pm2, N, C, x2.stride(0), x2.stride(1), tiles_per_prog,
        HAS_MASK=m is not None, BLOCK_N=block_n, BLOCK_C=block_c,
    )
    block_p = min(triton.next_power_of_2(P), max(TILE_ELEMENTS // block_c, 1))
    launch(
        _dice_stats_finalize_kernel, (col_blocks,),
        pcount, pmean, pm2, stats, P, C, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    return stats


def dice_forward(x: Tensor, alpha: Tensor, weight: Tensor | None, bias: Tensor | None, stats: Tensor,
                 eps: float) -> Tensor:
    """``y`` (shape and dtype of ``x`` ``[..., C]``) with the statistics ``stats [3, C]`` (rows mean, var)."""
    C = x.shape[-1]
    x2 = _flat(x, C)
    N = x2.shape[0]
    y = empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0 or C == 0:
        return y
    block_n, block_c = _blocks(C)
    grid = (triton.cdiv(N, block_n), triton.cdiv(C, block_c))
    launch(
        _dice_fwd_kernel, grid,
        x2, y, stats, alpha, x2 if weight is None else weight, x2 if bias is None else bias,
        N, C, x2.stride(0), x2.stride(1), eps,
        ALPHA_SCALAR=alpha.numel() == 1, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return y


def update_running_stats(running_mean: Tensor, running_var: Tensor, stats: Tensor, momentum: float) -> None:
    """In place: ``running = (1 - momentum) running + momentum batch`` (unbiased variance), where count > 0."""
    C = running_mean.shape[0]
    if C == 0:
        return
    block_c = min(triton.next_power_of_2(C), 1024)
    launch(
        _dice_update_running_kernel, (triton.cdiv(C, block_c),),
        running_mean, running_var, stats, C, momentum, BLOCK_C=block_c,
    )


def dice_backward(dy: Tensor, x: Tensor, mask: Tensor | None, alpha: Tensor, weight: Tensor | None,
                  bias: Tensor | None, stats: Tensor, training: bool, eps: float
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dx [..., C], d alpha [C] or [1], d weight [C], d bias [C])`` in the compute dtype of ``stats``."""
    C = x.shape[-1]
    x2, dy2 = _flat(x, C), _flat(dy, C)
    N = x2.shape[0]
    acc_dtype = stats.dtype
    dx = empty(x.shape, dtype=x.dtype, device=x.device)
    if N == 0 or C == 0:
        return dx, *(torch.zeros(C, dtype=acc_dtype, device=x.device) for _ in range(3))
    block_n, block_c = _blocks(C)
    P, tiles_per_prog, col_blocks = _reduce_grid(N, C, block_n, block_c)
    partial = empty(3, P, C, dtype=acc_dtype, device=x.device)
    common = dict(ALPHA_SCALAR=alpha.numel() == 1, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                  BLOCK_N=block_n, BLOCK_C=block_c)
    w_arg, b_arg = x2 if weight is None else weight, x2 if bias is None else bias
    launch(
        _dice_bwd_reduce_kernel, (P, col_blocks),
        dy2, x2, stats, alpha, w_arg, b_arg, partial, N, C, P, dy2.stride(0), dy2.stride(1), x2.stride(0),
        x2.stride(1), eps, tiles_per_prog, **common,
    )
    sums = partial[:2].sum(1)  # [2, C]: sum gp, sum gp * u
    m = _flat_mask(mask, N)
    grid = (triton.cdiv(N, block_n), col_blocks)
    launch(
        _dice_bwd_kernel, grid,
        dy2, x2, x2 if m is None else m, dx, stats, sums, alpha, w_arg, b_arg, N, C, dy2.stride(0), dy2.stride(1),
        x2.stride(0), x2.stride(1), eps, TRAINING=training, HAS_MASK=m is not None, **common,
    )
    return dx, partial[2].sum(0), partial[1].sum(0), partial[0].sum(0)
