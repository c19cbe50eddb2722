"""The torch backend's target attention with several candidates per history (``query_offsets``, SPEC section 1).

Each user's keys ``K_u`` [T, D] meet all its candidates in one batched matmul: the candidates' first-layer matrices
``M_c = (Wk - Wd) + Wp * q_c`` are stacked along the output dimension, ``K_u @ [M_c1; M_c2; ...]^T`` [T, n_u * H1],
so the history is read once per user and never repeated. Users are padded to the largest candidate count
``C = max_u n_u`` (padding slots are masked out, like padding behaviours). The layers above the first one, the
softmax and the pooling run on the ``[U * C, T]`` grid of (candidate slot, behaviour); the backward recomputes the
forward and sums the keys' gradient over each user's candidates in the same stacked matmul:
``dK_u = G_u @ [M_c]`` with ``G_u`` [T, n_u * H1], ``dM_c = G_c^T K_u``.

On the CPU the users are processed in chunks whose largest temporary stays a few MB; Dice in training takes its
batch statistics over every valid (candidate, behaviour) pair, in one chunk.
"""

from __future__ import annotations

import torch

from .._config import MLP, AttentionConfig, AttentionSaved
from .._jagged import CandidateIndex, jagged_to_padded, padded_mask, safe_lengths, safe_offsets
from ..reference.attention import compute_dtype
from .attention import _activate_bwd, _stats_tensor, _upper

_CHUNK_ELEMENTS = 1 << 20


