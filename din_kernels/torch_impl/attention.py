"""The fast pure-PyTorch target attention: SPEC section 1's factorised first layer.

Forward, per sample b: ``z1 = K_b @ M_b^T + c_b`` with ``M_b = (Wk - Wd) + Wp * q_b`` and
``c_b = q_b @ (Wq + Wd)^T + b1`` (one batched matmul of D*H1 multiply-adds per behaviour instead of 4D*H1; the
``[B, T, 4D]`` concatenation is never built). The upper layers, the mask, the normalisation and the weighted sum
follow in plain PyTorch.

Backward keeps one tensor of the forward: the first layer's pre-activation ``z1`` [B, T, H1], the only activation
that is not cheap to recompute (it costs the dominant matmul); everything above it (activations, the upper layers,
the scores, the softmax) is recomputed chunk by chunk, and the gradients are formed by hand. Without grad the
forward keeps nothing. The first layer's gradients come from ``G = dL/dz1``:

- ``dK = G @ M_b`` and ``dM_b = G^T @ K_b`` (two batched matmuls),
- ``d(Wk - Wd) = sum_b dM_b``, ``dWp = sum_b dM_b * q_b``, ``dq += sum_h dM_b[h] * Wp[h]``,
- ``dc_b = sum_t G`` gives ``d(Wq + Wd) = dc^T q``, ``db1 = sum_b dc_b`` and ``dq += dc_b @ (Wq + Wd)``.

On the CPU both passes run over chunks of samples sized to stay in cache (a chunk's temporaries are a few MB), so
no ``[B, T, H]`` tensor is ever allocated: large fresh allocations cost page faults that dominate elementwise work.
Dice in training needs batch statistics over every valid behaviour before any output, so it runs as one chunk.

Padding entries of ``keys`` are read by the batched matmuls with weight exactly 0; if they hold NaN or Inf the
chunk is recomputed with its padding zeroed, so padding content never changes a result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _alloc
from .._config import MLP, AttentionConfig, AttentionSaved
from .._jagged import jagged_to_padded, padded_mask, padded_to_jagged, safe_lengths
from ..reference.attention import compute_dtype
from .dice import dice_bwd, dice_forward, masked_moments


def _padded_inputs(keys, lengths, offsets, cd):
    """Keys as a zero-padded ``[B, T, D]`` tensor in the compute dtype, the mask, and the jagged index (None when
    padded). ``lengths``/``offsets`` are clamped first (:mod:`din_kernels._jagged`): memory-safe for any values."""
    if offsets is not None:
        K, lengths, index = jagged_to_padded(keys.to(cd), offsets)
        return K, padded_mask(lengths, K.shape[1]), index
    T = keys.shape[1]
    mask = padded_mask(safe_lengths(lengths, T), T)
    K = keys.to(cd)
    if K.device.type != "cpu":  # no sync for the finiteness check below: zero the padding up front
        K = K.masked_fill(~mask[..., None], 0.0)
    return K, mask, None


def _act_params(i, activation, act_weights, act_means, act_vars, z, mask, training, cd, stats):
    """The activation's parameters for hidden layer ``i``: ``(alpha, mean, var)`` (Dice), ``(alpha,)`` (PReLU)."""
    if activation in ("sigmoid", "relu"):
        return ()
    a = act_weights[i].to(cd)
    if activation == "prelu":
        return (a,)
    if training:
        mean, var, count = masked_moments(z, mask)
        stats.append((mean, var, count))
    else:
        mean, var = act_means[i].to(cd), act_vars[i].to(cd)
    return a, mean, var


def _activate(z, activation, params, eps):
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "relu":
        return torch.relu(z)
    if activation == "prelu":
        return torch.where(z >= 0, z, params[0] * z)
    return dice_forward(z, *params, None, None, eps)


