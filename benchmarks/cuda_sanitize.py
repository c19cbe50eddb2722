"""One small call of every CUDA kernel of csrc/cuda, for ``compute-sanitizer`` (memcheck, racecheck) on a GPU.

    compute-sanitizer --tool memcheck --error-exitcode 3 python3 benchmarks/cuda_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python3 benchmarks/cuda_sanitize.py

Covers the attention forward, Dice statistics and backward kernels (padded and jagged; none and softmax; every
activation; float32's SIMT products and bfloat16/float16's tensor-core products; partial sums in shared and in global
memory; several candidates per history), invalid lengths/offsets/ids with the checks off (the kernels must clamp), the
Dice kernels (mask, affine, training and eval, the running update) and the MBA kernels (dense, sparse, penalty, the
in-place l2). Prints one line a case; exits 1 when a case raises. benchmarks/gpu_check.sh runs it.
"""

from __future__ import annotations

import sys
import traceback

import torch

import din_kernels as dk
from din_kernels.ops import attention as attention_ops

DEV = "cuda"


def _mlp(D, hidden, activation, dtype, g):
    dims = (4 * D, *hidden, 1)
    W = [(torch.randn(o, i, generator=g) / i**0.5).to(DEV, dtype).requires_grad_() for i, o in zip(dims, dims[1:])]
    b = [(torch.randn(o, generator=g) * 0.1).to(DEV, dtype).requires_grad_() for o in dims[1:]]
    a = [torch.rand(h, generator=g).to(DEV, dtype).requires_grad_() for h in hidden] if activation in (
        "prelu", "dice") else []
    means = [torch.zeros(h, device=DEV, dtype=dtype) for h in hidden] if activation == "dice" else []
    variances = [torch.ones(h, device=DEV, dtype=dtype) for h in hidden] if activation == "dice" else []
    return W, b, a, means, variances


def attention_case(B, T, D, hidden, activation, normalization, dtype, jagged, training=True, lengths=None):
    g = torch.Generator().manual_seed(0)
    W, b, a, means, variances = _mlp(D, hidden, activation, dtype, g)
    q = torch.randn(B, D, generator=g).to(DEV, dtype).requires_grad_()
    if lengths is None:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths = torch.as_tensor(lengths)
    if jagged:
        valid = lengths.clamp(0, T)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), valid.cumsum(0)])
        keys = torch.randn(int(offsets[-1]), D, generator=g).to(DEV, dtype).requires_grad_()
        index = {"offsets": offsets.to(DEV)}
    else:
        keys = torch.randn(B, T, D, generator=g).to(DEV, dtype).requires_grad_()
        index = {"lengths": lengths.to(DEV)}
    out, w = dk.target_attention(q, keys, W, b, **index, activation=activation, act_weights=a, act_means=means,
                                 act_vars=variances, normalization=normalization, training=training,
                                 return_scores=True, backend="cuda")
    (out.float().sum() + w.float().square().sum()).backward()
    return out


def attention_invalid_index():
    g = torch.Generator().manual_seed(1)
    W, b, a, means, variances = _mlp(16, (8, 4), "dice", torch.bfloat16, g)
    q = torch.randn(3, 16, generator=g).to(DEV, torch.bfloat16)
    padded = torch.randn(3, 5, 16, generator=g).to(DEV, torch.bfloat16).requires_grad_()
    jagged = torch.randn(7, 16, generator=g).to(DEV, torch.bfloat16).requires_grad_()
    kw = dict(activation="dice", act_weights=a, act_means=means, act_vars=variances, normalization="softmax",
              training=True, backend="cuda")
    with dk.checks(False):
        dk.target_attention(q, padded, W, b, torch.tensor([9, -3, 5], device=DEV), **kw).float().sum().backward()
        dk.target_attention(q, jagged, W, b, offsets=torch.tensor([0, 11, 2, -4], device=DEV),
                            **kw).float().sum().backward()


def attention_candidates():
    """Several candidates per history, straight through the compiled op (users 0..2 with 2, 0 and 3 candidates)."""
    g = torch.Generator().manual_seed(2)
    W, b, a, means, variances = _mlp(16, (8,), "sigmoid", torch.bfloat16, g)
    q = torch.randn(5, 16, generator=g).to(DEV, torch.bfloat16)
    keys = torch.randn(3, 6, 16, generator=g).to(DEV, torch.bfloat16)
    lengths, qo = torch.tensor([4, 6, 2], device=DEV), torch.tensor([0, 2, 2, 5], device=DEV)
    fwd, bwd = attention_ops.ops("cuda")
    options = ("sigmoid", "softmax", 1.0, False, 1e-8)
    outs = fwd(q, keys, lengths, None, qo, W, b, a, means, variances, *options, False)
    bwd(torch.ones_like(outs[0]), torch.ones_like(outs[1]), q, keys, lengths, None, qo, W, b, a, means, variances,
        *outs[2:], *options)


