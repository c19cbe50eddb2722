"""Target attention (SPEC section 1) in Triton: the fused forward and backward kernels and their launchers.

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

Dice in training needs the mean and variance of every hidden layer over all valid behaviours of the batch before any
output: ``_target_attention_stats_kernel`` (one program per sample) computes layer 1's per-sample count, mean and sum
of squared deviations (Chan's parallel update across tiles), the launcher merges the samples (Chan again, a few
``[B, H]`` torch ops, deterministic); with two hidden layers a second stats pass, which applies layer 1's Dice with the
batch statistics just found, does the same for layer 2. The fused pass follows.

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

Dice training in the backward: ``dx`` of a Dice layer needs the batch sums ``sum g`` and ``sum g * u`` of its channels
(see :mod:`din_kernels.torch_impl.dice`), and layer 1's ``g`` depends on layer 2's ``dx``. The same kernel therefore
runs first in ``MODE = 1`` (sums of the top hidden layer), with two layers again in ``MODE = 2`` (sums of layer 1, given
layer 2's), then in ``MODE = 0`` (everything); the sums are per-program partials reduced like the weight gradients.

Cost per call, with ``Nv = sum_b L_b`` valid behaviours, ``R`` the rows of ``w`` (``B T`` padded, ``Nv`` jagged), ``s``
the bytes of the input dtype and ``P`` the backward programs (a multiply-add counts as 2 FLOPs; the O(H) elementwise
work per behaviour is left out; weights, read once per program, stay in L2):

- forward FLOPs ``Nv (2 D H1 + 2 H1 H2 + 2 Hn + 2 D) + 4 B D H1``;
  bytes ``s (Nv D + 2 B D + R) + 8 B H1``, plus ``12 Nv + 4 B D`` with softmax (``w32`` and ``out32``);
- backward FLOPs ``Nv (10 D H1 + 6 H1 H2 + 6 Hn + 7 D) + 6 B D H1``;
  bytes ``s (Nv D + R D + 2 B D + R) + 8 B (D + 2 H1) + 8 P (2 D H1 + H1 H2)``, plus ``8 Nv + 4 B D`` with softmax;
- Dice in training adds a pass over the keys per hidden layer, forward and backward alike: ``s Nv D`` bytes each and
  ``Nv (2 D H1)`` FLOPs for layer 1's (``+ 2 H1 H2`` for the second layer's, ``+ 4 H1 H2`` for the backward's).

For B = 1024, T = 200 (all valid), D = 128, H = (80, 40), bf16: forward 5.6 GFLOP and 54 MB, backward 25 GFLOP and
133 MB (P = 132): at an H200's ~4.8 TB/s and ~990 dense bf16 TFLOP/s that is 11 us of memory against 6 us of
arithmetic forward, 28 us against 25 us backward (padding H1 = 80 to a 128 block costs another 1.6x on the first
layer). float32 inputs cost four products per ``tl.dot`` (and with ``SPLIT_DQ`` a second recompute in the backward).

Precision and shared memory. Every ``tl.dot`` multiplies 16-bit operands on the tensor cores with float32
accumulation: bfloat16 operands for bfloat16 inputs and float16 ones for float16 inputs (``PREC`` "bf16" / "fp16"),
and for float32 inputs the four bfloat16 products of the operands split as ``x = hi + lo`` (``PREC`` "bf16x4", ``hi*hi
+ (hi*lo + lo*hi + lo*lo)``; the split keeps about 17 significant bits of each operand, the products are exact and
summed in float32: results within 1.6x of the float32 tolerance of the tests, where three products (no ``lo*lo``)
reached 1.9x; TF32's three-pass scheme was float32-grade but did not fit in shared memory, below). The loop-invariant
operands (``M_b^T``, ``M_b``, ``Wp``, ``W2``, ``W2^T``) stay in shared memory for the whole key loop, each read from
global memory in the orientation its product needs (a transpose on chip would cost a staging buffer); 16-bit operands
halve what float32/TF32 ones took, which did not fit an H200's 227 KB per block in the backward at D = 128. The model
``_smem_estimate`` (fitted to ``benchmarks/compile_check.py`` on sm_90) prunes the autotune configs, splits ``dq`` off
the backward into its own launch when one launch would not fit (``SPLIT_DQ``: float32 at D = 128, bfloat16 at D =
256), and makes ``check_supported`` refuse, naming the sizes, what no launch fits (e.g. float32 at D = 256, or
256-wide hidden layers). Loads are not software-pipelined (``num_stages=1``: the key tiles are small next to the
operands). ``python benchmarks/compile_check.py`` reports, per compiled kernel, registers, spills and shared memory;
the backward at D = 128 spills about 1 KB a thread (its ``[H1, D]`` accumulators live in registers).

Hidden layers: one or two (the launcher raises ``ValueError`` for more: use the ``torch`` backend); ``D`` and every
width up to 256 (blocks are padded to powers of two >= 16 and masked) within the shared memory of the GPU (above).
Computation is in float32; the outputs are stored in the input dtypes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from .. import _alloc
from ..backend import triton_interpret

ACTIVATION_CODES = {"sigmoid": 0, "relu": 1, "prelu": 2, "dice": 3}
MAX_WIDTH = 256
MAX_HIDDEN_LAYERS = 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _configs(gpu: tuple[tuple[int, int], ...]) -> list[triton.Config]:
    """``(BLOCK_T, num_warps)`` pairs on a GPU, without software pipelining (chosen by ptxas' register and spill
    report for D = 128, H = (80, 40) on sm_90; each backward config takes seconds to compile, so the list is short);
    one config under the interpreter, which cannot benchmark several."""
    if triton_interpret():
        return [triton.Config({"BLOCK_T": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=1) for bt, w in gpu]


_FWD_CONFIGS = ((16, 4), (16, 8), (32, 8))  # spill-free forward tiles
_BWD_CONFIGS = ((16, 8), (16, 16), (32, 16))  # the backward keeps [H1, D] accumulators in registers: wide CTAs


# Shared memory. On a GPU the loop-invariant ``tl.dot`` operands (``M_b^T`` [BD, BH1], ``M_b``, ``Wp``, ``W2``,
# ``W2^T`` as needed by the kernel) live in shared memory for the whole key loop, as 16-bit values (twice, high and
# low parts, with ``PREC == "bf16x4"``), next to the per-tile operands. ``_smem_estimate`` is the model of what Triton
# allocates, fitted to the reports of ``benchmarks/compile_check.py`` for sm_90 (never below them, at most about a
# third above; tests/test_compile_sm90.py holds it to that). It decides the configs that are tried (``_prune``),
# whether the backward computes ``dq`` in a second launch (``SPLIT_DQ``: one operand fewer each), and which sizes
# the backend supports (``check_supported``).
SM90_SMEM_PER_BLOCK = 232448  # bytes of shared memory one block may use on H100/H200 (sm_90)


def _smem_estimate(kind: str, prec: str, layers: int, BD: int, BH1: int, BH2: int, BT: int, mode: int = 0,
                   split_dq: bool = False, layer: int = 1) -> int:
    """Bytes of shared memory of one program of ``kind`` ("fwd", "stats" or "bwd" with its ``mode``)."""
    dh = BD * BH1
    hh = BH1 * BH2 if layers == 2 else 0
    if kind == "fwd":
        inv = dh + hh
    elif kind == "stats":
        inv = dh + (hh if layer == 2 else 0)
    elif mode == 0:
        inv = 2 * dh + 2 * hh + (0 if split_dq else dh)
    elif mode == 3:
        inv = 2 * dh + 2 * hh
    elif mode == 1:
        inv = dh + hh
    else:
        inv = dh + 2 * hh
    tiles = BT * (BD + BH1 + (0 if kind == "stats" and layer == 1 else BH2)) * (1.25 if kind == "bwd" else 1.0)
    parts = 2 if prec == "bf16x4" else 1
    return int(parts * 2 * (inv + tiles)) + 4096


def _smem_limit(device: torch.device | None = None) -> int:
    """Shared memory per block of ``device`` (the current CUDA device when None); the sm_90 value without CUDA (the
    target of ``benchmarks/compile_check.py``)."""
    if device is not None and device.type != "cuda" or not torch.cuda.is_available():
        return SM90_SMEM_PER_BLOCK
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _cuda_smem_limit(index)


@functools.cache
def _cuda_smem_limit(index: int) -> int:  # checked on every call of the backend: looked up once per device
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", SM90_SMEM_PER_BLOCK))


def _config_smem(c, kwargs) -> int:
    kind = "bwd" if "MODE" in kwargs else "stats" if "LAYER" in kwargs else "fwd"
    return _smem_estimate(kind, kwargs["PREC"], kwargs.get("NUM_LAYERS", 2), kwargs["BLOCK_D"], kwargs["BLOCK_H1"],
                          kwargs["BLOCK_H2"], c.kwargs["BLOCK_T"], kwargs.get("MODE", 0),
                          kwargs.get("SPLIT_DQ", False), kwargs.get("LAYER", 1))


def _prune(configs, named_args, **kwargs):
    """Drop tiles longer than the (bucketed) sequence length and configs whose shared memory (estimated) exceeds
    the device's. Keeps at least the first config (16-row tiles: ``check_supported`` ensures that it fits)."""
    bucket = named_args.get("T_BUCKET", kwargs.get("T_BUCKET", 16))
    limit = _smem_limit()
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, bucket) and _config_smem(c, kwargs) <= limit]
    return kept or configs[:1]


