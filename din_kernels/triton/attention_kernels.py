"""Target attention (SPEC section 1) in Triton: the fused forward, Dice-statistics and backward kernels and the
``@triton.jit`` functions they share; launched by :mod:`din_kernels.triton.attention`, their autotune configs and
shared memory in :mod:`.attention_smem`.

Layout. Keys are read row by row from the padded ``[B, T, D]`` tensor (row ``b * T + t``) or the jagged ``[N, D]``
one (row ``offsets[b] + t``). Every kernel clamps what it reads of ``lengths`` (to ``[0, T]``) and ``offsets`` (to
``[0, N]``, non-decreasing) and masks every load and store with ``t < L`` and the block bounds, so no kernel reads or
writes outside its tensors whatever ``lengths``/``offsets`` hold; keys rows at ``t >= L`` are never read.

Forward (``_target_attention_fwd_kernel``, one program per sample). The program forms the per-sample matrix
``M_b = (Wk - Wd) + Wp * q_b`` ``[H1, D]`` once (``c_b = q_b @ (Wq + Wd)^T + b1`` comes from one ``[B, D] x [D, H1]``
matmul in the launcher), then walks the sample's behaviours in tiles of ``BLOCK_T`` rows: ``z1 = K_tile @ M_b^T + c_b``
(one ``tl.dot``), the activation, ``z2 = h1 @ W2^T + b2`` and its activation (two hidden layers), the score
``s = h @ w_last + b_last`` and the pooling ``sum_t w_t k_t``, with an online (flash-attention style) softmax of
``scale * s`` when ``normalization == "softmax"``. The ``[B, T, 4D]`` concatenation and the ``[B, T, H]`` activations
live only in registers. Softmax keeps the raw logits of the sample in a float32 row of ``w32`` and rewrites them as
weights ``exp(logit - lse)`` once the sample's log-sum-exp ``lse`` is known; ``w32`` and a float32 copy of ``v_U``
are outputs that the backward reuses (so its ``delta_b`` is exact even when ``w`` and ``v_U`` are stored in bf16).

Backward (``_target_attention_bwd_kernel``) recomputes the forward of each tile on chip and walks the chain rule back:
``ds`` (``dw = grad_scores + k . grad_out``; softmax: ``ds = scale * w * (dw - delta_b)`` with
``delta_b = sum_t w_t grad_scores_t + grad_out . v_U`` from the saved float32 ``w32`` and ``out32``), the last
layer, layer 2, the activations, ``G = dL/dz1`` and then

- ``dK = G @ M_b + w grad_out`` (stored at once), ``dq_b = sum_t k_t * (G @ Wp)_t + dc_b @ (Wq + Wd)``,
- ``d(Wk - Wd) = sum G^T K`` and ``dWp = sum G^T (q_b * K)`` (two ``tl.dot`` per tile into per-program accumulators),
- ``dc_b = sum_t G``, whence ``d(Wq + Wd) = dc^T @ Q`` and ``db1 = sum_b dc_b`` (one small matmul in the launcher);
  ``W1``'s gradient is ``[dWqd | dA | dWqd - dA | dWp]``.

Weight-gradient scheme: the grid has ``P`` programs (the number of SMs on a GPU, at most B), program ``p`` handles
samples ``p, p + P, ...`` and keeps every batch-summed gradient (``d(Wk - Wd)``, ``dWp``, ``dW2``, ``db2``,
``dw_last``, ``db_last``, the PReLU weights / Dice alphas) in registers; each program writes its partials once to a
``[P, ...]`` buffer that the launcher sums over ``P`` (``torch.sum``: deterministic, bit-reproducible, no atomics).
Per-sample quantities (``dq``, ``dc``) are written per sample. Partials cost ``P * (2 * H1 * D + H1 * H2) * 4`` bytes
written and read back, 12.5 MB for P = 132, D = 128, H = (80, 40), where per-sample partials of ``dM_b`` would cost
``8 B H1 D`` (84 MB at B = 1024) and atomics would not be reproducible. (Accumulating a per-sample ``dM_b`` instead, and
adding it into the program's partial slice at the end of each sample, saves two ``tl.dot`` per tile, but ptxas reports
three times the register spills on sm_90.) Under softmax the last bias's gradient is exactly 0 (the softmax is shift
invariant) and is returned as such.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_smem import (
    _AUTOTUNE_KEY,
    _BWD_TILES,
    _FWD_TILES,
    MODE_DICE_SUMS_LAYER1,
    MODE_DICE_SUMS_TOP,
    MODE_DQ_ONLY,
    MODE_GRADS,
    _autotune_configs,
    _prune,
)

_PRUNE = {"early_config_prune": _prune}

# the hidden layers' activation: the kernels' ``ACT`` constexpr (``tl.constexpr`` values, read by the kernels as
# globals; the launcher passes their ``.value``)
ACT_SIGMOID = tl.constexpr(0)
ACT_RELU = tl.constexpr(1)
ACT_PRELU = tl.constexpr(2)
ACT_DICE = tl.constexpr(3)
ACTIVATION_CODES = {"sigmoid": ACT_SIGMOID.value, "relu": ACT_RELU.value, "prelu": ACT_PRELU.value,
                    "dice": ACT_DICE.value}


# ----------------------------------------------------------------------------------------------------- jit helpers


@triton.jit
def _rows_of(b, len_ptr, off_ptr, cand_ptr, NC, T, N, JAGGED: tl.constexpr, CANDIDATES: tl.constexpr):
    """``(first key row, first output row, clamped length)`` (int64) of sample ``b``. With ``CANDIDATES`` (several
    candidates per history) ``b`` is a candidate, and ``cand_ptr`` [3, NC] holds each candidate's key start, length
    and output start (of its scores and its rows of the keys' gradient), computed and clamped by the launcher."""
    if CANDIDATES:
        kstart = tl.load(cand_ptr + b).to(tl.int64)
        length = tl.load(cand_ptr + NC + b).to(tl.int64)
        ostart = tl.load(cand_ptr + 2 * NC + b).to(tl.int64)
    else:
        kstart, length = _sample_range(b, len_ptr, off_ptr, T, N, JAGGED)
        ostart = kstart
    return kstart, ostart, length


@triton.jit
def _sample_range(b, len_ptr, off_ptr, T, N, JAGGED: tl.constexpr):
    """First row (int64) and clamped length (int64) of sample ``b``."""
    if JAGGED:
        start = tl.load(off_ptr + b).to(tl.int64)
        end = tl.load(off_ptr + b + 1).to(tl.int64)
        start = tl.minimum(tl.maximum(start, 0), N)
        end = tl.minimum(tl.maximum(end, start), N)
        length = end - start
    else:
        length = tl.load(len_ptr + b).to(tl.int64)
        length = tl.minimum(tl.maximum(length, 0), T)
        start = b * T
    return start, length


@triton.jit
def _activation_fwd(z, alpha, mu, r, ACT: tl.constexpr):
    """Activation of ``z`` [BT, BH]; ``alpha`` (PReLU weight / Dice alpha), ``mu``, ``r = 1/sqrt(var + eps)`` [BH]."""
    if ACT == ACT_SIGMOID:
        h = tl.sigmoid(z)
    elif ACT == ACT_RELU:
        h = tl.where(z < 0, 0.0, z)
    elif ACT == ACT_PRELU:
        h = tl.where(z >= 0, z, alpha[None, :] * z)
    else:  # ACT_DICE
        p = tl.sigmoid((z - mu[None, :]) * r[None, :])
        h = z * (alpha[None, :] + (1.0 - alpha[None, :]) * p)
    return h


@triton.jit
def _activation_bwd(dh, z, alpha, mu, r, sum_g, sum_gu, inv_n, valid, ACT: tl.constexpr, DICE_TRAIN: tl.constexpr):
    """``(dz, d alpha per element, g, u)`` for one hidden layer; ``dh``, ``z`` [BT, BH], ``valid`` [BT].

    Dice: ``g = dh z (1 - alpha) p (1 - p)`` and ``u = (z - mu) r``; in training ``dz`` includes the term through the
    batch statistics, ``-r / Nv (sum g + u sum g u)``, from the batch sums ``sum_g``, ``sum_gu`` [BH]
    (``inv_n = 1 / Nv``).
    """
    zero = tl.zeros_like(dh)
    if ACT == ACT_SIGMOID:
        h = tl.sigmoid(z)
        dz = dh * h * (1.0 - h)
        da = zero
        g = zero
        u = zero
    elif ACT == ACT_RELU:
        dz = tl.where(z > 0, dh, 0.0)
        da = zero
        g = zero
        u = zero
    elif ACT == ACT_PRELU:
        pos = z >= 0
        dz = tl.where(pos, dh, alpha[None, :] * dh)
        da = tl.where(pos, 0.0, dh * z)
        g = zero
        u = zero
    else:  # ACT_DICE
        u = (z - mu[None, :]) * r[None, :]
        p = tl.sigmoid(u)
        om = 1.0 - alpha[None, :]
        g = dh * z * om * p * (1.0 - p)
        dz = dh * (alpha[None, :] + om * p) + r[None, :] * g
        if DICE_TRAIN:
            corr = -(r * inv_n)[None, :] * (sum_g[None, :] + u * sum_gu[None, :])
            dz += tl.where(valid[:, None], corr, 0.0)
        da = dh * z * (1.0 - p)
    return dz, da, g, u


@triton.jit
def _dot16(a, b, INTERP: tl.constexpr):
    """``a @ b`` of 16-bit operands with float32 accumulation (the interpreter multiplies their float32 values:
    its own 16-bit products are not exact)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _split(x, PREC: tl.constexpr):
    """``(x_hi, x_lo)`` of float32 ``x``: ``x_hi`` the 16-bit operand (float16 for ``PREC == "fp16"``, else
    bfloat16); ``x_lo`` the bfloat16 remainder ``x - x_hi`` with ``PREC == "bf16x4"``, else ``x_hi`` itself (never
    used)."""
    if PREC == "fp16":
        x_hi = x.to(tl.float16)
    else:
        x_hi = x.to(tl.bfloat16)
    if PREC == "bf16x4":
        x_lo = (x - x_hi.to(tl.float32)).to(tl.bfloat16)
    else:
        x_lo = x_hi
    return x_hi, x_lo


@triton.jit
def _dot_split(a_hi, a_lo, b_hi, b_lo, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``a @ b`` in float32 from split operands: one 16-bit product, or with ``PREC == "bf16x4"`` the four bfloat16
    products ``a_hi b_hi + (a_hi b_lo + a_lo b_hi + a_lo b_lo)`` (float32-grade results)."""
    if PREC == "bf16x4":
        small = _dot16(a_hi, b_lo, INTERP) + _dot16(a_lo, b_hi, INTERP) + _dot16(a_lo, b_lo, INTERP)
        return _dot16(a_hi, b_hi, INTERP) + small
    else:
        return _dot16(a_hi, b_hi, INTERP)


@triton.jit
def _dot_f32(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``a @ b`` of float32 tile operands (split here)."""
    a_hi, a_lo = _split(a, PREC)
    b_hi, b_lo = _split(b, PREC)
    return _dot_split(a_hi, a_lo, b_hi, b_lo, PREC, INTERP)


@triton.jit
def _dot_f32_split(a, b_hi, b_lo, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``a @ b`` of a float32 tile ``a`` (split here) and a split loop-invariant ``b``."""
    a_hi, a_lo = _split(a, PREC)
    return _dot_split(a_hi, a_lo, b_hi, b_lo, PREC, INTERP)


@triton.jit
def _load_vec(ptr, idx, n):
    """``ptr[idx]`` [len(idx)] in float32, zero where ``idx >= n``."""
    return tl.load(ptr + idx, mask=idx < n, other=0.0).to(tl.float32)


@triton.jit
def _load_mat(ptr, rows, cols, n_rows, n_cols):
    """``[len(rows), len(cols)]`` of a contiguous ``[n_rows, n_cols]`` fp32 matrix, zero outside."""
    msk = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=msk, other=0.0)


@triton.jit
def _load_mat_t(ptr, rows, cols, n_rows, n_cols):
    """The transpose ``[len(cols), len(rows)]`` of :func:`_load_mat`, read directly in that orientation."""
    msk = (rows[None, :] < n_rows) & (cols[:, None] < n_cols)
    return tl.load(ptr + rows[None, :] * n_cols + cols[:, None], mask=msk, other=0.0)


@triton.jit
def _load_activation_params(act_pack_ptr, HT, col0, idx, n):
    """Alpha, mean, ``r`` [BH] of one hidden layer from the ``[4, HT]`` activation pack (columns from ``col0``)."""
    m = idx < n
    alpha = tl.load(act_pack_ptr + col0 + idx, mask=m, other=0.0)
    mu = tl.load(act_pack_ptr + HT + col0 + idx, mask=m, other=0.0)
    r = tl.load(act_pack_ptr + 2 * HT + col0 + idx, mask=m, other=0.0)
    return alpha, mu, r


@triton.jit
def _sample_matrix_t(A_ptr, wp_ptr, q, j1, d, H1, D, PREC: tl.constexpr):
    """``M_b^T = (A + Wp * q_b)^T`` [BD, BH1] of the sample whose query is ``q`` [BD], from ``A = Wk - Wd`` and ``Wp``
    [H1, D], split (:func:`_split`)."""
    return _split(_load_mat_t(A_ptr, j1, d, H1, D) + _load_mat_t(wp_ptr, j1, d, H1, D) * q[:, None], PREC)


@triton.jit
def _hidden_layers_fwd(K, Mt_hi, Mt_lo, c, W2t_hi, W2t_lo, b2, alpha1, mu1, r1, alpha2, mu2, r2,
                       NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """The hidden layers on a tile ``K`` [BT, BD], with ``M^T`` [BD, BH1] and ``W2^T`` [BH1, BH2] as split operands
    (see :func:`_dot_split`): ``(z1, h1, z2, h2)`` (``z2, h2 = z1, h1`` with one layer)."""
    z1 = _dot_f32_split(K, Mt_hi, Mt_lo, PREC, INTERP) + c[None, :]
    h1 = _activation_fwd(z1, alpha1, mu1, r1, ACT)
    if NUM_LAYERS == 2:
        z2 = _dot_f32_split(h1, W2t_hi, W2t_lo, PREC, INTERP) + b2[None, :]
        h2 = _activation_fwd(z2, alpha2, mu2, r2, ACT)
    else:
        z2 = z1
        h2 = h1
    return z1, h1, z2, h2


@triton.jit
def _load_keys(k_ptr, rows, valid, d, D):
    """Rows ``rows`` [BT] of the keys ``[*, D]`` in float32: ``[BT, BD]``, zero where not ``valid`` [BT] or
    ``d >= D``."""
    msk = valid[:, None] & (d[None, :] < D)
    return tl.load(k_ptr + rows[:, None] * D + d[None, :], mask=msk, other=0.0).to(tl.float32)


# --------------------------------------------------------------------------------------------------------- kernels


@triton.autotune(configs=_autotune_configs(_FWD_TILES), key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _target_attention_stats_kernel(
    q_ptr, k_ptr, len_ptr, off_ptr, cand_ptr, c_ptr, A_ptr, wp_ptr, w2_ptr, b2_ptr, act_pack_ptr,
    cnt_ptr, mean_ptr, m2_ptr,
    NC, T, N, D, H1, H2, HT, T_BUCKET,
    JAGGED: tl.constexpr, CANDIDATES: tl.constexpr, LAYER: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    BLOCK_HS: tl.constexpr,
):
    """Per-sample count [B], mean and sum of squared deviations [B, H] of hidden layer ``LAYER``'s pre-activations
    over the sample's behaviours (Dice training statistics, merged over samples by the launcher)."""
    b = tl.program_id(0).to(tl.int64)
    start, _, L = _rows_of(b, len_ptr, off_ptr, cand_ptr, NC, T, N, JAGGED, CANDIDATES)
    d = tl.arange(0, BLOCK_D)
    j1 = tl.arange(0, BLOCK_H1)
    j2 = tl.arange(0, BLOCK_H2)
    q = _load_vec(q_ptr + b * D, d, D)
    Mt_hi, Mt_lo = _sample_matrix_t(A_ptr, wp_ptr, q, j1, d, H1, D, PREC)
    c = _load_vec(c_ptr + b * H1, j1, H1)
    alpha1, mu1, r1 = _load_activation_params(act_pack_ptr, HT, 0, j1, H1)
    if LAYER == 2:
        W2t_hi, W2t_lo = _split(_load_mat_t(w2_ptr, j2, j1, H2, H1), PREC)
        b2 = _load_vec(b2_ptr, j2, H2)
    zero_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    n = tl.sum(zero_t, 0)
    mean = tl.zeros([BLOCK_HS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_HS], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < L
        K = _load_keys(k_ptr, start + t, valid, d, D)
        z = _dot_f32_split(K, Mt_hi, Mt_lo, PREC, INTERP) + c[None, :]
        if LAYER == 2:
            h1 = _activation_fwd(z, alpha1, mu1, r1, ACT)
            z = _dot_f32_split(h1, W2t_hi, W2t_lo, PREC, INTERP) + b2[None, :]
        nt = tl.sum(valid.to(tl.float32), 0)
        tmean = tl.sum(tl.where(valid[:, None], z, 0.0), 0) / nt
        dev = tl.where(valid[:, None], z - tmean[None, :], 0.0)
        tm2 = tl.sum(dev * dev, 0)
        tot = n + nt
        delta = tmean - mean
        mean = mean + delta * (nt / tot)
        m2 = m2 + tm2 + delta * delta * (n * nt / tot)
        n = tot
    js = tl.arange(0, BLOCK_HS)
    if LAYER == 1:
        HS = H1
    else:
        HS = H2
    tl.store(cnt_ptr + b, n)
    tl.store(mean_ptr + b * HS + js, mean, mask=js < HS)
    tl.store(m2_ptr + b * HS + js, m2, mask=js < HS)


@triton.autotune(configs=_autotune_configs(_FWD_TILES), key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _target_attention_fwd_kernel(
    q_ptr, k_ptr, len_ptr, off_ptr, cand_ptr, c_ptr, A_ptr, wp_ptr, w2_ptr, b2_ptr, w_last_ptr, b_last_ptr,
    act_pack_ptr, out_ptr, w_ptr, w32_ptr, out32_ptr,
    scale, NC, T, N, D, H1, H2, HL, HT, T_BUCKET,
    JAGGED: tl.constexpr, CANDIDATES: tl.constexpr, NUM_LAYERS: tl.constexpr, ACT: tl.constexpr,
    SOFTMAX: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    BLOCK_HL: tl.constexpr,
):
    """One sample per program: ``out[b]`` [D] and the weights ``w`` of its rows; with softmax also their float32
    copies ``out32[b]`` and ``w32`` (whose rows hold the raw logits until the sample's log-sum-exp is known)."""
    b = tl.program_id(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    start, ostart, L = _rows_of(b, len_ptr, off_ptr, cand_ptr, NC, T, N, JAGGED, CANDIDATES)
    d = tl.arange(0, BLOCK_D)
    j1 = tl.arange(0, BLOCK_H1)
    j2 = tl.arange(0, BLOCK_H2)
    jl = tl.arange(0, BLOCK_HL)
    q = _load_vec(q_ptr + b * D, d, D)
    Mt_hi, Mt_lo = _sample_matrix_t(A_ptr, wp_ptr, q, j1, d, H1, D, PREC)
    c = _load_vec(c_ptr + b * H1, j1, H1)
    alpha1, mu1, r1 = _load_activation_params(act_pack_ptr, HT, 0, j1, H1)
    W2t_hi, W2t_lo = Mt_hi, Mt_lo  # placeholders for one hidden layer (never read)
    b2 = c
    alpha2, mu2, r2 = alpha1, mu1, r1
    if NUM_LAYERS == 2:
        W2t_hi, W2t_lo = _split(_load_mat_t(w2_ptr, j2, j1, H2, H1), PREC)
        b2 = _load_vec(b2_ptr, j2, H2)
        alpha2, mu2, r2 = _load_activation_params(act_pack_ptr, HT, H1, j2, H2)
    w_last = _load_vec(w_last_ptr, jl, HL)
    b_last = tl.load(b_last_ptr).to(tl.float32)

    zero_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    l_i = tl.sum(zero_t, 0)
    m_i = l_i - float("inf")
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < L
        if CANDIDATES:  # the user's keys; the candidate's rows of w and w32
            K = _load_keys(k_ptr, start + t, valid, d, D)
            rows = ostart + t
        else:
            rows = start + t
            K = _load_keys(k_ptr, rows, valid, d, D)
        z1, h1, z2, h2 = _hidden_layers_fwd(K, Mt_hi, Mt_lo, c, W2t_hi, W2t_lo, b2, alpha1, mu1, r1, alpha2, mu2, r2,
                                            NUM_LAYERS, ACT, PREC, INTERP)
        s = tl.sum(h2 * w_last[None, :], 1) + b_last
        if SOFTMAX:
            x = tl.where(valid, scale * s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 0))  # finite: every tile holds a valid row
            rescale = tl.exp(m_i - m_new)
            p = tl.where(valid, tl.exp(x - m_new), 0.0)
            l_i = l_i * rescale + tl.sum(p, 0)
            acc = acc * rescale + tl.sum(p[:, None] * K, 0)
            m_i = m_new
            tl.store(w32_ptr + rows, x, mask=valid)
        else:
            wv = tl.where(valid, s, 0.0)
            acc += tl.sum(wv[:, None] * K, 0)
            tl.store(w_ptr + rows, wv, mask=valid)
    if SOFTMAX:
        nonempty = l_i > 0
        out = acc * tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)
        lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), 0.0)
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < L
            rows = ostart + t
            x = tl.load(w32_ptr + rows, mask=valid, other=0.0)
            wv = tl.exp(x - lse)
            tl.store(w32_ptr + rows, wv, mask=valid)
            tl.store(w_ptr + rows, wv, mask=valid)
        tl.store(out32_ptr + b * D + d, out, mask=d < D)
    else:
        out = acc
    tl.store(out_ptr + b * D + d, out, mask=d < D)
    if not JAGGED:  # the padding of w is zero
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            pad = (t >= L) & (t < T)
            tl.store(w_ptr + b * T + t, zero_t, mask=pad)
            if SOFTMAX:
                tl.store(w32_ptr + b * T + t, zero_t, mask=pad)


@triton.autotune(configs=_autotune_configs(_BWD_TILES), key=_AUTOTUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _target_attention_bwd_kernel(
    q_ptr, k_ptr, len_ptr, off_ptr, cand_ptr, c_ptr, A_ptr, wp_ptr, w2_ptr, b2_ptr, w_last_ptr, b_last_ptr,
    act_pack_ptr, dice_sums_ptr,
    grad_out_ptr, grad_scores_ptr, out32_ptr, w32_ptr,
    dk_ptr, dq_ptr, dc_ptr, dA_ptr, dWp_ptr, dW2_ptr, db2_ptr, dw_last_ptr, db_last_ptr, dact_ptr, dice_partials_ptr,
    B, scale, T, N, D, H1, H2, HL, HT, T_BUCKET,
    JAGGED: tl.constexpr, CANDIDATES: tl.constexpr, NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, SOFTMAX: tl.constexpr,
    DICE_TRAIN: tl.constexpr, MODE: tl.constexpr, SPLIT_DQ: tl.constexpr, HAS_GO: tl.constexpr, HAS_GS: tl.constexpr,
    PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
    BLOCK_HL: tl.constexpr, BLOCK_HG: tl.constexpr,
):
    """Program ``p`` of ``P`` handles samples ``p, p + P, ...``.

    ``MODE_GRADS``: ``dk`` rows, ``dq`` [B, D] (without ``dc @ (Wq + Wd)``), ``dc`` [B, H1], and this program's
    partials of ``d(Wk - Wd)``, ``dWp`` [H1, D], ``dW2`` [H2, H1], ``db2`` [H2], ``dw_last`` [HL], ``db_last`` [],
    ``d act`` [HT]. With ``SPLIT_DQ``, ``MODE_GRADS`` leaves out ``dq`` and ``MODE_DQ_ONLY`` computes only ``dq``
    (two launches, so that each holds fewer loop-invariant operands in shared memory; see ``_smem_estimate``).
    ``MODE_DICE_SUMS_TOP`` / ``MODE_DICE_SUMS_LAYER1``: only this program's partial Dice sums ``(sum g, sum g u)``
    [2, H] of the top hidden layer / layer 1, into ``dice_partials`` [P, 2, H]. ``dice_sums`` [2, HT] holds the sums
    that earlier launches found (zero where not yet known, and without Dice training).
    """
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    d = tl.arange(0, BLOCK_D)
    j1 = tl.arange(0, BLOCK_H1)
    j2 = tl.arange(0, BLOCK_H2)
    jl = tl.arange(0, BLOCK_HL)
    WANT_DQ: tl.constexpr = MODE == MODE_DQ_ONLY or (MODE == MODE_GRADS and not SPLIT_DQ)
    DICE_SUMS: tl.constexpr = MODE == MODE_DICE_SUMS_TOP or MODE == MODE_DICE_SUMS_LAYER1
    # layer 1's activation backward: in every launch but the top layer's Dice sums with two hidden layers (and
    # MODE_DICE_SUMS_LAYER1 with one, which is never launched)
    LAYER1_BWD: tl.constexpr = (MODE == MODE_GRADS or MODE == MODE_DQ_ONLY or (MODE == MODE_DICE_SUMS_LAYER1 and
                                NUM_LAYERS == 2) or (MODE == MODE_DICE_SUMS_TOP and NUM_LAYERS == 1))
    if WANT_DQ:
        Wp_hi, Wp_lo = _split(_load_mat(wp_ptr, j1, d, H1, D), PREC)
    else:
        Wp_hi = tl.zeros([BLOCK_H1, BLOCK_D], dtype=tl.float32)  # placeholders (never read)
        Wp_lo = Wp_hi
    alpha1, mu1, r1 = _load_activation_params(act_pack_ptr, HT, 0, j1, H1)
    inv_n = tl.load(act_pack_ptr + 3 * HT)
    sum_g1 = tl.load(dice_sums_ptr + j1, mask=j1 < H1, other=0.0)
    sum_gu1 = tl.load(dice_sums_ptr + HT + j1, mask=j1 < H1, other=0.0)
    W2_hi, W2_lo = Wp_hi, Wp_lo  # placeholders for one hidden layer (never read)
    W2t_hi, W2t_lo = Wp_hi, Wp_lo
    b2 = alpha1
    alpha2, mu2, r2, sum_g2, sum_gu2 = alpha1, mu1, r1, sum_g1, sum_gu1
    if NUM_LAYERS == 2:
        W2_hi, W2_lo = _split(_load_mat(w2_ptr, j2, j1, H2, H1), PREC)
        W2t_hi, W2t_lo = _split(_load_mat_t(w2_ptr, j2, j1, H2, H1), PREC)
        b2 = _load_vec(b2_ptr, j2, H2)
        alpha2, mu2, r2 = _load_activation_params(act_pack_ptr, HT, H1, j2, H2)
        sum_g2 = tl.load(dice_sums_ptr + H1 + j2, mask=j2 < H2, other=0.0)
        sum_gu2 = tl.load(dice_sums_ptr + HT + H1 + j2, mask=j2 < H2, other=0.0)
    w_last = _load_vec(w_last_ptr, jl, HL)
    b_last = tl.load(b_last_ptr).to(tl.float32)

    zero_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_H1, BLOCK_D], dtype=tl.float32)
    dWp_acc = tl.zeros([BLOCK_H1, BLOCK_D], dtype=tl.float32)
    dW2_acc = tl.zeros([BLOCK_H2, BLOCK_H1], dtype=tl.float32)
    db2_acc = tl.zeros([BLOCK_H2], dtype=tl.float32)
    dw_last_acc = tl.zeros([BLOCK_HL], dtype=tl.float32)
    db_last_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    da1_acc = tl.zeros([BLOCK_H1], dtype=tl.float32)
    da2_acc = tl.zeros([BLOCK_H2], dtype=tl.float32)
    sum_g_acc = tl.zeros([BLOCK_HG], dtype=tl.float32)
    sum_gu_acc = tl.zeros([BLOCK_HG], dtype=tl.float32)
    for b in range(pid, B, n_prog):
        # key rows start + t; rows of w32, grad_scores and dk: ostart + t (with CANDIDATES, dk is the candidates'
        # own buffer, summed per user by the launcher)
        start, ostart, L = _rows_of(b, len_ptr, off_ptr, cand_ptr, B, T, N, JAGGED, CANDIDATES)
        q = _load_vec(q_ptr + b * D, d, D)
        # M_b^T (layer 1) and, for dK, M_b: read per sample from global memory (L2) in both orientations rather
        # than transposed on chip
        Mt_hi, Mt_lo = _sample_matrix_t(A_ptr, wp_ptr, q, j1, d, H1, D, PREC)
        if MODE == MODE_GRADS:
            M_hi, M_lo = _split(_load_mat(A_ptr, j1, d, H1, D) + _load_mat(wp_ptr, j1, d, H1, D) * q[None, :], PREC)
        else:
            M_hi = Wp_hi  # placeholders (never read)
            M_lo = Wp_lo
        c = _load_vec(c_ptr + b * H1, j1, H1)
        go = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_GO:
            go = _load_vec(grad_out_ptr + b * D, d, D)
        delta = tl.sum(zero_t, 0)
        if SOFTMAX:
            if HAS_GO:
                delta += tl.sum(go * _load_vec(out32_ptr + b * D, d, D), 0)
            if HAS_GS:
                for t0 in range(0, L, BLOCK_T):
                    t = t0 + tl.arange(0, BLOCK_T)
                    valid = t < L
                    wv = tl.load(w32_ptr + ostart + t, mask=valid, other=0.0)
                    gv = tl.load(grad_scores_ptr + ostart + t, mask=valid, other=0.0).to(tl.float32)
                    delta += tl.sum(wv * gv, 0)
        dq_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dc_acc = tl.zeros([BLOCK_H1], dtype=tl.float32)
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < L
            if CANDIDATES:
                K = _load_keys(k_ptr, start + t, valid, d, D)
                rows = ostart + t
            else:
                rows = start + t
                K = _load_keys(k_ptr, rows, valid, d, D)
            z1, h1, z2, h2 = _hidden_layers_fwd(K, Mt_hi, Mt_lo, c, W2t_hi, W2t_lo, b2, alpha1, mu1, r1, alpha2, mu2,
                                                r2, NUM_LAYERS, ACT, PREC, INTERP)
            dw = zero_t
            if HAS_GS:
                dw += tl.load(grad_scores_ptr + rows, mask=valid, other=0.0).to(tl.float32)
            if HAS_GO:
                dw += tl.sum(K * go[None, :], 1)
            if SOFTMAX:
                w = tl.load(w32_ptr + rows, mask=valid, other=0.0)
                ds = scale * w * (dw - delta)
            else:
                w = tl.where(valid, tl.sum(h2 * w_last[None, :], 1) + b_last, 0.0)
                ds = dw
            ds = tl.where(valid, ds, 0.0)
            dh = ds[:, None] * w_last[None, :]
            if NUM_LAYERS == 2:
                dz2, da2, g2, u2 = _activation_bwd(dh, z2, alpha2, mu2, r2, sum_g2, sum_gu2, inv_n, valid, ACT,
                                                   DICE_TRAIN)
                if MODE == MODE_DICE_SUMS_TOP:
                    g2 = tl.where(valid[:, None], g2, 0.0)
                    sum_g_acc += tl.sum(g2, 0)
                    sum_gu_acc += tl.sum(g2 * u2, 0)
                else:
                    dz2 = tl.where(valid[:, None], dz2, 0.0)
                    dh1 = _dot_f32_split(dz2, W2_hi, W2_lo, PREC, INTERP)
                    if MODE == MODE_GRADS:
                        dW2_acc += _dot_f32(tl.trans(dz2), h1, PREC, INTERP)
                        db2_acc += tl.sum(dz2, 0)
                        da2_acc += tl.sum(tl.where(valid[:, None], da2, 0.0), 0)
            else:
                dh1 = dh
            if LAYER1_BWD:
                G, da1, g1, u1 = _activation_bwd(dh1, z1, alpha1, mu1, r1, sum_g1, sum_gu1, inv_n, valid, ACT,
                                                 DICE_TRAIN)
                if DICE_SUMS:
                    g1 = tl.where(valid[:, None], g1, 0.0)
                    sum_g_acc += tl.sum(g1, 0)
                    sum_gu_acc += tl.sum(g1 * u1, 0)
                else:  # MODE_GRADS or MODE_DQ_ONLY
                    G = tl.where(valid[:, None], G, 0.0)
                    G_hi, G_lo = _split(G, PREC)
                    if WANT_DQ:
                        dq_acc += tl.sum(K * _dot_split(G_hi, G_lo, Wp_hi, Wp_lo, PREC, INTERP), 0)
                    if MODE == MODE_GRADS:
                        da1_acc += tl.sum(tl.where(valid[:, None], da1, 0.0), 0)
                        dw_last_acc += tl.sum(ds[:, None] * h2, 0)
                        db_last_acc += ds
                        dK = _dot_split(G_hi, G_lo, M_hi, M_lo, PREC, INTERP)
                        if HAS_GO:
                            dK += w[:, None] * go[None, :]
                        tl.store(dk_ptr + rows[:, None] * D + d[None, :], dK,
                                 mask=valid[:, None] & (d[None, :] < D))
                        K_hi, K_lo = _split(K, PREC)
                        dA_acc += _dot_split(tl.trans(G_hi), tl.trans(G_lo), K_hi, K_lo, PREC, INTERP)
                        Kq_hi, Kq_lo = _split(K * q[None, :], PREC)
                        dWp_acc += _dot_split(tl.trans(G_hi), tl.trans(G_lo), Kq_hi, Kq_lo, PREC, INTERP)
                        dc_acc += tl.sum(G, 0)
        if WANT_DQ:
            tl.store(dq_ptr + b * D + d, dq_acc, mask=d < D)
        if MODE == MODE_GRADS:
            tl.store(dc_ptr + b * H1 + j1, dc_acc, mask=j1 < H1)
            if not JAGGED:  # the padding rows of dk are zero
                zero_d = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
                for t0 in range(0, T, BLOCK_T):
                    t = t0 + tl.arange(0, BLOCK_T)
                    msk = ((t >= L) & (t < T))[:, None] & (d[None, :] < D)
                    tl.store(dk_ptr + (b * T + t)[:, None] * D + d[None, :], zero_d, mask=msk)
    if MODE == MODE_GRADS:
        m1 = (j1[:, None] < H1) & (d[None, :] < D)
        tl.store(dA_ptr + pid * H1 * D + j1[:, None] * D + d[None, :], dA_acc, mask=m1)
        tl.store(dWp_ptr + pid * H1 * D + j1[:, None] * D + d[None, :], dWp_acc, mask=m1)
        tl.store(dw_last_ptr + pid * HL + jl, dw_last_acc, mask=jl < HL)
        tl.store(db_last_ptr + pid, tl.sum(db_last_acc, 0))
        tl.store(dact_ptr + pid * HT + j1, da1_acc, mask=j1 < H1)
        if NUM_LAYERS == 2:
            m2 = (j2[:, None] < H2) & (j1[None, :] < H1)
            tl.store(dW2_ptr + pid * H2 * H1 + j2[:, None] * H1 + j1[None, :], dW2_acc, mask=m2)
            tl.store(db2_ptr + pid * H2 + j2, db2_acc, mask=j2 < H2)
            tl.store(dact_ptr + pid * HT + H1 + j2, da2_acc, mask=j2 < H2)
    elif DICE_SUMS:
        if MODE == MODE_DICE_SUMS_TOP and NUM_LAYERS == 2:
            HG = H2
        else:
            HG = H1
        jg = tl.arange(0, BLOCK_HG)
        tl.store(dice_partials_ptr + pid * 2 * HG + jg, sum_g_acc, mask=jg < HG)
        tl.store(dice_partials_ptr + pid * 2 * HG + HG + jg, sum_gu_acc, mask=jg < HG)