def dice_cases():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for affine in (False, True):
            x = torch.randn(6, 50, 40, generator=g).to(DEV, dtype).requires_grad_()
            alpha = torch.rand(40, generator=g).to(DEV, dtype).requires_grad_()
            weight = torch.rand(40, generator=g).to(DEV, dtype).requires_grad_() if affine else None
            bias = torch.rand(40, generator=g).to(DEV, dtype).requires_grad_() if affine else None
            rm, rv = torch.zeros(40, device=DEV, dtype=dtype), torch.ones(40, device=DEV, dtype=dtype)
            mask = (torch.rand(6, 50, generator=g) < 0.4).to(DEV)
            for training in (True, False):
                dk.dice(x, alpha, rm, rv, weight, bias, mask, training, backend="cuda").float().sum().backward()
            dk.dice(x[..., :37], alpha[:37], rm[:37], rv[:37], backend="cuda").float().sum().backward()  # no 16 B


def mba_cases():
    g = torch.Generator().manual_seed(4)
    K, D = 500, 300
    weight = torch.randn(K, D, generator=g).to(DEV)
    counts = torch.randint(0, 5, (K,), generator=g).to(DEV)
    ids = torch.randint(0, K, (40, 7), generator=g).to(DEV)
    grad = torch.zeros(K, D, device=DEV)
    dk.mba_l2_(weight, grad, ids, counts, 0.1, padding_idx=0, backend="cuda")
    dk.mba_l2_(weight, grad.to_sparse(1), ids, counts, 0.1, backend="cuda")
    for sparse in (False, True):
        table = dk.MBAEmbedding(K, D, counts=counts, lam=0.1, padding_idx=3, sparse=sparse, backend="cuda",
                                _weight=weight.clone())
        ad, hist = table(ids[:, 0], ids)
        (ad.sum() + hist.sum()).backward()
    with dk.checks(False):  # ids outside the table: never read or written
        bad = ids.clone()
        bad[0, :3] = torch.tensor([-5, K, 10 * K], device=DEV)
        table = dk.MBAEmbedding(K, D, counts=counts, lam=0.1, backend="cuda", _weight=weight.clone())
        table(bad).sum().backward()


CASES = {
    "attention bf16 padded sigmoid none": lambda: attention_case(4, 40, 32, (24, 12), "sigmoid", "none",
                                                                 torch.bfloat16, False),
    "attention bf16 jagged dice softmax train": lambda: attention_case(4, 70, 32, (24, 12), "dice", "softmax",
                                                                       torch.bfloat16, True),
    "attention fp16 padded prelu softmax 1 layer": lambda: attention_case(3, 20, 40, (20,), "prelu", "softmax",
                                                                          torch.float16, False),
    "attention fp32 jagged relu none 3 layers": lambda: attention_case(3, 30, 24, (16, 12, 8), "relu", "none",
                                                                       torch.float32, True),
    "attention fp32 padded dice eval": lambda: attention_case(3, 20, 20, (12, 6), "dice", "none", torch.float32,
                                                              False, training=False),
    "attention bf16 partial sums in global memory": lambda: attention_case(3, 40, 64, (200, 80, 40), "dice",
                                                                           "softmax", torch.bfloat16, False),
    "attention bf16 D=256 16-row tiles": lambda: attention_case(2, 20, 256, (256,), "sigmoid", "softmax",
                                                                torch.bfloat16, True),
    "attention invalid lengths/offsets, checks off": attention_invalid_index,
    "attention several candidates per history": attention_candidates,
    "dice": dice_cases,
    "mba": mba_cases,
}


def main() -> int:
    failed = 0
    for name, case in CASES.items():
        try:
            case()
            torch.cuda.synchronize()
            print(f"ok      {name}", flush=True)
        except Exception:  # noqa: BLE001 - every case runs; the failures are reported
            failed += 1
            print(f"FAILED  {name}\n{traceback.format_exc()[-3000:]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