def _activate_bwd(dh, z, h, activation, params, mask, training, eps, count):
    """``(dz, d act_weight or None)`` for one hidden layer."""
    if activation == "sigmoid":
        return torch.ops.aten.sigmoid_backward(dh, h), None  # dh * h * (1 - h), one fused pass
    if activation == "relu":
        return torch.ops.aten.threshold_backward(dh, h, 0), None
    dims = (0, 1)
    if activation == "prelu":
        a = params[0]
        da = torch.where(z >= 0, 0.0, dh * z).sum(dims)
        return torch.where(z >= 0, dh, a * dh), (da.sum().reshape(a.shape) if a.numel() == 1 else da)
    a, mean, var = params
    dz, da, _, _ = dice_bwd(dh, z, a, mean, var, None, None, mask, training, eps, count)
    return dz, da


def _upper(z1, K, mask, weights, biases, act_weights, act_means, act_vars, activation, normalization, scale,
           training, eps, cd, stats, with_out=True):
    """Everything after the first Linear: activations, layers 2..n, the score, the mask/softmax, the sum.

    Returns ``(out [B, D], w [B, T], tape)`` where ``tape`` holds each hidden layer's ``(z, h, act params)``.
    """
    tape = []
    z = z1
    for i in range(len(weights) - 1):
        if i > 0:
            z = F.linear(tape[-1][1], weights[i], biases[i])
        params = _act_params(i, activation, act_weights, act_means, act_vars, z, mask, training, cd, stats)
        tape.append((z, _activate(z, activation, params, eps), params))
    s = F.linear(tape[-1][1], weights[-1], biases[-1]).squeeze(-1)  # [B, T]
    if normalization == "none":
        w = torch.where(mask, s, 0.0)
    else:
        logits = torch.where(mask, scale * s, float("-inf"))
        m = logits.amax(-1, keepdim=True) if logits.shape[1] else logits.new_zeros(logits.shape[0], 1)
        e = torch.where(mask, torch.exp(logits - torch.where(torch.isfinite(m), m, 0.0)), 0.0)
        denom = e.sum(-1, keepdim=True)
        w = e / torch.where(denom > 0, denom, 1.0)
    out = torch.bmm(w.unsqueeze(1), K).squeeze(1) if with_out else None  # [B, D]
    return out, w, tape


def _first_layer(q, W1, b1, D):
    """``M [B, H1, D]``, ``c [B, H1]`` and the blocks of ``W1`` for a chunk of queries."""
    Wq, Wk, Wd, Wp = W1.split(D, dim=1)
    M = torch.addcmul((Wk - Wd).unsqueeze(0), Wp.unsqueeze(0), q.unsqueeze(1))  # [B, H1, D]
    c = torch.addmm(b1, q, (Wq + Wd).t())  # [B, H1]
    return M, c, Wq, Wd, Wp


def _stats_tensor(stats, cd, device, widths) -> torch.Tensor:
    """``[3, sum(H)]`` (mean, biased var, count) of Dice training; zeros (count 0) for an empty batch."""
    if not stats:
        return torch.zeros(3, sum(widths), dtype=cd, device=device)
    return torch.stack([torch.cat([s[j].expand_as(s[0]) for s in stats]) for j in range(3)])


# elements of a chunk's largest temporary ([b, T, max(D, H1)]): about 4 MB in float32
_CHUNK_ELEMENTS = 1 << 20