class _Users:
    """The users' keys (padded, zeroed padding, compute dtype), the candidates' slots, and the chunks of users."""

    def __init__(self, query, keys, lengths, offsets, query_offsets, mlp: MLP, cfg: AttentionConfig):
        self.cd = cd = compute_dtype(query, keys, *mlp.weights, *mlp.biases, *mlp.act_weights)
        self.Nq, self.D = query.shape
        if offsets is not None:
            K, user_len, self.key_index = jagged_to_padded(keys.to(cd), offsets)
        else:
            user_len = safe_lengths(lengths, keys.shape[1])
            K, self.key_index = keys.to(cd), None
        self.U, self.T = K.shape[0], K.shape[1]
        self.user_mask = padded_mask(user_len, self.T)  # [U, T]
        self.K = K.masked_fill(~self.user_mask[..., None], 0.0)  # padding content never matters
        self.user_len = user_len
        qo = safe_offsets(query_offsets, self.Nq)
        self.cand = CandidateIndex(query_offsets, self.Nq)
        counts = (qo[1:] - qo[:-1]) if self.U else qo.new_zeros(0)
        self.C = int(counts.max()) if counts.numel() else 0
        rows = torch.arange(self.Nq, device=query.device)
        self.slot = torch.where(self.cand.valid, rows - qo[:-1][self.cand.user] if self.U else rows, 0)
        self.slot = self.slot.clamp(0, max(self.C - 1, 0))
        self.cand_mask = torch.zeros(self.U, max(self.C, 1), dtype=torch.bool, device=query.device)
        if self.U and self.Nq:
            self.cand_mask[self.cand.user[self.cand.valid], self.slot[self.cand.valid]] = True
        self.cand_mask = self.cand_mask[:, : self.C]
        Q = query.new_zeros(self.U, self.C, self.D, dtype=cd)
        if self.U and self.Nq:
            Q[self.cand.user[self.cand.valid], self.slot[self.cand.valid]] = query.to(cd)[self.cand.valid]
        self.Q = Q  # [U, C, D]
        self.W = [w.to(cd) for w in mlp.weights]
        self.b = [x.to(cd) for x in mlp.biases]
        self.acts = [x.to(cd) for x in mlp.act_weights]
        self.mlp, self.cfg = mlp, cfg
        whole = cfg.dice_training or query.device.type != "cpu"
        H1 = self.W[0].shape[0]
        step = max(1, _CHUNK_ELEMENTS // max(1, self.C * self.T * max(H1, self.D)))
        self.chunks = [(0, self.U)] if whole else [(u, min(self.U, u + step)) for u in range(0, self.U, step)]
        self.chunks = [c for c in self.chunks if c[1] > c[0]]

    def mask(self, u0: int, u1: int) -> torch.Tensor:
        """``[u * C, T]``: valid (candidate slot, behaviour) pairs of users ``u0:u1``."""
        m = self.cand_mask[u0:u1, :, None] & self.user_mask[u0:u1, None, :]
        return m.reshape((u1 - u0) * self.C, self.T)

    def forward(self, u0: int, u1: int, stats: list):
        """``(M [u, C, H1, D], w [u * C, T], tape, mask)`` of users ``u0:u1``."""
        D, C, T, cfg = self.D, self.C, self.T, self.cfg
        u = u1 - u0
        Wq, Wk, Wd, Wp = self.W[0].split(D, dim=1)
        H1 = Wq.shape[0]
        Q = self.Q[u0:u1]
        M = torch.addcmul((Wk - Wd)[None, None], Wp[None, None], Q[:, :, None, :])  # [u, C, H1, D]
        c = torch.matmul(Q, (Wq + Wd).t()) + self.b[0]  # [u, C, H1]
        z1 = torch.bmm(self.K[u0:u1], M.reshape(u, C * H1, D).transpose(1, 2))  # [u, T, C * H1]
        z1 = (z1.view(u, T, C, H1).permute(0, 2, 1, 3) + c[:, :, None, :]).reshape(u * C, T, H1)
        mask = self.mask(u0, u1)
        _, w, tape = _upper(z1, None, mask, self.W, self.b, self.acts, self.mlp.act_means, self.mlp.act_vars,
                            cfg.activation, cfg.normalization, cfg.scale, cfg.training, cfg.eps, self.cd, stats,
                            with_out=False)
        return M, w, tape, mask

    def to_candidates(self, padded: torch.Tensor) -> torch.Tensor:
        """``[U, C, ...]`` per slot -> ``[Nq, ...]`` per candidate (zeros for candidates no user covers)."""
        if self.U == 0 or self.C == 0:
            return padded.new_zeros((self.Nq,) + tuple(padded.shape[2:]))
        rows = padded[self.cand.user, self.slot]
        keep = self.cand.valid.reshape((-1,) + (1,) * (rows.dim() - 1))
        return torch.where(keep, rows, 0)

    def from_candidates(self, rows: torch.Tensor) -> torch.Tensor:
        """``[Nq, ...]`` per candidate -> ``[U, C, ...]`` per slot (zeros at the padding slots)."""
        out = rows.new_zeros((self.U, self.C) + tuple(rows.shape[1:]))
        if self.U and self.C:
            out[self.cand.user[self.cand.valid], self.slot[self.cand.valid]] = rows[self.cand.valid]
        return out

    def scores_out(self, w: torch.Tensor, jagged: bool) -> torch.Tensor:
        """``w`` [U * C, T] -> scores ``[Nq, T]`` padded or ``[sum_i L_u(i)]`` jagged in candidate order."""
        w = w.view(self.U, self.C, self.T)
        if not jagged:
            return self.to_candidates(w)
        return w[self.cand_mask[..., None] & self.user_mask[:, None, :]]

    def scores_in(self, scores: torch.Tensor, jagged: bool) -> torch.Tensor:
        """The inverse of :meth:`scores_out`: ``[U * C, T]``."""
        if not jagged:
            return self.from_candidates(scores).reshape(self.U * self.C, self.T)
        out = scores.new_zeros(self.U, self.C, self.T)
        out[self.cand_mask[..., None] & self.user_mask[:, None, :]] = scores
        return out.reshape(self.U * self.C, self.T)


def attention_fwd_multi(query, keys, lengths, offsets, query_offsets, mlp: MLP, cfg: AttentionConfig):
    """The six outputs of ``target_attention_fwd`` (:mod:`din_kernels.ops.schema`) with ``query_offsets``."""
    us = _Users(query, keys, lengths, offsets, query_offsets, mlp, cfg)
    out = torch.zeros(us.U, us.C, us.D, dtype=us.cd, device=query.device)
    w_all = torch.zeros(us.U * us.C, us.T, dtype=us.cd, device=query.device)
    stats: list = []
    for u0, u1 in us.chunks:
        _, w, _, _ = us.forward(u0, u1, stats)
        w_all[u0 * us.C:u1 * us.C] = w
        out[u0:u1] = torch.bmm(w.view(u1 - u0, us.C, us.T), us.K[u0:u1])  # [u, C, D]
    jagged = offsets is not None
    out_q = us.to_candidates(out)
    w_q = us.scores_out(w_all, jagged)
    widths = mlp.widths if cfg.dice_training else []
    dice_stats = _stats_tensor(stats, us.cd, query.device, widths)
    if cfg.softmax:
        scores_acc, out_acc = w_q, out_q
    else:
        scores_acc, out_acc = query.new_empty(0, dtype=us.cd), query.new_empty(0, us.D, dtype=us.cd)
    return (out_q.to(query.dtype, copy=True), w_q.to(query.dtype, copy=True), dice_stats, scores_acc, out_acc,
            query.new_empty(0, dtype=us.cd))


def attention_bwd_multi(grad_out, grad_scores, query, keys, lengths, offsets, query_offsets, mlp: MLP,
                        saved: AttentionSaved, cfg: AttentionConfig):
    """The gradients of :func:`attention_fwd_multi`: ``(d query, d keys, d weights, d biases, d act_weights)``; the
    keys' gradient sums over each user's candidates."""
    us = _Users(query, keys, lengths, offsets, query_offsets, mlp, cfg)
    cd, D, C, T = us.cd, us.D, us.C, us.T
    jagged = offsets is not None
    go = us.from_candidates(grad_out.to(cd)) if grad_out is not None else None  # [U, C, D]
    gs = us.scores_in(grad_scores.to(cd), jagged) if grad_scores is not None else None  # [U * C, T]
    n = len(us.W)
    Wq, Wk, Wd, Wp = us.W[0].split(D, dim=1)
    H1 = Wq.shape[0]
    gW = [torch.zeros_like(x) for x in us.W[1:]]
    gb = [torch.zeros_like(x) for x in us.b]
    ga = [torch.zeros_like(x) for x in us.acts]
    dA, dWp = torch.zeros(H1, D, dtype=cd, device=query.device), torch.zeros(H1, D, dtype=cd, device=query.device)
    dK = torch.zeros(us.U, T, D, dtype=cd, device=query.device)
    dq_pad = torch.zeros(us.U, C, D, dtype=cd, device=query.device)
    dc_pad = torch.zeros(us.U, C, H1, dtype=cd, device=query.device)
    count = us.mask(0, us.U).sum().to(cd)
    for u0, u1 in us.chunks:
        u = u1 - u0
        K = us.K[u0:u1]
        M, w, tape, mask = us.forward(u0, u1, [])
        dw = gs[u0 * C:u1 * C].clone() if gs is not None else torch.zeros_like(w)
        if go is not None:
            dw = dw + torch.bmm(go[u0:u1], K.transpose(1, 2)).reshape(u * C, T)  # k_t . grad_out
        dw = torch.where(mask, dw, 0.0)
        ds = cfg.scale * w * (dw - (w * dw).sum(-1, keepdim=True)) if cfg.softmax else dw
        h_last = tape[-1][1]
        gW[-1] += (ds.reshape(1, -1) @ h_last.reshape(-1, h_last.shape[-1]))
        gb[-1] += ds.sum().reshape(1)
        dh = ds.unsqueeze(-1) * us.W[-1][0]
        for i in range(n - 2, -1, -1):
            z, h, params = tape[i]
            dz, da = _activate_bwd(dh, z, h, cfg.activation, params, mask, cfg.training, cfg.eps, count)
            if da is not None:
                ga[i] += da
            if i == 0:
                G = dz
                break
            h_prev = tape[i - 1][1]
            gW[i - 1] += dz.reshape(-1, dz.shape[-1]).t() @ h_prev.reshape(-1, h_prev.shape[-1])
            gb[i] += dz.sum((0, 1))
            dh = dz @ us.W[i]
        G4 = G.view(u, C, T, H1)
        G_stack = G4.permute(0, 2, 1, 3).reshape(u, T, C * H1)  # [u, T, C * H1]
        dK[u0:u1] = torch.bmm(G_stack, M.reshape(u, C * H1, D))
        if go is not None:
            dK[u0:u1] += torch.bmm(w.view(u, C, T).transpose(1, 2), go[u0:u1])
        dM = torch.bmm(G_stack.transpose(1, 2), K).view(u, C, H1, D)
        dc = G4.sum(2)  # [u, C, H1]
        dc_pad[u0:u1] = dc
        dA += dM.sum((0, 1))
        dWp += (dM * us.Q[u0:u1, :, None, :]).sum((0, 1))
        dq_pad[u0:u1] = (dM * Wp).sum(2) + dc @ (Wq + Wd)
    if cfg.softmax:  # shift invariance: exactly 0
        gb[-1].zero_()
    dc_all = dc_pad.reshape(-1, H1)
    dWqd = dc_all.t() @ us.Q.reshape(-1, D)
    gb[0] = dc_all.sum(0)
    dW1 = torch.cat([dWqd, dA, dWqd - dA, dWp], dim=1)
    if jagged:
        dkeys = dK[us.key_index.b_idx.clamp_max(max(us.U - 1, 0)), us.key_index.t_idx.clamp_max(max(T - 1, 0))] \
            if us.U and T else dK.new_zeros(keys.shape[0], D)
        dkeys = torch.where(us.key_index.valid[:, None], dkeys, 0) if us.U and T else dkeys
    else:
        dkeys = dK
    d_weights = [g.to(x.dtype) for g, x in zip([dW1, *gW], mlp.weights)]
    d_biases = [g.to(x.dtype) for g, x in zip(gb, mlp.biases)]
    d_act = [g.to(x.dtype) for g, x in zip(ga, mlp.act_weights)]
    dq = us.to_candidates(dq_pad).to(query.dtype)
    return dq, dkeys.to(keys.dtype), d_weights, d_biases, d_act