# autotune keys (besides the dtypes of the tensor arguments): the shapes and every constexpr that changes what a
# kernel holds on chip
_KEY = ["T_BUCKET", "BLOCK_D", "BLOCK_H1", "BLOCK_H2", "NUM_LAYERS", "LAYER", "MODE", "SPLIT_DQ", "ACT", "SOFTMAX"]


# ----------------------------------------------------------------------------------------------------- jit helpers


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
def _act_fwd(z, a, mu, r, ACT: tl.constexpr):
    """Activation of ``z`` [BT, BH]; ``a`` (PReLU weight / Dice alpha), ``mu``, ``r = 1/sqrt(var + eps)`` [BH]."""
    if ACT == 0:
        h = tl.sigmoid(z)
    elif ACT == 1:
        h = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        h = tl.where(z >= 0, z, a[None, :] * z)
    else:
        p = tl.sigmoid((z - mu[None, :]) * r[None, :])
        h = z * (a[None, :] + (1.0 - a[None, :]) * p)
    return h


@triton.jit
def _act_bwd(dh, z, a, mu, r, sg, sgu, inv_n, valid, ACT: tl.constexpr, DICE_TRAIN: tl.constexpr):
    """``(dz, d a per element, g, u)`` for one hidden layer; ``dh``, ``z`` [BT, BH], ``valid`` [BT].

    Dice: ``g = dh z (1 - a) p (1 - p)`` and ``u = (z - mu) r``; in training ``dz`` includes the term through the
    batch statistics, ``-r / Nv (sum g + u sum g u)``, from the batch sums ``sg``, ``sgu`` [BH] (``inv_n = 1 / Nv``).
    """
    zero = tl.zeros_like(dh)
    if ACT == 0:
        h = tl.sigmoid(z)
        dz = dh * h * (1.0 - h)
        da = zero
        g = zero
        u = zero
    elif ACT == 1:
        dz = tl.where(z > 0, dh, 0.0)
        da = zero
        g = zero
        u = zero
    elif ACT == 2:
        pos = z >= 0
        dz = tl.where(pos, dh, a[None, :] * dh)
        da = tl.where(pos, 0.0, dh * z)
        g = zero
        u = zero
    else:
        u = (z - mu[None, :]) * r[None, :]
        p = tl.sigmoid(u)
        om = 1.0 - a[None, :]
        g = dh * z * om * p * (1.0 - p)
        dz = dh * (a[None, :] + om * p) + r[None, :] * g
        if DICE_TRAIN:
            corr = -(r * inv_n)[None, :] * (sg[None, :] + u * sgu[None, :])
            dz += tl.where(valid[:, None], corr, 0.0)
        da = dh * z * (1.0 - p)
    return dz, da, g, u


@triton.jit
def _mm16(a, b, INTERP: tl.constexpr):
    """``a @ b`` of 16-bit operands with float32 accumulation (the interpreter multiplies their float32 values:
    its own 16-bit products are not exact)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _hi(x, PREC: tl.constexpr):
    """The 16-bit operand of float32 ``x``: float16 for ``PREC == "fp16"``, else bfloat16."""
    if PREC == "fp16":
        return x.to(tl.float16)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _lo(x, x_hi, PREC: tl.constexpr):
    """The bfloat16 remainder ``x - x_hi`` (``PREC == "bf16x4"``), else ``x_hi`` itself (never used)."""
    if PREC == "bf16x4":
        return (x - x_hi.to(tl.float32)).to(tl.bfloat16)
    else:
        return x_hi


@triton.jit
def _mm(a_hi, a_lo, b_hi, b_lo, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``a @ b`` in float32 from split operands: one 16-bit product, or with ``PREC == "bf16x4"`` the four bfloat16
    products ``a_hi b_hi + (a_hi b_lo + a_lo b_hi + a_lo b_lo)`` (float32-grade results)."""
    if PREC == "bf16x4":
        small = _mm16(a_hi, b_lo, INTERP) + _mm16(a_lo, b_hi, INTERP) + _mm16(a_lo, b_lo, INTERP)
        return _mm16(a_hi, b_hi, INTERP) + small
    else:
        return _mm16(a_hi, b_hi, INTERP)


