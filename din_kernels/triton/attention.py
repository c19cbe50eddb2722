"""Target attention (SPEC section 1) in Triton: the launchers of the fused forward and backward kernels
(:mod:`.attention_kernels`), which check the inputs (:func:`check_supported`, :mod:`.attention_smem`), form the
float32 parameters, run the kernels and reduce their per-program partials.

Dice in training needs the mean and variance of every hidden layer over all valid behaviours of the batch before any
output: ``_target_attention_stats_kernel`` (one program per sample) computes layer 1's per-sample count, mean and sum
of squared deviations (Chan's parallel update across tiles), the launcher merges the samples (Chan again, a few
``[B, H]`` torch ops, deterministic); with two hidden layers a second stats pass, which applies layer 1's Dice with the
batch statistics just found, does the same for layer 2. The fused pass follows.

Dice training in the backward: ``dx`` of a Dice layer needs the batch sums ``sum g`` and ``sum g * u`` of its channels
(see :mod:`din_kernels.torch_impl.dice`), and layer 1's ``g`` depends on layer 2's ``dx``. The same kernel therefore
runs first in ``MODE_DICE_SUMS_TOP`` (sums of the top hidden layer), with two layers again in ``MODE_DICE_SUMS_LAYER1``
(sums of layer 1, given layer 2's), then in ``MODE_GRADS`` (everything; with ``SPLIT_DQ`` then ``MODE_DQ_ONLY``); the
sums are per-program partials reduced like the weight gradients.

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

Computation is in float32; the outputs are stored in the input dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _alloc
from ..backend import triton_interpret
from ._launch import launch
from .attention_kernels import (
    ACTIVATION_CODES,
    _target_attention_bwd_kernel,
    _target_attention_fwd_kernel,
    _target_attention_stats_kernel,
)
from .attention_smem import (
    MODE_DICE_SUMS_LAYER1,
    MODE_DICE_SUMS_TOP,
    MODE_DQ_ONLY,
    MODE_GRADS,
    SM90_SMEM_PER_BLOCK,
    _block,
    _precision,
    _smem_limit,
    _split_dq,
    check_supported,
    supports,
)

__all__ = ["SM90_SMEM_PER_BLOCK", "check_supported", "supports", "target_attention_bwd", "target_attention_fwd"]


def _candidate_rows(query_offsets: Tensor, B: int, lengths, offsets, T: int, N: int):
    """``([3, B] int64: each candidate's first key row, length and first output row, its user [B], covered [B])``
    for ``query_offsets`` [U + 1], clamped like every other index (no host sync)."""
    from .._jagged import CandidateIndex, safe_lengths, safe_offsets

    cand = CandidateIndex(query_offsets, B)
    if offsets is not None:
        off = safe_offsets(offsets, N)
        start_u, len_u = off[:-1], off[1:] - off[:-1]
    else:
        len_u = safe_lengths(lengths, T)
        start_u = torch.arange(len_u.shape[0], device=len_u.device) * T
    if cand.U:
        kstart = torch.where(cand.valid, start_u[cand.user], 0)
        length = torch.where(cand.valid, len_u[cand.user], 0)
    else:
        kstart = length = torch.zeros(B, dtype=torch.long, device=query_offsets.device)
    if offsets is not None:
        ostart = torch.cumsum(length, 0) - length
    else:
        ostart = torch.arange(B, device=length.device) * T
    return torch.stack([kstart, length, ostart]).contiguous(), cand.user, cand.valid


class _Problem:
    """The launch geometry and the float32 parameters of one call.

    ``A = Wk - Wd`` and ``Wp`` ``[H1, D]``, ``Wqd = Wq + Wd`` ``[H1, D]``, ``C = query @ Wqd^T + b1`` ``[B, H1]``,
    ``W2`` ``[H2, H1]``, ``b2`` ``[H2]``, ``w_last`` ``[HL]``, ``b_last`` ``[1]``, and the activation pack
    ``[4, H1 + H2]`` (rows: PReLU weight / Dice alpha, Dice mean, ``1 / sqrt(var + eps)``, and ``1 / Nv`` at
    ``[3, 0]``).
    """

    def __init__(self, query, keys, lengths, offsets, weights, biases, act_weights, activation, query_offsets=None):
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
            self.N = int(keys.shape[0]) * self.T
            self.rows = self.B * self.T
            self.bucket = triton.next_power_of_2(max(1, self.T))
        self.len_ptr = lengths if lengths is not None else offsets
        self.off_ptr = offsets if offsets is not None else lengths
        # several candidates per history: [3, B] key start, length and output start of each candidate
        self.cand = None
        if query_offsets is not None:
            self.cand, self.user, self.covered = _candidate_rows(query_offsets, self.B, lengths, offsets, self.T,
                                                                 self.N)
            if self.jagged:  # scores (and the keys' gradient of each candidate) in candidate order: a host sync
                self.rows = int(self.cand[1].sum()) if self.B else 0
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
        self.w_last = weights[-1].float().reshape(-1).contiguous()
        self.b_last = biases[-1].float().reshape(1).contiguous()
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

    def kernel_args(self):
        """The arguments that every attention kernel takes first (``q`` ... ``b2``)."""
        cand = self.cand if self.cand is not None else self.len_ptr
        return (self.q, self.keys, self.len_ptr, self.off_ptr, cand, self.C, self.A, self.Wp, self.W2, self.b2)

    def sum_keys_grad(self, dk_rows: Tensor, keys: Tensor) -> Tensor:
        """With candidates: the keys' gradient (keys' shape and dtype) from the candidates' rows ``dk_rows``
        ([B * T, D] padded, [rows, D] jagged), summed per user in float32."""
        D = self.D
        if not self.jagged:
            out = torch.zeros(keys.shape[0], self.T * D, dtype=torch.float32, device=keys.device)
            rows = dk_rows.view(self.B, self.T * D).float()
            out.index_add_(0, self.user[self.covered], rows[self.covered])
            return out.view(keys.shape).to(keys.dtype)
        kstart, length, ostart = self.cand
        target = torch.repeat_interleave(kstart - ostart, length, output_size=self.rows) + torch.arange(
            self.rows, device=keys.device)
        out = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
        return out.index_add_(0, target, dk_rows.float()).to(keys.dtype)


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
        launch(_target_attention_stats_kernel, (pb.B,),
            *pb.kernel_args(), act, cnt, mean_b, m2_b,
            pb.B, pb.T, pb.N, pb.D, pb.H1, max(pb.H2, 1), pb.HT, pb.bucket,
            JAGGED=pb.jagged, CANDIDATES=pb.cand is not None, LAYER=layer, ACT=pb.act, PREC=pb.prec,
            INTERP=triton_interpret(), BLOCK_HS=_block(H),
            **pb.blocks,
        )
        mean, var, count = _merge_moments(cnt, mean_b, m2_b)
        means.append(mean)
        variances.append(var)
        rs.append(torch.rsqrt(var + eps))
    stats = torch.stack([torch.cat(means), torch.cat(variances), count.expand(pb.HT)])
    return stats, means, rs


def _inference_pack(pb: _Problem, activation, act_means, act_vars, eps) -> Tensor:
    """The activation pack outside Dice training: Dice's running ``act_means``, ``act_vars`` (lists of ``[H_i]``)."""
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
    query_offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused forward. Inputs as :func:`din_kernels.target_attention` (``query`` [B, D]; ``keys`` [B, T, D] with
    ``lengths`` [B] or [N, D] with ``offsets`` [B + 1]; ``weights``/``biases`` of 1 or 2 hidden layers).

    Returns ``(v_U [B, D], w [B, T] or [N], dice_stats [3, H1 + H2] or [3, 0], w32, out32)``: ``v_U`` and ``w`` in
    ``query``'s dtype; the Dice batch statistics (mean, biased variance, count) in training; with softmax the float32
    weights ``w32`` (``[B * T]`` or ``[N]``) and ``out32`` ``[B, D]`` that the backward needs for
    ``delta_b = sum_t w_t dw_t`` (empty tensors with ``normalization == "none"``).
    """
    pb = _Problem(query, keys, lengths, offsets, weights, biases, act_weights, activation, query_offsets)
    dev = query.device
    dice_train = activation == "dice" and training
    out = _alloc.empty(pb.B, pb.D, dtype=query.dtype, device=dev)
    # jagged: rows that no sample covers (only with invalid offsets and the checks off) are never written by a kernel
    w = (torch.zeros(pb.rows, dtype=query.dtype, device=dev) if pb.jagged
         else _alloc.empty(pb.B, pb.T, dtype=query.dtype, device=dev))
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
        act = _inference_pack(pb, activation, act_means, act_vars, eps)
    launch(_target_attention_fwd_kernel, (pb.B,),
        *pb.kernel_args(), pb.w_last, pb.b_last, act, out, w, w32, out32,
        float(scale), pb.B, pb.T, pb.N, pb.D, pb.H1, max(pb.H2, 1), pb.HL, pb.HT, pb.bucket,
        JAGGED=pb.jagged, CANDIDATES=pb.cand is not None, NUM_LAYERS=pb.layers, ACT=pb.act, SOFTMAX=softmax,
        PREC=pb.prec, INTERP=triton_interpret(),
        BLOCK_HL=pb.BLOCK_HL, **pb.blocks,
    )
    return out, w, stats, w32, out32


def _num_programs(B: int, device: torch.device) -> int:
    """``P``, the backward's programs: the GPU's SMs (2 on the CPU), at most ``B``."""
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
    query_offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """The fused backward: ``(d query [B, D], d keys (keys' shape), d weights, d biases, d act_weights)``.

    ``grad_out`` [B, D] and ``grad_scores`` ([B, T] or [N]) may be None; ``stats``, ``w32``, ``out32`` are the
    forward's outputs (see :func:`target_attention_fwd`). Gradients come in the dtypes of their inputs.
    """
    pb = _Problem(query, keys, lengths, offsets, weights, biases, act_weights, activation, query_offsets)
    dev = query.device
    f32 = torch.float32
    dice_train = activation == "dice" and training
    B, D, H1, H2, HL, HT = pb.B, pb.D, pb.H1, pb.H2, pb.HL, pb.HT
    if pb.cand is not None:  # each candidate's own rows, summed per user afterwards (sum_keys_grad)
        dk = (torch.zeros if pb.jagged else _alloc.empty)(pb.rows, D, dtype=keys.dtype, device=dev)
    else:
        dk = (torch.zeros if pb.jagged else _alloc.empty)(*keys.shape, dtype=keys.dtype, device=dev)
    if B == 0:
        zeros = lambda ts: [torch.zeros_like(t) for t in ts]  # noqa: E731
        return (_alloc.empty(0, D, dtype=query.dtype, device=dev), torch.zeros_like(keys), zeros(weights),
                zeros(biases), zeros(act_weights))
    if dice_train:
        count = stats[2, :1]
        act = pb.pack(list(stats[0].split(pb.widths)), [torch.rsqrt(v + eps) for v in stats[1].split(pb.widths)],
                      1.0 / count.clamp_min(1.0))
    else:
        act = _inference_pack(pb, activation, act_means, act_vars, eps)
    P = _num_programs(B, dev)
    go = grad_out.contiguous() if grad_out is not None else pb.C
    gs = grad_scores.contiguous() if grad_scores is not None else pb.C
    dq = _alloc.empty(B, D, dtype=f32, device=dev)
    dc = _alloc.empty(B, H1, dtype=f32, device=dev)
    dA = _alloc.empty(P, H1, D, dtype=f32, device=dev)
    dWp = _alloc.empty(P, H1, D, dtype=f32, device=dev)
    dW2 = _alloc.empty(P, max(H2, 1), H1, dtype=f32, device=dev)
    db2 = _alloc.empty(P, max(H2, 1), dtype=f32, device=dev)
    dw_last = _alloc.empty(P, HL, dtype=f32, device=dev)
    db_last = _alloc.empty(P, dtype=f32, device=dev)
    dact = _alloc.empty(P, HT, dtype=f32, device=dev)
    dice_sums = torch.zeros(2, HT, dtype=f32, device=dev)

    def run_bwd(mode: tl.constexpr, dice_partials: Tensor, block_hg: int) -> None:
        launch(_target_attention_bwd_kernel, (P,),
            *pb.kernel_args(), pb.w_last, pb.b_last, act, dice_sums, go, gs, out32, w32,
            dk, dq, dc, dA, dWp, dW2, db2, dw_last, db_last, dact, dice_partials,
            B, float(scale), pb.T, pb.N, D, H1, max(H2, 1), HL, HT, pb.bucket,
            JAGGED=pb.jagged, CANDIDATES=pb.cand is not None, NUM_LAYERS=pb.layers, ACT=pb.act,
            SOFTMAX=normalization == "softmax", DICE_TRAIN=dice_train, MODE=mode.value, SPLIT_DQ=pb.split_dq,
            HAS_GO=grad_out is not None,
            HAS_GS=grad_scores is not None,
            PREC=pb.prec, INTERP=triton_interpret(), BLOCK_HL=pb.BLOCK_HL, BLOCK_HG=block_hg, **pb.blocks,
        )

    if dice_train:  # batch sums of g and g * u, top hidden layer first (layer 1's g depends on layer 2's dx)
        top = _alloc.empty(P, 2, HL, dtype=f32, device=dev)
        run_bwd(MODE_DICE_SUMS_TOP, top, pb.BLOCK_HL)
        top = top.sum(0)
        if pb.layers == 2:
            dice_sums = torch.cat([torch.zeros(2, H1, dtype=f32, device=dev), top], dim=1)
            first = _alloc.empty(P, 2, H1, dtype=f32, device=dev)
            run_bwd(MODE_DICE_SUMS_LAYER1, first, _block(H1))
            dice_sums = torch.cat([first.sum(0), top], dim=1)
        else:
            dice_sums = top
    run_bwd(MODE_GRADS, dice_sums, 16)  # writes no Dice partials: dice_sums stands in for them, never written
    if pb.split_dq:
        run_bwd(MODE_DQ_ONLY, dice_sums, 16)

    dA_sum, dWp_sum = dA.sum(0), dWp.sum(0)
    dWqd = dc.t() @ query.float()
    d_w1 = torch.cat([dWqd, dA_sum, dWqd - dA_sum, dWp_sum], dim=1)
    d_weights = [d_w1]
    d_biases = [dc.sum(0)]
    if pb.layers == 2:
        d_weights.append(dW2.sum(0))
        d_biases.append(db2.sum(0))
    d_weights.append(dw_last.sum(0).reshape(1, HL))
    if normalization == "softmax":  # the softmax is shift invariant: the last bias's gradient is exactly 0
        d_biases.append(torch.zeros(1, dtype=f32, device=dev))
    else:
        d_biases.append(db_last.sum(0).reshape(1))
    d_act = []
    if act_weights:
        for a, g in zip(act_weights, dact.sum(0).split(pb.widths)):
            d_act.append((g.sum().reshape(1) if a.numel() == 1 else g.clone()).to(a.dtype))  # no aliased outputs
    dq_full = (dq + dc @ pb.Wqd).to(query.dtype)
    if pb.cand is not None:
        dk = pb.sum_keys_grad(dk, keys)
    d_weights = [g.to(x.dtype) for g, x in zip(d_weights, weights)]
    d_biases = [g.to(x.dtype) for g, x in zip(d_biases, biases)]
    return dq_full, dk, d_weights, d_biases, d_act