def _chunks(B, T, width, device, whole):
    if whole or device.type != "cpu":
        return [(0, B)] if B else []
    step = max(1, _CHUNK_ELEMENTS // max(1, T * width))
    return [(b, min(B, b + step)) for b in range(0, B, step)]


class _Setup:
    """The inputs of one call in the compute dtype, in the padded layout."""

    def __init__(self, query, keys, lengths, offsets, mlp: MLP, cfg: AttentionConfig):
        weights, biases, act_weights, act_means, act_vars = mlp
        activation, training = cfg.activation, cfg.training
        self.cd = cd = compute_dtype(query, keys, *weights, *biases, *act_weights)
        self.K, self.mask, self.index = _padded_inputs(keys, lengths, offsets, cd)
        self.B, self.T, self.D = self.K.shape
        self.q = query.to(cd)
        self.W = [x.to(cd) for x in weights]
        self.b = [x.to(cd) for x in biases]
        self.acts = [x.to(cd) for x in act_weights]
        self.means, self.vars = act_means, act_vars
        self.activation, self.training = activation, training
        whole = activation == "dice" and training
        self.chunks = _chunks(self.B, self.T, max(self.D, self.W[0].shape[0]), self.K.device, whole)

    def forward_chunk(self, b0, b1, normalization, scale, eps, stats, padding_zeroed=False, z1=None, z1_out=None,
                      with_out=True):
        """The forward of samples ``b0:b1``; ``z1`` [b, T, H1]: the first layer's saved pre-activation (skips the
        first layer's matmul); ``z1_out``: where to write it; ``with_out``: form ``v_U`` (the backward needs only
        the weights)."""
        K, mask = self.K[b0:b1], self.mask[b0:b1]
        if padding_zeroed:
            K = K.masked_fill(~mask[..., None], 0.0)
        M, c, Wq, Wd, Wp = _first_layer(self.q[b0:b1], self.W[0], self.b[0], self.D)
        if z1 is None or padding_zeroed:
            z1 = torch.baddbmm(c.unsqueeze(1), K, M.transpose(1, 2), out=z1_out)  # [b, T, H1]
        out, w, tape = _upper(
            z1, K, mask, self.W, self.b, self.acts, self.means, self.vars, self.activation, normalization, scale,
            self.training, eps, self.cd, stats, with_out,
        )
        return K, mask, M, (Wq, Wd, Wp), out, w, tape


def attention_fwd(
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | None,
    offsets: torch.Tensor | None,
    query_offsets: torch.Tensor | None,
    mlp: MLP,
    cfg: AttentionConfig,
    save_z1: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The outputs of ``target_attention_fwd`` (:mod:`din_kernels.ops.schema`): ``(v_U [B, D], w [B, T] or [N],
    dice_stats [3, sum(H)], scores_acc, out_acc, z1)``.

    With ``save_z1`` (a backward will follow), ``z1`` is the first layer's pre-activation, ``[B, T, H1]`` padded or
    ``[N, H1]`` jagged, kept so that the backward need not repeat the dominant matmul; otherwise it is empty.
    ``query_offsets``: several candidates per history (:mod:`.attention_multi`)."""
    if query_offsets is not None:
        from .attention_multi import attention_fwd_multi

        return attention_fwd_multi(query, keys, lengths, offsets, query_offsets, mlp, cfg)
    st = _Setup(query, keys, lengths, offsets, mlp, cfg)
    normalization, scale, eps = cfg.normalization, cfg.scale, cfg.eps
    out = _alloc.empty(st.B, st.D, dtype=st.cd, device=query.device)
    w_all = _alloc.empty(st.B, st.T, dtype=st.cd, device=query.device)
    H1 = st.W[0].shape[0]
    z1_all = _alloc.empty(st.B, st.T, H1, dtype=st.cd, device=query.device) if save_z1 else None
    stats: list = []
    for b0, b1 in st.chunks:
        z1_out = None if z1_all is None else z1_all[b0:b1]
        o, w = st.forward_chunk(b0, b1, normalization, scale, eps, stats, z1_out=z1_out)[4:6]
        # NaN/Inf in the padding must not leak in through 0 * NaN (on the CPU: the check is a sync)
        if st.K.device.type == "cpu" and not bool(torch.isfinite(o).all()):
            stats.clear()
            o, w = st.forward_chunk(b0, b1, normalization, scale, eps, stats, True, z1_out=z1_out)[4:6]
        out[b0:b1] = o
        w_all[b0:b1] = w
    if st.index is not None:
        w_all = padded_to_jagged(w_all, st.index)
        z1_all = None if z1_all is None else padded_to_jagged(z1_all, st.index)
    widths = mlp.widths if cfg.dice_training else []
    z1_all = query.new_empty(0, dtype=st.cd) if z1_all is None else z1_all
    if cfg.softmax:
        scores_acc, out_acc = w_all, out
    else:
        scores_acc, out_acc = query.new_empty(0, dtype=st.cd), query.new_empty(0, st.D, dtype=st.cd)
    out_q, w_q = out.to(query.dtype), w_all.to(query.dtype)
    if out_q is out_acc:  # float32/float64 inputs: the outputs must not alias each other
        out_q, w_q = out_q.clone(), w_q.clone()
    return out_q, w_q, _stats_tensor(stats, st.cd, query.device, widths), scores_acc, out_acc, z1_all


def _chunk_backward(st, b0, b1, go, gs, normalization, scale, eps, dK, z1=None, padding_zeroed=False):
    """Backward of samples ``b0:b1``: writes ``dK`` [b, T, D] (in the compute dtype) and returns ``(dq [b, D],
    this chunk's parameter gradients)``."""
    K, mask, M, (Wq, Wd, Wp), _, w, tape = st.forward_chunk(b0, b1, normalization, scale, eps, [],
                                                              padding_zeroed, z1=z1, with_out=False)
    q = st.q[b0:b1]
    n_hidden = len(st.W) - 1
    part = {"W": [None] * (n_hidden + 1), "b": [None] * (n_hidden + 1), "acts": [None] * len(st.acts)}
    dw = torch.zeros_like(w) if gs is None else gs.clone()
    if go is not None:
        dw = dw + (K * go.unsqueeze(1)).sum(-1)  # a batched matrix-vector product is slow on the CPU
    dw = torch.where(mask, dw, 0.0)
    ds = scale * w * (dw - (w * dw).sum(-1, keepdim=True)) if normalization == "softmax" else dw
    h_last = tape[-1][1]
    part["W"][-1] = ds.reshape(1, -1) @ h_last.reshape(-1, h_last.shape[-1])
    # the softmax is shift invariant: the last bias's gradient is exactly 0 (the sum would leave rounding noise)
    part["b"][-1] = ds.new_zeros(1) if normalization == "softmax" else ds.sum().reshape(1)
    dh = ds.unsqueeze(-1) * st.W[-1][0]  # [b, T, Hn]
    count = st.mask.sum().to(st.cd)
    for i in range(n_hidden - 1, -1, -1):
        z, h, params = tape[i]
        dz, da = _activate_bwd(dh, z, h, st.activation, params, mask, st.training, eps, count)
        if da is not None:
            part["acts"][i] = da
        if i == 0:
            G = dz  # [b, T, H1]
            break
        h_prev = tape[i - 1][1]
        part["W"][i] = dz.reshape(-1, dz.shape[-1]).t() @ h_prev.reshape(-1, h_prev.shape[-1])
        part["b"][i] = dz.sum((0, 1))
        dh = dz @ st.W[i]
    torch.bmm(G, M, out=dK)  # [b, T, D]
    if go is not None:
        dK.addcmul_(w.unsqueeze(-1), go.unsqueeze(1))
    dM = torch.bmm(G.transpose(1, 2), K)  # [b, H1, D]
    dc = G.sum(1)  # [b, H1]
    part["A"] = dM.sum(0)
    part["Wqd"] = dc.t() @ q
    part["b"][0] = dc.sum(0)
    dq = (dM * Wp).sum(1) + dc @ (Wq + Wd)
    part["Wp"] = dM.mul_(q.unsqueeze(1)).sum(0)
    return dq, part


def _accumulate(total, part):
    for key, value in part.items():
        if isinstance(value, list):
            for i, v in enumerate(value):
                if v is not None:
                    total[key][i] = v if total[key][i] is None else total[key][i] + v
        else:
            total[key] = value if total[key] is None else total[key] + value


def attention_bwd(
    grad_out: torch.Tensor | None,
    grad_scores: torch.Tensor | None,
    query: torch.Tensor,
    keys: torch.Tensor,
    lengths: torch.Tensor | None,
    offsets: torch.Tensor | None,
    query_offsets: torch.Tensor | None,
    mlp: MLP,
    saved: AttentionSaved,
    cfg: AttentionConfig,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Gradients ``(d query, d keys, d weights, d biases, d act_weights)`` in the dtypes of their inputs.

    ``saved.z1``: the forward's first-layer pre-activation (see :func:`attention_fwd`), or empty to recompute; Dice
    in training recomputes its batch statistics with the forward (the same values as ``saved.dice_stats``).
    """
    if query_offsets is not None:
        from .attention_multi import attention_bwd_multi

        return attention_bwd_multi(grad_out, grad_scores, query, keys, lengths, offsets, query_offsets, mlp, saved,
                                   cfg)
    weights, biases, act_weights = mlp.weights, mlp.biases, mlp.act_weights
    normalization, scale, eps = cfg.normalization, cfg.scale, cfg.eps
    st = _Setup(query, keys, lengths, offsets, mlp, cfg)
    z1 = saved.z1 if saved.z1.numel() else None
    if z1 is not None and st.index is not None:
        z1 = jagged_to_padded(z1, offsets, st.T)[0]
    cd, D = st.cd, st.D
    H1 = st.W[0].shape[0]
    go = None if grad_out is None else grad_out.to(cd)
    gs = None
    if grad_scores is not None:
        if st.index is not None:
            gs = torch.zeros(st.B + 1, max(st.T, 1), dtype=cd, device=query.device)
            gs[st.index.b_idx, st.index.t_idx] = torch.where(st.index.valid, grad_scores.to(cd), 0)
            gs = gs[: st.B, : st.T]
        else:
            gs = grad_scores.to(cd)
    n = len(st.W)
    grads = {"W": [None] * n, "b": [None] * n, "acts": [None] * len(st.acts), "A": None, "Wp": None, "Wqd": None}
    dq = _alloc.empty(st.B, D, dtype=query.dtype, device=query.device)
    direct = keys.dtype == cd and st.index is None  # write d keys straight into the result
    dK = _alloc.empty(st.B, st.T, D, dtype=cd if not direct else keys.dtype, device=keys.device)
    on_cpu = st.K.device.type == "cpu"
    for b0, b1 in st.chunks:
        args = (None if go is None else go[b0:b1], None if gs is None else gs[b0:b1], normalization, scale, eps,
                dK[b0:b1])
        dq_c, part = _chunk_backward(st, b0, b1, *args, z1=None if z1 is None else z1[b0:b1])
        # NaN/Inf in the padding: redo with it zeroed (on the CPU only: the check is a sync, and on a GPU the
        # padding is zeroed up front)
        if on_cpu and not (bool(torch.isfinite(dq_c).all()) and bool(torch.isfinite(part["A"]).all())):
            dq_c, part = _chunk_backward(st, b0, b1, *args, padding_zeroed=True)
        dq[b0:b1] = dq_c
        _accumulate(grads, part)
    if not st.chunks:  # B = 0
        zero = lambda xs: [torch.zeros_like(x) for x in xs]  # noqa: E731
        grads = {"W": zero(st.W), "b": zero(st.b), "acts": zero(st.acts)}
        grads["A"] = grads["Wp"] = grads["Wqd"] = torch.zeros(H1, D, dtype=cd, device=query.device)
    dWqd, dA = grads["Wqd"], grads["A"]
    grads["W"][0] = torch.cat([dWqd, dA, dWqd - dA, grads["Wp"]], dim=1)
    if st.index is not None:
        dK = padded_to_jagged(dK, st.index)
    dK = dK.to(keys.dtype)
    d_weights = [g.to(x.dtype) for g, x in zip(grads["W"], weights)]
    d_biases = [g.to(x.dtype) for g, x in zip(grads["b"], biases)]
    d_act = [g.to(x.dtype) for g, x in zip(grads["acts"], act_weights)]
    return dq, dK, d_weights, d_biases, d_act