@triton.jit
def _mmf(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``a @ b`` of float32 tile operands (split here)."""
    a_hi = _hi(a, PREC)
    b_hi = _hi(b, PREC)
    return _mm(a_hi, _lo(a, a_hi, PREC), b_hi, _lo(b, b_hi, PREC), PREC, INTERP)


@triton.jit
def _mmf_b(a, b_hi, b_lo, PREC: tl.constexpr, INTERP: tl.constexpr):
    """``a @ b`` of a float32 tile ``a`` (split here) and a split loop-invariant ``b``."""
    a_hi = _hi(a, PREC)
    return _mm(a_hi, _lo(a, a_hi, PREC), b_hi, b_lo, PREC, INTERP)


@triton.jit
def _load_vec(ptr, idx, n):
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
def _load_acts(act_ptr, HT, col0, idx, n):
    """Alpha, mean, ``r`` [BH] of one hidden layer from the ``[4, HT]`` activation pack (columns from ``col0``)."""
    m = idx < n
    a = tl.load(act_ptr + col0 + idx, mask=m, other=0.0)
    mu = tl.load(act_ptr + HT + col0 + idx, mask=m, other=0.0)
    r = tl.load(act_ptr + 2 * HT + col0 + idx, mask=m, other=0.0)
    return a, mu, r


@triton.jit
def _tile_fwd(K, Mt_hi, Mt_lo, c, W2t_hi, W2t_lo, b2, a1, mu1, r1, a2, mu2, r2, NUM_LAYERS: tl.constexpr,
              ACT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """The hidden layers on a tile ``K`` [BT, BD], with ``M^T`` [BD, BH1] and ``W2^T`` [BH1, BH2] as split operands
    (see :func:`_mm`): ``(z1, h1, z2, h2)`` (``z2, h2 = z1, h1`` with one layer)."""
    z1 = _mmf_b(K, Mt_hi, Mt_lo, PREC, INTERP) + c[None, :]
    h1 = _act_fwd(z1, a1, mu1, r1, ACT)
    if NUM_LAYERS == 2:
        z2 = _mmf_b(h1, W2t_hi, W2t_lo, PREC, INTERP) + b2[None, :]
        h2 = _act_fwd(z2, a2, mu2, r2, ACT)
    else:
        z2 = z1
        h2 = h1
    return z1, h1, z2, h2


@triton.jit
def _load_keys(k_ptr, rows, valid, d, D):
    msk = valid[:, None] & (d[None, :] < D)
    return tl.load(k_ptr + rows[:, None] * D + d[None, :], mask=msk, other=0.0).to(tl.float32)


# --------------------------------------------------------------------------------------------------------- kernels


@triton.autotune(configs=_configs(_FWD_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _target_attention_stats_kernel(
    q_ptr, k_ptr, len_ptr, off_ptr, c_ptr, a_ptr, wp_ptr, w2_ptr, b2_ptr, act_ptr,
    cnt_ptr, mean_ptr, m2_ptr,
    T, N, D, H1, H2, HT, T_BUCKET,
    JAGGED: tl.constexpr, LAYER: tl.constexpr, ACT: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    BLOCK_HS: tl.constexpr,
):
    """Per-sample count [B], mean and sum of squared deviations [B, H] of hidden layer ``LAYER``'s pre-activations
    over the sample's behaviours (Dice training statistics, merged over samples by the launcher)."""
    b = tl.program_id(0).to(tl.int64)
    start, L = _sample_range(b, len_ptr, off_ptr, T, N, JAGGED)
    d = tl.arange(0, BLOCK_D)
    j1 = tl.arange(0, BLOCK_H1)
    j2 = tl.arange(0, BLOCK_H2)
    q = _load_vec(q_ptr + b * D, d, D)
    Mt = _load_mat_t(a_ptr, j1, d, H1, D) + _load_mat_t(wp_ptr, j1, d, H1, D) * q[:, None]
    Mt_hi = _hi(Mt, PREC)
    Mt_lo = _lo(Mt, Mt_hi, PREC)
    c = _load_vec(c_ptr + b * H1, j1, H1)
    a1, mu1, r1 = _load_acts(act_ptr, HT, 0, j1, H1)
    if LAYER == 2:
        W2t = _load_mat_t(w2_ptr, j2, j1, H2, H1)
        W2t_hi = _hi(W2t, PREC)
        W2t_lo = _lo(W2t, W2t_hi, PREC)
        b2 = _load_vec(b2_ptr, j2, H2)
    zero_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    n = tl.sum(zero_t, 0)
    mean = tl.zeros([BLOCK_HS], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_HS], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < L
        K = _load_keys(k_ptr, start + t, valid, d, D)
        z = _mmf_b(K, Mt_hi, Mt_lo, PREC, INTERP) + c[None, :]
        if LAYER == 2:
            h1 = _act_fwd(z, a1, mu1, r1, ACT)
            z = _mmf_b(h1, W2t_hi, W2t_lo, PREC, INTERP) + b2[None, :]
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


@triton.autotune(configs=_configs(_FWD_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _target_attention_fwd_kernel(
    q_ptr, k_ptr, len_ptr, off_ptr, c_ptr, a_ptr, wp_ptr, w2_ptr, b2_ptr, wl_ptr, bl_ptr, act_ptr,
    out_ptr, w_ptr, w32_ptr, out32_ptr,
    scale, T, N, D, H1, H2, HL, HT, T_BUCKET,
    JAGGED: tl.constexpr, NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr, BLOCK_H2: tl.constexpr,
    BLOCK_HL: tl.constexpr,
):
    """One sample per program: ``out[b]`` [D] and the weights ``w`` of its rows; with softmax also their float32
    copies ``out32[b]`` and ``w32`` (whose rows hold the raw logits until the sample's log-sum-exp is known)."""
    b = tl.program_id(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    start, L = _sample_range(b, len_ptr, off_ptr, T, N, JAGGED)
    d = tl.arange(0, BLOCK_D)
    j1 = tl.arange(0, BLOCK_H1)
    j2 = tl.arange(0, BLOCK_H2)
    jl = tl.arange(0, BLOCK_HL)
    q = _load_vec(q_ptr + b * D, d, D)
    Mt = _load_mat_t(a_ptr, j1, d, H1, D) + _load_mat_t(wp_ptr, j1, d, H1, D) * q[:, None]
    Mt_hi = _hi(Mt, PREC)
    Mt_lo = _lo(Mt, Mt_hi, PREC)
    c = _load_vec(c_ptr + b * H1, j1, H1)
    a1, mu1, r1 = _load_acts(act_ptr, HT, 0, j1, H1)
    W2t_hi, W2t_lo = Mt_hi, Mt_lo  # placeholders for one hidden layer (never read)
    b2 = c
    a2, mu2, r2 = a1, mu1, r1
    if NUM_LAYERS == 2:
        W2t = _load_mat_t(w2_ptr, j2, j1, H2, H1)
        W2t_hi = _hi(W2t, PREC)
        W2t_lo = _lo(W2t, W2t_hi, PREC)
        b2 = _load_vec(b2_ptr, j2, H2)
        a2, mu2, r2 = _load_acts(act_ptr, HT, H1, j2, H2)
    wl = _load_vec(wl_ptr, jl, HL)
    bl = tl.load(bl_ptr).to(tl.float32)

    zero_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    l_i = tl.sum(zero_t, 0)
    m_i = l_i - float("inf")
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < L
        rows = start + t
        K = _load_keys(k_ptr, rows, valid, d, D)
        z1, h1, z2, h2 = _tile_fwd(K, Mt_hi, Mt_lo, c, W2t_hi, W2t_lo, b2, a1, mu1, r1, a2, mu2, r2, NUM_LAYERS,
                                   ACT, PREC, INTERP)
        s = tl.sum(h2 * wl[None, :], 1) + bl
        if SOFTMAX:
            x = tl.where(valid, scale * s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 0))  # finite: every tile holds a valid row
            alpha = tl.exp(m_i - m_new)
            p = tl.where(valid, tl.exp(x - m_new), 0.0)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * K, 0)
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
            rows = start + t
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


@triton.autotune(configs=_configs(_BWD_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _target_attention_bwd_kernel(
    q_ptr, k_ptr, len_ptr, off_ptr, c_ptr, a_ptr, wp_ptr, w2_ptr, b2_ptr, wl_ptr, bl_ptr, act_ptr, dsum_ptr,
    go_ptr, gs_ptr, out32_ptr, w32_ptr,
    dk_ptr, dq_ptr, dc_ptr, dA_ptr, dWp_ptr, dW2_ptr, db2_ptr, dwl_ptr, dbl_ptr, dact_ptr, gsum_ptr,
    B, scale, T, N, D, H1, H2, HL, HT, T_BUCKET,
    JAGGED: tl.constexpr, NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, SOFTMAX: tl.constexpr,
    DICE_TRAIN: tl.constexpr, MODE: tl.constexpr, SPLIT_DQ: tl.constexpr, HAS_GO: tl.constexpr, HAS_GS: tl.constexpr,
    PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H1: tl.constexpr,
    BLOCK_H2: tl.constexpr,
    BLOCK_HL: tl.constexpr, BLOCK_HG: tl.constexpr,
):
    """Program ``p`` of ``P`` handles samples ``p, p + P, ...``.

    MODE 0: ``dk`` rows, ``dq`` [B, D] (without ``dc @ (Wq + Wd)``), ``dc`` [B, H1], and this program's partials of
    ``d(Wk - Wd)``, ``dWp`` [H1, D], ``dW2`` [H2, H1], ``db2`` [H2], ``dw_last`` [HL], ``db_last`` [], ``d act`` [HT].
    With ``SPLIT_DQ``, MODE 0 leaves out ``dq`` and MODE 3 computes only ``dq`` (two launches, so that each holds
    fewer loop-invariant operands in shared memory; see ``_smem_estimate``).
    MODE 1 / 2: only this program's partial Dice sums ``(sum g, sum g u)`` [2, H] of the top hidden layer / layer 1.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)
    d = tl.arange(0, BLOCK_D)
    j1 = tl.arange(0, BLOCK_H1)
    j2 = tl.arange(0, BLOCK_H2)
    jl = tl.arange(0, BLOCK_HL)
    WANT_DQ: tl.constexpr = MODE == 3 or (MODE == 0 and not SPLIT_DQ)
    if WANT_DQ:
        Wp = _load_mat(wp_ptr, j1, d, H1, D)
        Wp_hi = _hi(Wp, PREC)
        Wp_lo = _lo(Wp, Wp_hi, PREC)
    else:
        Wp_hi = tl.zeros([BLOCK_H1, BLOCK_D], dtype=tl.float32)  # placeholders (never read)
        Wp_lo = Wp_hi
    a1, mu1, r1 = _load_acts(act_ptr, HT, 0, j1, H1)
    inv_n = tl.load(act_ptr + 3 * HT)
    sg1 = tl.load(dsum_ptr + j1, mask=j1 < H1, other=0.0)
    sgu1 = tl.load(dsum_ptr + HT + j1, mask=j1 < H1, other=0.0)
    W2_hi, W2_lo = Wp_hi, Wp_lo  # placeholders for one hidden layer (never read)
    W2t_hi, W2t_lo = Wp_hi, Wp_lo
    b2 = a1
    a2, mu2, r2, sg2, sgu2 = a1, mu1, r1, sg1, sgu1
    if NUM_LAYERS == 2:
        W2 = _load_mat(w2_ptr, j2, j1, H2, H1)
        W2_hi = _hi(W2, PREC)
        W2_lo = _lo(W2, W2_hi, PREC)
        W2t = _load_mat_t(w2_ptr, j2, j1, H2, H1)
        W2t_hi = _hi(W2t, PREC)
        W2t_lo = _lo(W2t, W2t_hi, PREC)
        b2 = _load_vec(b2_ptr, j2, H2)
        a2, mu2, r2 = _load_acts(act_ptr, HT, H1, j2, H2)
        sg2 = tl.load(dsum_ptr + H1 + j2, mask=j2 < H2, other=0.0)
        sgu2 = tl.load(dsum_ptr + HT + H1 + j2, mask=j2 < H2, other=0.0)
    wl = _load_vec(wl_ptr, jl, HL)
    bl = tl.load(bl_ptr).to(tl.float32)

    zero_t = tl.zeros([BLOCK_T], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_H1, BLOCK_D], dtype=tl.float32)
    dWp_acc = tl.zeros([BLOCK_H1, BLOCK_D], dtype=tl.float32)
    dW2_acc = tl.zeros([BLOCK_H2, BLOCK_H1], dtype=tl.float32)
    db2_acc = tl.zeros([BLOCK_H2], dtype=tl.float32)
    dwl_acc = tl.zeros([BLOCK_HL], dtype=tl.float32)
    dbl_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    da1_acc = tl.zeros([BLOCK_H1], dtype=tl.float32)
    da2_acc = tl.zeros([BLOCK_H2], dtype=tl.float32)
    sg_acc = tl.zeros([BLOCK_HG], dtype=tl.float32)
    sgu_acc = tl.zeros([BLOCK_HG], dtype=tl.float32)
    for b in range(pid, B, n_prog):
        start, L = _sample_range(b, len_ptr, off_ptr, T, N, JAGGED)
        q = _load_vec(q_ptr + b * D, d, D)
        # M_b^T (layer 1) and, for dK, M_b: read per sample from global memory (L2) in both orientations rather
        # than transposed on chip
        Mt = _load_mat_t(a_ptr, j1, d, H1, D) + _load_mat_t(wp_ptr, j1, d, H1, D) * q[:, None]
        Mt_hi = _hi(Mt, PREC)
        Mt_lo = _lo(Mt, Mt_hi, PREC)
        if MODE == 0:
            M = _load_mat(a_ptr, j1, d, H1, D) + _load_mat(wp_ptr, j1, d, H1, D) * q[None, :]
            M_hi = _hi(M, PREC)
            M_lo = _lo(M, M_hi, PREC)
        else:
            M_hi = Wp_hi  # placeholders (never read)
            M_lo = Wp_lo
        c = _load_vec(c_ptr + b * H1, j1, H1)
        go = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_GO:
            go = _load_vec(go_ptr + b * D, d, D)
        delta = tl.sum(zero_t, 0)
        if SOFTMAX:
            if HAS_GO:
                delta += tl.sum(go * _load_vec(out32_ptr + b * D, d, D), 0)
            if HAS_GS:
                for t0 in range(0, L, BLOCK_T):
                    t = t0 + tl.arange(0, BLOCK_T)
                    valid = t < L
                    wv = tl.load(w32_ptr + start + t, mask=valid, other=0.0)
                    gv = tl.load(gs_ptr + start + t, mask=valid, other=0.0).to(tl.float32)
                    delta += tl.sum(wv * gv, 0)
        dq_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        dc_acc = tl.zeros([BLOCK_H1], dtype=tl.float32)
        for t0 in range(0, L, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < L
            rows = start + t
            K = _load_keys(k_ptr, rows, valid, d, D)
            z1, h1, z2, h2 = _tile_fwd(K, Mt_hi, Mt_lo, c, W2t_hi, W2t_lo, b2, a1, mu1, r1, a2, mu2, r2, NUM_LAYERS,
                                   ACT, PREC, INTERP)
            dw = zero_t
            if HAS_GS:
                dw += tl.load(gs_ptr + rows, mask=valid, other=0.0).to(tl.float32)
            if HAS_GO:
                dw += tl.sum(K * go[None, :], 1)
            if SOFTMAX:
                w = tl.load(w32_ptr + rows, mask=valid, other=0.0)
                ds = scale * w * (dw - delta)
            else:
                w = tl.where(valid, tl.sum(h2 * wl[None, :], 1) + bl, 0.0)
                ds = dw
            ds = tl.where(valid, ds, 0.0)
            dh = ds[:, None] * wl[None, :]
            if NUM_LAYERS == 2:
                dz2, da2, g2, u2 = _act_bwd(dh, z2, a2, mu2, r2, sg2, sgu2, inv_n, valid, ACT, DICE_TRAIN)
                if MODE == 1:
                    g2 = tl.where(valid[:, None], g2, 0.0)
                    sg_acc += tl.sum(g2, 0)
                    sgu_acc += tl.sum(g2 * u2, 0)
                else:
                    dz2 = tl.where(valid[:, None], dz2, 0.0)
                    dh1 = _mmf_b(dz2, W2_hi, W2_lo, PREC, INTERP)
                    if MODE == 0:
                        dW2_acc += _mmf(tl.trans(dz2), h1, PREC, INTERP)
                        db2_acc += tl.sum(dz2, 0)
                        da2_acc += tl.sum(tl.where(valid[:, None], da2, 0.0), 0)
            else:
                dh1 = dh
            if MODE == 0 or MODE == 3 or (MODE == 2 and NUM_LAYERS == 2) or (MODE == 1 and NUM_LAYERS == 1):
                G, da1, g1, u1 = _act_bwd(dh1, z1, a1, mu1, r1, sg1, sgu1, inv_n, valid, ACT, DICE_TRAIN)
                if MODE == 1 or MODE == 2:
                    g1 = tl.where(valid[:, None], g1, 0.0)
                    sg_acc += tl.sum(g1, 0)
                    sgu_acc += tl.sum(g1 * u1, 0)
                else:  # MODE 0 or 3
                    G = tl.where(valid[:, None], G, 0.0)
                    G_hi = _hi(G, PREC)
                    G_lo = _lo(G, G_hi, PREC)
                    if WANT_DQ:
                        dq_acc += tl.sum(K * _mm(G_hi, G_lo, Wp_hi, Wp_lo, PREC, INTERP), 0)
                    if MODE == 0:
                        da1_acc += tl.sum(tl.where(valid[:, None], da1, 0.0), 0)
                        dwl_acc += tl.sum(ds[:, None] * h2, 0)
                        dbl_acc += ds
                        dK = _mm(G_hi, G_lo, M_hi, M_lo, PREC, INTERP)
                        if HAS_GO:
                            dK += w[:, None] * go[None, :]
                        tl.store(dk_ptr + rows[:, None] * D + d[None, :], dK,
                                 mask=valid[:, None] & (d[None, :] < D))
                        K_hi = _hi(K, PREC)
                        K_lo = _lo(K, K_hi, PREC)
                        dA_acc += _mm(tl.trans(G_hi), tl.trans(G_lo), K_hi, K_lo, PREC, INTERP)
                        Kq = K * q[None, :]
                        Kq_hi = _hi(Kq, PREC)
                        dWp_acc += _mm(tl.trans(G_hi), tl.trans(G_lo), Kq_hi, _lo(Kq, Kq_hi, PREC), PREC, INTERP)
                        dc_acc += tl.sum(G, 0)
        if WANT_DQ:
            tl.store(dq_ptr + b * D + d, dq_acc, mask=d < D)
        if MODE == 0:
            tl.store(dc_ptr + b * H1 + j1, dc_acc, mask=j1 < H1)
            if not JAGGED:  # the padding rows of dk are zero
                zero_d = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
                for t0 in range(0, T, BLOCK_T):
                    t = t0 + tl.arange(0, BLOCK_T)
                    msk = ((t >= L) & (t < T))[:, None] & (d[None, :] < D)
                    tl.store(dk_ptr + (b * T + t)[:, None] * D + d[None, :], zero_d, mask=msk)
    if MODE == 0:
        m1 = (j1[:, None] < H1) & (d[None, :] < D)
        tl.store(dA_ptr + pid * H1 * D + j1[:, None] * D + d[None, :], dA_acc, mask=m1)
        tl.store(dWp_ptr + pid * H1 * D + j1[:, None] * D + d[None, :], dWp_acc, mask=m1)
        tl.store(dwl_ptr + pid * HL + jl, dwl_acc, mask=jl < HL)
        tl.store(dbl_ptr + pid, tl.sum(dbl_acc, 0))
        tl.store(dact_ptr + pid * HT + j1, da1_acc, mask=j1 < H1)
        if NUM_LAYERS == 2:
            m2 = (j2[:, None] < H2) & (j1[None, :] < H1)
            tl.store(dW2_ptr + pid * H2 * H1 + j2[:, None] * H1 + j1[None, :], dW2_acc, mask=m2)
            tl.store(db2_ptr + pid * H2 + j2, db2_acc, mask=j2 < H2)
            tl.store(dact_ptr + pid * HT + H1 + j2, da2_acc, mask=j2 < H2)
    elif MODE == 1 or MODE == 2:
        if MODE == 1 and NUM_LAYERS == 2:
            HG = H2
        else:
            HG = H1
        jg = tl.arange(0, BLOCK_HG)
        tl.store(gsum_ptr + pid * 2 * HG + jg, sg_acc, mask=jg < HG)
        tl.store(gsum_ptr + pid * 2 * HG + HG + jg, sgu_acc, mask=jg < HG)


# ------------------------------------------------------------------------------------------------------- launchers


def _launch(kernel, grid: tuple[int], *args, **kwargs) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``. Under ``TRITON_INTERPRET=1`` the ops are opaque custom ops
    whose fake implementation is the launcher itself: with fake tensors it only allocates the outputs."""
    if triton_interpret() and any(is_fake(a) for a in args if isinstance(a, Tensor)):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)


def _block(n: int) -> int:
    """Power-of-two block >= 16 (``tl.dot``'s minimum) covering ``n``."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _precision(query: Tensor, keys: Tensor) -> str:
    """The ``tl.dot`` scheme: one bfloat16 / float16 product for bfloat16 / float16 inputs, else ``bf16x4``."""
    dts = {query.dtype, keys.dtype}
    return "bf16" if dts == {torch.bfloat16} else "fp16" if dts == {torch.float16} else "bf16x4"


def _split_dq(prec: str, layers: int, BD: int, BH1: int, BH2: int, limit: int) -> bool:
    return _smem_estimate("bwd", prec, layers, BD, BH1, BH2, 16, mode=0) > limit


def check_supported(query: Tensor, keys: Tensor, weights, smem_limit: int | None = None) -> None:
    """Raises ``TypeError``/``ValueError`` for what the Triton kernels do not cover (dtypes, depth, widths, and the
    shared memory that the blocks of these widths need: checked against ``smem_limit`` bytes, by default the limit
    of ``query``'s GPU; not checked for CPU tensors under the interpreter unless ``smem_limit`` is given)."""
    for name, t in (("query", query), ("keys", keys)):
        if t.dtype not in DTYPES:
            raise TypeError(f"backend 'triton' supports {[str(x) for x in DTYPES]} for {name}, got {t.dtype}; "
                            f"use backend='torch' for it")
    widths = [int(w.shape[0]) for w in weights[:-1]]
    if not 1 <= len(widths) <= MAX_HIDDEN_LAYERS:
        raise ValueError(f"backend 'triton' supports 1 or {MAX_HIDDEN_LAYERS} hidden layers, got {len(widths)} "
                         f"(hidden widths {tuple(widths)}); use backend='torch' for deeper MLPs")
    D = int(query.shape[-1])
    if D > MAX_WIDTH or max(widths) > MAX_WIDTH:
        raise ValueError(f"backend 'triton' supports D and hidden widths up to {MAX_WIDTH}, got D = {D} and hidden "
                         f"widths {tuple(widths)}; use backend='torch' for wider layers")
    if smem_limit is None and query.device.type != "cuda":
        return
    prec, layers = _precision(query, keys), len(widths)
    BD, BH1, BH2 = _block(D), _block(widths[0]), _block(widths[1] if layers == 2 else 1)
    limit = smem_limit if smem_limit is not None else _smem_limit(query.device)
    split = _split_dq(prec, layers, BD, BH1, BH2, limit)
    need = max(_smem_estimate("fwd", prec, layers, BD, BH1, BH2, 16),
               _smem_estimate("bwd", prec, layers, BD, BH1, BH2, 16, mode=0, split_dq=split),
               _smem_estimate("bwd", prec, layers, BD, BH1, BH2, 16, mode=3 if split else 2))
    if need > limit:
        raise ValueError(f"backend 'triton' needs about {need} bytes of shared memory per block for D = {D} and hidden "
                         f"widths {tuple(widths)} in {query.dtype} (blocks {BD} x {BH1} x {BH2}); the GPU has "
                         f"{limit}: use backend='torch' for these sizes, or bfloat16/float16 inputs")


def supports(query: Tensor, keys: Tensor, weights) -> bool:
    try:
        check_supported(query, keys, weights)
    except (TypeError, ValueError):
        return False
    return True


class _Problem:
    """The launch geometry and the float32 parameters of one call.

    ``A = Wk - Wd`` and ``Wp`` ``[H1, D]``, ``Wqd = Wq + Wd`` ``[H1, D]``, ``C = query @ Wqd^T + b1`` ``[B, H1]``,
    ``W2`` ``[H2, H1]``, ``b2`` ``[H2]``, ``wl`` ``[HL]``, ``bl`` ``[1]``, and the activation pack ``[4, H1 + H2]``
    (rows: PReLU weight / Dice alpha, Dice mean, ``1 / sqrt(var + eps)``, and ``1 / Nv`` at ``[3, 0]``).
    """

    def __init__(self, query, keys, lengths, offsets, weights, biases, act_weights, activation):
        check_supported(query, keys, weights)
        self.B, self.D = (int(x) for x in query.shape)
        self.jagged = offsets is not None
        self.keys = keys.contiguous()
        if self.jagged:
            self.T, self.N = 0, int(keys.shape[0])
            self.rows = self.N
            self.bucket = triton.next_power_of_2(max(1, -(-self.N // max(self.B, 1))))  # mean length, no sync
        else:
            self.T = int(keys.shape[1])
            self.N = self.B * self.T
            self.rows = self.N
            self.bucket = triton.next_power_of_2(max(1, self.T))
        self.len_ptr = lengths if lengths is not None else offsets
        self.off_ptr = offsets if offsets is not None else lengths
        self.widths = [int(w.shape[0]) for w in weights[:-1]]
        self.layers = len(self.widths)
        self.H1 = self.widths[0]
        self.H2 = self.widths[1] if self.layers == 2 else 0
        self.HL = self.widths[-1]
        self.HT = self.H1 + self.H2
        self.act = ACTIVATION_CODES[activation]
        self.prec = _precision(query, keys)
        dev = query.device
        W1 = weights[0].float()
        Wq, Wk, Wd, Wp = W1.split(self.D, dim=1)
        self.A = (Wk - Wd).contiguous()
        self.Wp = Wp.contiguous()
        self.Wqd = Wq + Wd
        self.q = query.contiguous()
        self.C = torch.addmm(biases[0].float(), query.float(), self.Wqd.t()).contiguous()
        if self.layers == 2:
            self.W2 = weights[1].float().contiguous()
            self.b2 = biases[1].float().contiguous()
        else:
            self.W2 = self.b2 = torch.zeros(1, dtype=torch.float32, device=dev)
        self.wl = weights[-1].float().reshape(-1).contiguous()
        self.bl = biases[-1].float().reshape(1).contiguous()
        self.alphas = [a.float().expand(h) for a, h in zip(act_weights, self.widths)] if act_weights else None
        self.blocks = dict(BLOCK_D=_block(self.D), BLOCK_H1=_block(self.H1), BLOCK_H2=_block(max(self.H2, 1)))
        self.BLOCK_HL = _block(self.HL)
        self.split_dq = _split_dq(self.prec, self.layers, self.blocks["BLOCK_D"], self.blocks["BLOCK_H1"],
                                  self.blocks["BLOCK_H2"], _smem_limit(query.device))

    def pack(self, means, rs, inv_n=None) -> Tensor:
        """The ``[4, H1 + H2]`` activation pack from per-layer means and ``r`` (lists of ``[H_i]`` fp32)."""
        dev = self.A.device
        zeros = [torch.zeros(h, dtype=torch.float32, device=dev) for h in self.widths]
        alphas = self.alphas if self.alphas is not None else zeros
        last = torch.zeros(self.HT, dtype=torch.float32, device=dev)
        if inv_n is not None:
            last = torch.cat([inv_n.reshape(1).float(), last[1:]])
        return torch.stack([torch.cat(alphas), torch.cat(means or zeros), torch.cat(rs or zeros), last])

    def common(self):
        return (self.q, self.keys, self.len_ptr, self.off_ptr, self.C, self.A, self.Wp, self.W2, self.b2)


def _merge_moments(cnt: Tensor, mean_b: Tensor, m2_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of per-sample ``(count [B], mean [B, H], M2 [B, H])`` into ``(mean, biased var, count)``."""
    total = cnt.sum()
    denom = total.clamp_min(1.0)
    mean = (cnt[:, None] * mean_b).sum(0) / denom
    m2 = m2_b.sum(0) + (cnt[:, None] * (mean_b - mean).square()).sum(0)
    return mean, m2 / denom, total


def _dice_batch_stats(pb: _Problem, eps: float) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """One stats pass per hidden layer; returns ``(stats [3, H1 + H2], means, rs)``."""
    dev = pb.A.device
    means, rs, variances, count = [], [], [], None
    for layer in range(1, pb.layers + 1):
        H = pb.widths[layer - 1]
        cnt = _alloc.empty(pb.B, dtype=torch.float32, device=dev)
        mean_b = _alloc.empty(pb.B, H, dtype=torch.float32, device=dev)
        m2_b = _alloc.empty(pb.B, H, dtype=torch.float32, device=dev)
        placeholder = [torch.zeros(h, dtype=torch.float32, device=dev) for h in pb.widths[len(means):]]
        act = pb.pack(means + placeholder, rs + placeholder)
        _launch(_target_attention_stats_kernel, (pb.B,),
            *pb.common(), act, cnt, mean_b, m2_b,
            pb.T, pb.N, pb.D, pb.H1, max(pb.H2, 1), pb.HT, pb.bucket,
            JAGGED=pb.jagged, LAYER=layer, ACT=pb.act, PREC=pb.prec, INTERP=triton_interpret(), BLOCK_HS=_block(H),
            **pb.blocks,
        )
        mean, var, count = _merge_moments(cnt, mean_b, m2_b)
        means.append(mean)
        variances.append(var)
        rs.append(torch.rsqrt(var + eps))
    stats = torch.stack([torch.cat(means), torch.cat(variances), count.expand(pb.HT)])
    return stats, means, rs


def _eval_pack(pb: _Problem, activation, act_means, act_vars, eps) -> Tensor:
    if activation != "dice":
        return pb.pack(None, None)
    return pb.pack([m.float() for m in act_means], [torch.rsqrt(v.float() + eps) for v in act_vars])


def target_attention_fwd(
    query: Tensor,
    keys: Tensor,
    lengths: Tensor | None,
    offsets: Tensor | None,
    weights: list[Tensor],
    biases: list[Tensor],
    act_weights: list[Tensor],
    act_means: list[Tensor],
    act_vars: list[Tensor],
    activation: str,
    normalization: str,
    scale: float,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused forward. Inputs as :func:`din_kernels.target_attention` (``query`` [B, D]; ``keys`` [B, T, D] with
    ``lengths`` [B] or [N, D] with ``offsets`` [B + 1]; ``weights``/``biases`` of 1 or 2 hidden layers).

    Returns ``(v_U [B, D], w [B, T] or [N], dice_stats [3, H1 + H2] or [3, 0], w32, out32)``: ``v_U`` and ``w`` in
    ``query``'s dtype; the Dice batch statistics (mean, biased variance, count) in training; with softmax the float32
    weights ``w32`` (``[B * T]`` or ``[N]``) and ``out32`` ``[B, D]`` that the backward needs for
    ``delta_b = sum_t w_t dw_t`` (empty tensors with ``normalization == "none"``).
    """
    pb = _Problem(query, keys, lengths, offsets, weights, biases, act_weights, activation)
    dev = query.device
    dice_train = activation == "dice" and training
    out = _alloc.empty(pb.B, pb.D, dtype=query.dtype, device=dev)
    w = _alloc.empty(*((pb.N,) if pb.jagged else (pb.B, pb.T)), dtype=query.dtype, device=dev)
    softmax = normalization == "softmax"
    w32 = _alloc.empty(pb.rows if softmax else 0, dtype=torch.float32, device=dev)
    out32 = _alloc.empty(pb.B if softmax else 0, pb.D, dtype=torch.float32, device=dev)
    stats = torch.zeros(3, pb.HT if dice_train else 0, dtype=torch.float32, device=dev)
    if pb.B == 0:
        if pb.jagged:
            w, w32 = torch.zeros_like(w), torch.zeros_like(w32)
        return out, w, stats, w32, out32
    if dice_train:
        stats, means, rs = _dice_batch_stats(pb, eps)
        act = pb.pack(means, rs)
    else:
        act = _eval_pack(pb, activation, act_means, act_vars, eps)
    _launch(_target_attention_fwd_kernel, (pb.B,),
        *pb.common(), pb.wl, pb.bl, act, out, w, w32, out32,
        float(scale), pb.T, pb.N, pb.D, pb.H1, max(pb.H2, 1), pb.HL, pb.HT, pb.bucket,
        JAGGED=pb.jagged, NUM_LAYERS=pb.layers, ACT=pb.act, SOFTMAX=softmax, PREC=pb.prec, INTERP=triton_interpret(),
        BLOCK_HL=pb.BLOCK_HL, **pb.blocks,
    )
    return out, w, stats, w32, out32


def _num_programs(B: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(B, torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(B, 2))


def target_attention_bwd(
    grad_out: Tensor | None,
    grad_scores: Tensor | None,
    query: Tensor,
    keys: Tensor,
    lengths: Tensor | None,
    offsets: Tensor | None,
    weights: list[Tensor],
    biases: list[Tensor],
    act_weights: list[Tensor],
    act_means: list[Tensor],
    act_vars: list[Tensor],
    stats: Tensor,
    w32: Tensor,
    out32: Tensor,
    activation: str,
    normalization: str,
    scale: float,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The fused backward: ``(d query [B, D], d keys (keys' shape), d weights, d biases, d act_weights)``.

    ``grad_out`` [B, D] and ``grad_scores`` ([B, T] or [N]) may be None; ``stats``, ``w32``, ``out32`` are the
    forward's outputs (see :func:`target_attention_fwd`). Gradients come in the dtypes of their inputs.
    """
    pb = _Problem(query, keys, lengths, offsets, weights, biases, act_weights, activation)
    dev = query.device
    f32 = torch.float32
    dice_train = activation == "dice" and training
    B, D, H1, H2, HL, HT = pb.B, pb.D, pb.H1, pb.H2, pb.HL, pb.HT
    dk = _alloc.empty(*keys.shape, dtype=keys.dtype, device=dev)
    if B == 0:
        zeros = lambda ts: [torch.zeros_like(t) for t in ts]  # noqa: E731
        return (_alloc.empty(0, D, dtype=query.dtype, device=dev), torch.zeros_like(dk), zeros(weights),
                zeros(biases), zeros(act_weights))
    if dice_train:
        count = stats[2, :1]
        act = pb.pack(list(stats[0].split(pb.widths)), [torch.rsqrt(v + eps) for v in stats[1].split(pb.widths)],
                      1.0 / count.clamp_min(1.0))
    else:
        act = _eval_pack(pb, activation, act_means, act_vars, eps)
    P = _num_programs(B, dev)
    go = grad_out.contiguous() if grad_out is not None else pb.C
    gs = grad_scores.contiguous() if grad_scores is not None else pb.C
    dq = _alloc.empty(B, D, dtype=f32, device=dev)
    dc = _alloc.empty(B, H1, dtype=f32, device=dev)
    dA = _alloc.empty(P, H1, D, dtype=f32, device=dev)
    dWp = _alloc.empty(P, H1, D, dtype=f32, device=dev)
    dW2 = _alloc.empty(P, max(H2, 1), H1, dtype=f32, device=dev)
    db2 = _alloc.empty(P, max(H2, 1), dtype=f32, device=dev)
    dwl = _alloc.empty(P, HL, dtype=f32, device=dev)
    dbl = _alloc.empty(P, dtype=f32, device=dev)
    dact = _alloc.empty(P, HT, dtype=f32, device=dev)
    dsum = torch.zeros(2, HT, dtype=f32, device=dev)

    def launch(mode: int, gsum: Tensor, block_hg: int) -> None:
        _launch(_target_attention_bwd_kernel, (P,),
            *pb.common(), pb.wl, pb.bl, act, dsum, go, gs, out32, w32,
            dk, dq, dc, dA, dWp, dW2, db2, dwl, dbl, dact, gsum,
            B, float(scale), pb.T, pb.N, D, H1, max(H2, 1), HL, HT, pb.bucket,
            JAGGED=pb.jagged, NUM_LAYERS=pb.layers, ACT=pb.act, SOFTMAX=normalization == "softmax",
            DICE_TRAIN=dice_train, MODE=mode, SPLIT_DQ=pb.split_dq, HAS_GO=grad_out is not None,
            HAS_GS=grad_scores is not None,
            PREC=pb.prec, INTERP=triton_interpret(), BLOCK_HL=pb.BLOCK_HL, BLOCK_HG=block_hg, **pb.blocks,
        )

    if dice_train:  # batch sums of g and g * u, top hidden layer first (layer 1's g depends on layer 2's dx)
        top = _alloc.empty(P, 2, HL, dtype=f32, device=dev)
        launch(1, top, pb.BLOCK_HL)
        top = top.sum(0)
        if pb.layers == 2:
            dsum = torch.cat([torch.zeros(2, H1, dtype=f32, device=dev), top], dim=1)
            first = _alloc.empty(P, 2, H1, dtype=f32, device=dev)
            launch(2, first, _block(H1))
            dsum = torch.cat([first.sum(0), top], dim=1)
        else:
            dsum = top
    launch(0, dsum, 16)
    if pb.split_dq:
        launch(3, dsum, 16)

    dA_sum, dWp_sum = dA.sum(0), dWp.sum(0)
    dWqd = dc.t() @ query.float()
    d_w1 = torch.cat([dWqd, dA_sum, dWqd - dA_sum, dWp_sum], dim=1)
    d_weights = [d_w1]
    d_biases = [dc.sum(0)]
    if pb.layers == 2:
        d_weights.append(dW2.sum(0))
        d_biases.append(db2.sum(0))
    d_weights.append(dwl.sum(0).reshape(1, HL))
    if normalization == "softmax":  # the softmax is shift invariant: the last bias's gradient is exactly 0
        d_biases.append(torch.zeros(1, dtype=f32, device=dev))
    else:
        d_biases.append(dbl.sum(0).reshape(1))
    d_act = []
    if act_weights:
        for a, g in zip(act_weights, dact.sum(0).split(pb.widths)):
            d_act.append((g.sum().reshape(1) if a.numel() == 1 else g.clone()).to(a.dtype))  # no aliased outputs
    dq_full = (dq + dc @ pb.Wqd).to(query.dtype)
    d_weights = [g.to(x.dtype) for g, x in zip(d_weights, weights)]
    d_biases = [g.to(x.dtype) for g, x in zip(d_biases, biases)]
    return dq_full, dk, d_weights, d_biases, d_act
