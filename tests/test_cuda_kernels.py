"""The compiled CUDA kernels (backend "cuda", csrc/cuda).

On any machine: the shared math of csrc/common/math.h that the CUDA kernels use and the CPU kernels do not (compiled
here with the host compiler and checked against finite differences), and the limits the Python side gives for the
cuda backend. With an extension built with its CUDA kernels (.ci/run_cuda builds one for sm_90 on a machine without
a GPU): every compiled op has its CUDA kernel, and the fake kernels give the right shapes, dtypes and devices through
every public entry point. On a GPU (marked ``gpu``, skipped cleanly without one): every option of the three op
families against the float64 reference, as tests/test_cpu_kernels.py does for the CPU kernels."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCES, assert_close
from helpers import attention_case, compare_to_reference, run_attention
from torch._subclasses.fake_tensor import FakeTensorMode

import din_kernels as dk
from din_kernels import _cuda_plan, _extension
from din_kernels._config import MLP
from din_kernels._jagged import offsets_from_lengths
from din_kernels.ops import attention as attention_ops
from din_kernels.ops import dice as dice_ops
from din_kernels.ops import mba as mba_ops
from din_kernels.ops.schema import COMPILED
from din_kernels.reference.dice import dice_ref
from din_kernels.reference.mba import mba_l2_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_built() -> bool:
    return _extension.loaded() and "cuda=1" in torch.ops.din_kernels.build_info()


needs_cuda_build = pytest.mark.skipif(not _cuda_built(), reason="din_kernels._C was built without its CUDA kernels")
ACTIVATIONS = ["sigmoid", "relu", "prelu", "dice"]
GPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def cuda_factor(dtype) -> float:
    """The cuda backend's products take 16-bit operands for 16-bit inputs (M_b, the activations and G rounded to the
    input dtype, float32 accumulation), as the Triton kernels do: held to Triton's 16-bit tolerances until measured;
    float32 inputs run float32 products, held to the cuda entry of the table."""
    if dtype in (torch.bfloat16, torch.float16):
        return TOLERANCES[("triton", dtype)] / TOLERANCES[("cuda", dtype)]
    return 1.0


# ------------------------------------------------------------------------------- the shared math, on the host

_MATH_CHECK = r"""
#include <cmath>
#include <cstdio>
#include "common/math.h"
using namespace din;

static int failures = 0;
static void expect(bool ok, const char* what, double got, double want) {
  if (!ok) { std::printf("FAIL %s: %.17g vs %.17g\n", what, got, want); ++failures; }
}
static bool near(double a, double b, double tol) { return std::fabs(a - b) <= tol * (1 + std::fabs(b)); }

// y(x, alpha, weight, bias) of Dice with the affine gate, statistics fixed
static double dice_y(double x, double alpha, double mean, double r, double w, double b) {
  const double p = sigmoid(w * dice_u(x, mean, r) + b);
  return dice_forward(x, alpha, p);
}

int main() {
  const double h = 1e-6;
  const double xs[] = {-2.5, -0.3, 0.0, 0.7, 3.1}, alphas[] = {0.0, 0.25, 0.9}, ws[] = {1.0, 0.6, 1.7};
  for (double x : xs) for (double alpha : alphas) for (double w : ws) {
    const double mean = 0.2, r = 1.3, b = -0.4, dy = 0.8;
    const double p = sigmoid(w * dice_u(x, mean, r) + b);
    double gp, g, da;
    const double dx = dice_backward_affine(dy, x, alpha, p, r, w, &gp, &g, &da);
    const double fd_x = dy * (dice_y(x + h, alpha, mean, r, w, b) - dice_y(x - h, alpha, mean, r, w, b)) / (2 * h);
    const double fd_a = dy * (dice_y(x, alpha + h, mean, r, w, b) - dice_y(x, alpha - h, mean, r, w, b)) / (2 * h);
    const double fd_w = dy * (dice_y(x, alpha, mean, r, w + h, b) - dice_y(x, alpha, mean, r, w - h, b)) / (2 * h);
    const double fd_b = dy * (dice_y(x, alpha, mean, r, w, b + h) - dice_y(x, alpha, mean, r, w, b - h)) / (2 * h);
    // d/dmean through u: -r * g; d/dr: g * u / r
    const double fd_m = dy * (dice_y(x, alpha, mean + h, r, w, b) - dice_y(x, alpha, mean - h, r, w, b)) / (2 * h);
    expect(near(dx, fd_x, 1e-6), "dx", dx, fd_x);
    expect(near(da, fd_a, 1e-6), "dalpha", da, fd_a);
    expect(near(gp * dice_u(x, mean, r), fd_w, 1e-6), "dweight", gp * dice_u(x, mean, r), fd_w);
    expect(near(gp, fd_b, 1e-6), "dbias", gp, fd_b);
    expect(near(-r * g, fd_m, 1e-6), "dmean", -r * g, fd_m);
    double g1, gp1, da1;
    const double p1 = dice_gate(x, mean, r);
    const double ref = dice_backward(dy, x, alpha, p1, r, &g1, &da1);
    const double aff = dice_backward_affine(dy, x, alpha, p1, r, 1.0, &gp1, &g, &da);
    expect(ref == aff && g1 == g && da1 == da, "affine with weight 1 is dice_backward", aff, ref);
  }
  // the term through the batch statistics: the gradient of sum_j dy_j y_j(x) with mean and r of the x's
  {
    const int n = 5;
    double x[n] = {0.3, -1.2, 2.0, 0.5, -0.1}, dy[n] = {0.7, -0.2, 0.4, 1.1, -0.9};
    const double alpha = 0.3, eps = 1e-3;
    auto loss = [&](const double* v) {
      double m = 0, var = 0;
      for (int j = 0; j < n; ++j) m += v[j] / n;
      for (int j = 0; j < n; ++j) var += (v[j] - m) * (v[j] - m) / n;
      const double r = 1 / std::sqrt(var + eps);
      double s = 0;
      for (int j = 0; j < n; ++j) s += dy[j] * dice_forward(v[j], alpha, dice_gate(v[j], m, r));
      return s;
    };
    double m = 0, var = 0;
    for (int j = 0; j < n; ++j) m += x[j] / n;
    for (int j = 0; j < n; ++j) var += (x[j] - m) * (x[j] - m) / n;
    const double r = 1 / std::sqrt(var + eps);
    double dx[n], sg = 0, sgu = 0;
    for (int j = 0; j < n; ++j) {
      double g, da;
      dx[j] = dice_backward(dy[j], x[j], alpha, dice_gate(x[j], m, r), r, &g, &da);
      sg += g;
      sgu += g * dice_u(x[j], m, r);
    }
    for (int j = 0; j < n; ++j) {
      const double full = dx[j] - dice_stats_term(dice_u(x[j], m, r), r, sg, sgu, 1.0 / n);
      double up[n], dn[n];
      for (int k = 0; k < n; ++k) up[k] = dn[k] = x[k];
      up[j] += h;
      dn[j] -= h;
      const double fd = (loss(up) - loss(dn)) / (2 * h);
      expect(near(full, fd, 1e-5), "dx through the batch statistics", full, fd);
    }
  }
  // BatchNorm1d's running update; a channel without positions or with non-finite statistics keeps its values
  {
    double rm = 0.5, rv = 2.0;
    expect(running_update(&rm, &rv, 1.0, 0.75, 4.0, 0.1) && near(rm, 0.55, 1e-15) && near(rv, 1.9, 1e-15),
           "running update", rv, 1.9);
    double one_m = 0.0, one_v = 1.0;
    expect(running_update(&one_m, &one_v, 3.0, 0.0, 1.0, 0.5) && one_v == 0.5, "one position: unbiased 0", one_v, 0.5);
    double km = 0.5, kv = 2.0;
    expect(!running_update(&km, &kv, 1.0, 1.0, 0.0, 0.1) && km == 0.5 && kv == 2.0, "no position", km, 0.5);
    expect(!running_update(&km, &kv, NAN, 1.0, 3.0, 0.1) && km == 0.5, "NaN mean", km, 0.5);
    expect(!running_update(&km, &kv, 1.0, INFINITY, 3.0, 0.1) && kv == 2.0, "Inf variance", kv, 2.0);
  }
  // Welford's update is merge_moments with one position; the online softmax merge of two halves is the whole
  {
    const float v[6] = {1.5f, -2.f, 0.25f, 3.f, 3.f, -7.f};
    float n = 0, mean = 0, m2 = 0;
    for (float x : v) merge_moments<float>(&n, &mean, &m2, 1.f, x, 0.f);
    double mu = 0, var = 0;  // two passes
    for (float x : v) mu += x / 6.0;
    for (float x : v) var += (x - mu) * (x - mu) / 6.0;
    expect(n == 6 && near(mean, mu, 1e-6) && near(m2 / 6, var, 1e-6), "welford", m2 / 6, var);
    SoftmaxState<double> a, b, all;
    for (int j = 0; j < 6; ++j) { (j < 3 ? a : b).add(v[j]); all.add(v[j]); }
    a.merge(b);
    expect(near(a.max, all.max, 0) && near(a.sum, all.sum, 1e-15), "softmax merge", a.sum, all.sum);
    SoftmaxState<double> empty;
    expect(empty.weight(1.0) == 0.0, "an empty sample's weight is 0", empty.weight(1.0), 0.0);
  }
  std::printf(failures ? "%d failures\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_shared_math_on_the_host(tmp_path):
    """csrc/common/math.h's Dice backward with the affine gate, the term through the batch statistics, the running
    update, Welford's update and the softmax merge (the CUDA kernels' formulas) against finite differences."""
    src = tmp_path / "math_check.cpp"
    src.write_text(_MATH_CHECK)
    exe = tmp_path / "math_check"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT}/csrc", str(src), "-o", str(exe)],
                   check=True, capture_output=True, text=True, timeout=120)
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout


# ------------------------------------------------------------------------------------- what "cuda" covers


def _mlp(D, widths, dtype=torch.float32, activation="sigmoid"):
    dims = (4 * D, *widths, 1)
    weights = [torch.empty(o, i, dtype=dtype) for i, o in zip(dims[:-1], dims[1:])]
    biases = [torch.empty(o, dtype=dtype) for o in dims[1:]]
    acts = [torch.empty(h, dtype=dtype) for h in widths] if activation in ("prelu", "dice") else []
    return MLP(weights, biases, acts, [], [])


@pytest.mark.parametrize(("D", "widths", "dtype", "ok"), [
    (128, (80, 40), torch.bfloat16, True),
    (128, (80, 40), torch.float32, True),
    (256, (80, 40), torch.float32, True),
    (256, (256,), torch.bfloat16, True),
    (37, (256, 19), torch.float16, True),
    (128, (200, 80, 40), torch.bfloat16, True),
    (256, (256,), torch.float32, False),  # M_b alone is 256 KB in float32
    (256, (256, 256, 256), torch.bfloat16, False),
])
def test_cuda_limits_follow_the_shared_memory_plan(D, widths, dtype, ok):
    q, k = torch.empty(2, D, dtype=dtype), torch.empty(2, 3, D, dtype=dtype)
    mlp = _mlp(D, widths, dtype)
    assert _extension.supports_attention("cuda", q, k, mlp) == ok
    f32 = dtype == torch.float32
    launches = {kind: _cuda_plan.cuda_attention_launch(D, widths, f32, kind) for kind in ("fwd", "stats", "bwd")}
    assert all(launch is not None for launch in launches.values()) == ok
    if ok:
        rows, partials, need = launches["bwd"]
        assert need <= _cuda_plan.CUDA_SMEM_PER_BLOCK and rows in (16, 32, 64)
        assert need == _cuda_plan.cuda_attention_smem(D, widths, f32, "bwd", rows, partials)
        assert launches["stats"][2] > _cuda_plan.cuda_attention_smem(D, widths, f32, "fwd", launches["stats"][0])
    if not ok:
        with pytest.raises(ValueError, match=rf"D = {D} with hidden widths .* bytes of shared memory"):
            _extension.check_attention("cuda", q, k, mlp)


def test_cuda_refuses_float64_and_wide_d():
    q, k = torch.empty(2, 8, dtype=torch.float64), torch.empty(2, 3, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"backend 'cuda' supports .* for query, got torch.float64"):
        _extension.check_attention("cuda", q, k, _mlp(8, (4,), torch.float64))
    q, k = torch.empty(2, 8), torch.empty(2, 3, 8)
    with pytest.raises(TypeError, match=r"weights\[0\], got torch.float64"):
        _extension.check_attention("cuda", q, k, _mlp(8, (4,), torch.float64))
    q, k = torch.empty(2, 300, dtype=torch.bfloat16), torch.empty(2, 3, 300, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"D up to 256, got D = 300"):
        _extension.check_attention("cuda", q, k, _mlp(300, (8,), torch.bfloat16))
    assert _extension.check_attention("cpu", torch.empty(2, 8, dtype=torch.float64),
                                      torch.empty(2, 3, 8, dtype=torch.float64), _mlp(8, (4,), torch.float64)) is None


def test_auto_on_cuda_keeps_triton_first():
    """Until a GPU has measured the compiled kernels against Triton, auto on CUDA tensors prefers triton."""
    cuda = torch.device("cuda")
    for op, supported in (("target_attention", attention_ops.SUPPORTED), ("dice", dice_ops.SUPPORTED),
                          ("mba_l2", mba_ops.SUPPORTED)):
        assert "cuda" in supported
        order = [n for n in ("triton", "cuda", "torch") if n in supported]
        assert order[0] == "triton", op
        if _cuda_built():
            assert dk.backend.resolve("auto", cuda, op, tuple(n for n in supported if n != "triton")) == "cuda"


# --------------------------------------------------------------------------- registration and fake kernels


@needs_cuda_build
def test_every_compiled_op_has_its_cuda_kernel():
    for op in COMPILED:
        assert _extension.has_kernel(op, "cuda"), f"din_kernels::{op} has no CUDA kernel"
    for op in COMPILED[:5]:
        assert _extension.has_kernel(op, "cpu"), f"din_kernels::{op} has no CPU kernel"
    assert _extension.unavailable_reason("cuda") is None
    assert "cuda" in mba_ops._OPS and attention_ops.ops("cuda") == attention_ops.ops("cpu")
    assert dk.backend.unavailable_reason("cuda", torch.device("cuda"), "mba_l2") is None


def _fake_attention_inputs(B, T, D, hidden, activation, jagged, dtype):
    """Empty CUDA tensors of one problem (called under FakeTensorMode: no data, no GPU)."""
    dev, N = "cuda", B * T - 3
    empty = lambda *shape: torch.empty(*shape, dtype=dtype, device=dev).requires_grad_()  # noqa: E731
    keys = empty(N, D) if jagged else empty(B, T, D)
    index = {"offsets": torch.empty(B + 1, dtype=torch.long, device=dev)} if jagged else {
        "lengths": torch.empty(B, dtype=torch.long, device=dev)}
    dims = (4 * D, *hidden, 1)
    params = dict(weights=[empty(o, i) for i, o in zip(dims[:-1], dims[1:])], biases=[empty(o) for o in dims[1:]],
                  act_weights=[empty(h) for h in hidden] if activation in ("prelu", "dice") else [],
                  act_means=[torch.empty(h, dtype=dtype, device=dev) for h in hidden] if activation == "dice" else [],
                  act_vars=[torch.empty(h, dtype=dtype, device=dev) for h in hidden] if activation == "dice" else [])
    return empty(B, D), keys, index, params


@needs_cuda_build
@pytest.mark.parametrize("jagged", [False, True], ids=["padded", "jagged"])
@pytest.mark.parametrize(("activation", "normalization", "training", "hidden"), [
    ("sigmoid", "none", False, (8, 5)),
    ("dice", "softmax", True, (7, 6, 5)),
    ("prelu", "softmax", False, (9,)),
    ("dice", "none", False, (8, 4)),
])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_attention_fake_kernels_give_the_shapes(jagged, activation, normalization, training, hidden, dtype):
    """The compiled ops on fake CUDA tensors (no GPU): the functional's outputs, the op's six outputs and the
    backward op's gradients have the shapes, dtypes and device of the contract (autograd's engine itself wants a
    GPU to run on fake CUDA tensors; the autograd formula is the CPU kernels', tested there)."""
    B, T, D = 4, 6, 16
    with FakeTensorMode(allow_non_fake_inputs=False), dk.checks(False):
        q, k, index, params = _fake_attention_inputs(B, T, D, hidden, activation, jagged, dtype)
        out, w = dk.target_attention(q, k, **index, **params, activation=activation, normalization=normalization,
                                     training=training, return_scores=True, backend="cuda")
        assert out.shape == (B, D) and out.dtype == dtype and out.device.type == "cuda"
        assert w.shape == k.shape[:-1] and w.dtype == dtype and out.requires_grad
        fwd, bwd = attention_ops.ops("cuda")
        inputs = (q, k, index.get("lengths"), index.get("offsets"), None, params["weights"], params["biases"],
                  params["act_weights"], params["act_means"], params["act_vars"])
        options = (activation, normalization, 1.0, training, 1e-8)
        with torch.no_grad():
            outs = fwd(*inputs, *options, False)
            dq, dkeys, dw, db, da = bwd(torch.ones_like(out), torch.ones_like(w), *inputs, *outs[2:], *options)
        for g, t in zip([dq, dkeys, *dw, *db, *da], [q, k, *params["weights"], *params["biases"],
                                                     *params["act_weights"]]):
            assert g.shape == t.shape and g.dtype == t.dtype and g.device == t.device
        sum_h = sum(hidden) if activation == "dice" and training else 0
        softmax = normalization == "softmax"
        want = [((B, D), dtype), (tuple(k.shape[:-1]), dtype), ((3, sum_h), torch.float32),
                (tuple(k.shape[:-1]) if softmax else (0,), torch.float32), ((B if softmax else 0, D), torch.float32),
                ((0,), torch.float32)]
        assert [(tuple(o.shape), o.dtype) for o in outs] == want


@needs_cuda_build
def test_attention_fake_kernels_with_several_candidates_per_history():
    U, T, D, Nq = 3, 6, 16, 7
    with FakeTensorMode(), dk.checks(False):
        q, keys, index, params = _fake_attention_inputs(U, T, D, (8,), "sigmoid", False, torch.bfloat16)
        q = torch.empty(Nq, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        qo = torch.empty(U + 1, dtype=torch.long, device="cuda")
        out, w = dk.target_attention(q, keys, **index, **params, query_offsets=qo, normalization="softmax",
                                     return_scores=True, backend="cuda")
        assert out.shape == (Nq, D) and w.shape == (Nq, T) and out.device.type == "cuda"
        fwd, bwd = attention_ops.ops("cuda")
        inputs = (q, keys, index["lengths"], None, qo, params["weights"], params["biases"], [], [], [])
        options = ("sigmoid", "softmax", 1.0, False, 1e-8)
        with torch.no_grad():
            outs = fwd(*inputs, *options, False)
            dq, dkeys, *_ = bwd(torch.ones_like(out), torch.ones_like(w), *inputs, *outs[2:], *options)
        assert outs[3].shape == (Nq, T) and dq.shape == (Nq, D) and dkeys.shape == (U, T, D)


@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("affine", [False, True])
def test_dice_fake_kernels_give_the_shapes(dtype, affine):
    with FakeTensorMode():
        x = torch.empty(5, 7, 12, dtype=dtype, device="cuda").requires_grad_()
        alpha = torch.empty(12, dtype=dtype, device="cuda").requires_grad_()
        weight = torch.empty(12, dtype=dtype, device="cuda").requires_grad_() if affine else None
        bias = torch.empty(12, dtype=dtype, device="cuda").requires_grad_() if affine else None
        rm, rv = torch.zeros(12, dtype=dtype, device="cuda"), torch.ones(12, dtype=dtype, device="cuda")
        mask = torch.empty(5, 7, dtype=torch.bool, device="cuda")
        y = dk.dice(x, alpha, rm, rv, weight, bias, mask, training=True, backend="cuda")
        assert y.shape == x.shape and y.dtype == dtype and y.device.type == "cuda" and y.requires_grad
        fwd, bwd, _ = dice_ops.ops("cuda")
        with torch.no_grad():
            _, stats = fwd(x, mask, alpha, weight, bias, rm, rv, True, 1e-8)
            grads = bwd(torch.ones_like(y), x, mask, alpha, weight, bias, stats, True, 1e-8)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        assert stats.shape == (3, 12) and stats.dtype == acc
        for g, t in zip(grads, (x, alpha, weight, bias)):
            assert g.shape == (t.shape if t is not None else (0,)) and (t is None or g.dtype == t.dtype)


@needs_cuda_build
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mba_fake_kernels_give_the_shapes(sparse, dtype):
    K, D = 50, 8
    with FakeTensorMode(), dk.checks(False):
        fam = mba_ops.ops("cuda")
        weight = torch.empty(K, D, dtype=dtype, device="cuda")
        ids = torch.empty(3, 4, dtype=torch.long, device="cuda")
        counts = torch.empty(K, dtype=torch.long, device="cuda")
        grad = torch.empty(K, D, dtype=dtype, device="cuda")
        assert fam["l2_dense"](weight, grad, ids, counts, 0.1, None).shape == ()
        assert fam["penalty"](weight, ids, counts, 0.1, 0).dtype == dtype
        go = torch.empty(12, D, dtype=dtype, device="cuda")
        assert fam["bwd_dense"](go, ids, weight, counts, 0.1, None).shape == (K, D)
        indices, values = fam["bwd_sparse"](go, ids, weight, counts, 0.1, None)
        assert indices.shape == (12,) and indices.dtype == torch.long and values.shape == (12, D)
        table = dk.MBAEmbedding(K, D, counts=counts, lam=0.1, sparse=sparse, backend="cuda",
                                _weight=torch.empty(K, D, dtype=dtype, device="cuda"))
        out = table(ids)
        assert out.shape == (3, 4, D) and out.dtype == dtype and out.requires_grad


# -------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("hidden", [(8, 5), (7,), (6, 5, 4)], ids=["2 layers", "1 layer", "3 layers"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_matches_reference(dtype, activation, normalization, layout, training, hidden):
    case = attention_case(B=6, T=9, D=5, hidden=hidden, activation=activation, seed=31)
    compare_to_reference(case, "cuda", dtype, factor=cuda_factor(dtype), layout=layout, activation=activation,
                         normalization=normalization, training=training, scale=0.7, device="cuda")


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize(("B", "T", "D", "hidden", "activation", "normalization", "dtype"), [
    (64, 200, 128, (80, 40), "dice", "softmax", torch.bfloat16),   # the headline shape, several tiles a sample
    (64, 200, 128, (80, 40), "sigmoid", "none", torch.float32),
    (16, 300, 37, (256, 19), "dice", "softmax", torch.float16),    # D not a multiple of 8, the widest layer
    (8, 50, 256, (256,), "prelu", "none", torch.bfloat16),         # D = 256, 16-row tiles
    (8, 40, 256, (80, 40), "relu", "softmax", torch.float32),      # float32 at D = 256
    (32, 70, 64, (200, 80, 40), "dice", "none", torch.bfloat16),   # three layers, partial sums in global memory
], ids=["headline-bf16", "headline-fp32", "D37-fp16", "D256-bf16", "D256-fp32", "3-layers"])
def test_gpu_realistic_sizes(B, T, D, hidden, activation, normalization, dtype):
    case = attention_case(B=B, T=T, D=D, hidden=hidden, activation=activation, seed=36, scale=0.3)
    for layout in ("padded", "jagged"):
        compare_to_reference(case, "cuda", dtype, factor=cuda_factor(dtype), layout=layout, activation=activation,
                             normalization=normalization, training=True, device="cuda")


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_gpu_empty_batch_and_empty_sequences(layout, poison):
    for B, T, lengths in ((0, 4, []), (3, 4, [0, 0, 0]), (1, 1, [1]), (2, 0, [0, 0])):
        case = attention_case(B=B, T=T, D=3, hidden=(4,), lengths=lengths, seed=33)
        for normalization in ("none", "softmax"):
            out, w, grads, _ = run_attention(case, "cuda", torch.float32, layout=layout, normalization=normalization,
                                             device="cuda")
            assert out.shape == (B, 3) and torch.isfinite(out).all() and torch.isfinite(w).all()
            for name, g in grads.items():
                assert g is not None and torch.isfinite(g).all(), name
            if sum(lengths) == 0:
                assert not out.any() and not w.any()


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_gpu_deterministic(activation):
    """Two runs give the same bits: every batch-summed gradient is a fixed-order sum of per-block partials."""
    case = attention_case(B=300, T=40, D=32, hidden=(24, 12), activation=activation, seed=35)
    kw = dict(activation=activation, normalization="softmax", training=True, layout="jagged", device="cuda")
    first, second = (run_attention(case, "cuda", torch.bfloat16, **kw) for _ in range(2))
    for a, b in zip([first[0], first[1], *first[2].values()], [second[0], second[1], *second[2].values()]):
        assert torch.equal(a, b)


def _candidates_run(case, backend, dtype, layout, activation, normalization, training, device):
    """Forward + backward with ``query_offsets`` (several candidates per history) on ``device``."""
    cast = lambda t: t.detach().to(dtype).to(device).clone().requires_grad_()  # noqa: E731
    q, keys_p = cast(case["query"]), case["keys"].to(dtype).to(device)
    lengths, qo = case["lengths"].to(device), case["query_offsets"].to(device)
    W, b = [cast(x) for x in case["weights"]], [cast(x) for x in case["biases"]]
    a = [cast(x) for x in case["act_weights"]]
    means = [x.to(dtype).to(device).clone() for x in case["act_means"]]
    variances = [x.to(dtype).to(device).clone() for x in case["act_vars"]]
    if layout == "padded":
        keys, index = keys_p.clone().requires_grad_(), {"lengths": lengths}
    else:
        mask = torch.arange(keys_p.shape[1], device=device)[None, :] < lengths[:, None]
        keys, index = keys_p[mask].clone().requires_grad_(), {"offsets": offsets_from_lengths(lengths)}
    out, w = dk.target_attention(q, keys, W, b, **index, query_offsets=qo, activation=activation, act_weights=a,
                                 act_means=means, act_vars=variances, normalization=normalization, training=training,
                                 return_scores=True, softmax_scale=0.8, backend=backend)
    g = torch.Generator().manual_seed(99)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    gw = torch.randn(w.shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), [q, keys, *W, *b, *a])
    return [out, w, *grads, *means, *variances]


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize(("activation", "normalization", "training"), [
    ("sigmoid", "none", False), ("prelu", "softmax", False), ("dice", "softmax", True), ("dice", "none", False),
])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_gpu_several_candidates_per_history(layout, activation, normalization, training, dtype):
    """query_offsets: users with no history, with no candidate and with many; the keys' gradient sums over each
    user's candidates (one block a user, in float32)."""
    from test_candidates import _case

    case = _case([4, 0, 6, 2, 5], [3, 2, 0, 1, 4], T=6, activation=activation, seed=2)
    case = {k: v.to(dtype).double() if isinstance(v, torch.Tensor) and v.is_floating_point() else
            [x.to(dtype).double() for x in v] if isinstance(v, list) else v for k, v in case.items()}
    got = _candidates_run(case, "cuda", dtype, layout, activation, normalization, training, "cuda")
    want = _candidates_run(case, "reference", torch.float64, layout, activation, normalization, training, "cpu")
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == dtype, i
        assert_close(x.cpu(), y, dtype, f"tensor {i}", factor=cuda_factor(dtype), backend="cuda")


def _to_cuda(a):
    if isinstance(a, torch.Tensor):
        t = a.detach().to("cuda")
        return t.requires_grad_() if a.requires_grad else t
    if isinstance(a, list):
        return [_to_cuda(x) for x in a]
    return a


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize(("activation", "normalization", "training", "candidates"), [
    ("sigmoid", "none", False, False), ("dice", "softmax", True, False), ("prelu", "softmax", False, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_opcheck(layout, activation, normalization, training, candidates, dtype):
    """torch.library.opcheck of the compiled ops on CUDA tensors: schema, fake kernels against the CUDA kernels,
    autograd registration, the dispatch under AOT (as tests/test_contract.py does on the CPU)."""
    from test_contract import _attention_args, _detach, _dice_args

    fwd, bwd = attention_ops.ops("cuda")
    case = attention_case(B=4, T=5, D=3, hidden=(6, 4), activation=activation, lengths=[3, 5, 0, 2], seed=20)
    args = _to_cuda(_attention_args(case, layout, activation, normalization, training, dtype, False, candidates))
    torch.library.opcheck(fwd, tuple(args))
    outputs = fwd(*args)
    inputs = [_detach(a) for a in args]
    bwd_args = (torch.randn_like(outputs[0]), torch.randn_like(outputs[1]), *inputs[:10],
                *[_detach(o) for o in outputs[2:]], *inputs[10:15])
    torch.library.opcheck(bwd, bwd_args)
    dfwd, dbwd, update = dice_ops.ops("cuda")
    dargs = _to_cuda(_dice_args(dtype, training))
    torch.library.opcheck(dfwd, tuple(dargs))
    y, stats = dfwd(*dargs)
    x, mask, alpha, weight, bias = (_detach(t) for t in dargs[:5])
    torch.library.opcheck(dbwd, (torch.randn_like(y), x, mask, alpha, weight, bias, stats.detach(), training, 1e-5))
    stats = torch.tensor([[0.5, -1.0, 2.0], [1.0, 2.0, 0.5], [4.0, 4.0, 4.0]], device="cuda")
    torch.library.opcheck(update, (torch.zeros(3, device="cuda"), torch.ones(3, device="cuda"), stats, 0.1))


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_gpu_mba_opcheck(padding_idx):
    fam = mba_ops.ops("cuda")
    g = torch.Generator().manual_seed(14)
    weight, grad = torch.randn(23, 7, generator=g).cuda(), torch.randn(23, 7, generator=g).cuda()
    ids = torch.tensor([[5, 3, 5, 0, 11], [5, 5, 5, 17, 3]]).cuda()
    counts = torch.randint(0, 6, (23,), generator=g).cuda()
    torch.library.opcheck(fam["l2_dense"], (weight, grad, ids, counts, 0.3, padding_idx))
    torch.library.opcheck(fam["penalty"], (weight, ids, counts, 0.3, padding_idx))
    for sparse in (False, True):
        torch.library.opcheck(fam["embedding"], (weight.clone().requires_grad_(), ids, counts, 0.3, padding_idx,
                                                 sparse), test_utils=("test_schema", "test_faketensor"))
    go = torch.randn(ids.numel(), 7, generator=g).cuda()
    torch.library.opcheck(fam["bwd_dense"], (go, ids, weight, counts, 0.3, padding_idx))
    torch.library.opcheck(fam["bwd_sparse"], (go, ids, weight, counts, 0.3, padding_idx))


_INT64_SCRIPT = r"""
import torch, din_kernels as dk
torch.manual_seed(0)
B, T, D = 2, 1 << 23, 128                        # B * T * D = 2**31 elements: the second sample starts at 2**30
keys = torch.zeros(B, T, D, dtype=torch.bfloat16, device="cuda")
lengths = torch.tensor([3, 5], device="cuda")
small = torch.randn(B, 5, D, device="cuda").to(torch.bfloat16)
keys[0, :3], keys[1, :5] = small[0, :3], small[1]
keys[1, 5] = float("nan")                        # past the length: never read
query = torch.randn(B, D, device="cuda").to(torch.bfloat16)
m = dk.TargetAttention(D, (8, 4), backend="cuda").to("cuda", torch.bfloat16)
keys.requires_grad_()
out, w = m(query, keys, lengths, return_scores=True)
out.float().sum().backward()
m.backend = "reference"
ref, ref_w = m(query, small, lengths, return_scores=True)
err = float((out.double() - ref.double()).norm() / ref.double().norm())
assert err < 3e-2, err
assert torch.isfinite(keys.grad).all() and not keys.grad[1, 5:].any()
print("ok", err)
"""


@pytest.mark.gpu
@needs_cuda_build
def test_gpu_64_bit_indexing():
    proc = subprocess.run([sys.executable, "-c", _INT64_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


@pytest.mark.gpu
@needs_cuda_build
def test_gpu_checks_off_with_invalid_index_is_memory_safe():
    """lengths past T and offsets out of order, with the checks off: the kernels clamp, nothing out of bounds (run
    under compute-sanitizer by benchmarks/gpu_check.sh)."""
    dev = "cuda"
    m = dk.TargetAttention(16, (8, 4), activation="dice", normalization="softmax", backend="cuda").to(dev)
    q, keys = torch.randn(3, 16, device=dev), torch.randn(3, 5, 16, device=dev, requires_grad=True)
    with dk.checks(False):
        out = m(q, keys, torch.tensor([7, -2, 5], device=dev))
        out.sum().backward()
        jagged = torch.randn(9, 16, device=dev, requires_grad=True)
        out = m(q, jagged, offsets=torch.tensor([0, 12, 3, -1], device=dev))
        out.sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(keys.grad).all()


def _dice_case(shape, mask, affine, scalar_alpha, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64, C = torch.float64, shape[-1]
    m = None if not mask else torch.rand(shape[:-1], generator=g) < 0.3
    if m is not None:
        m.view(-1)[:2] = True
    return dict(x=torch.randn(*shape, generator=g, dtype=f64) * 1.5 + 0.5, mask=m,
                alpha=torch.rand(1 if scalar_alpha else C, generator=g, dtype=f64) * 0.5,
                weight=torch.rand(C, generator=g, dtype=f64) + 0.5 if affine else None,
                bias=torch.randn(C, generator=g, dtype=f64) * 0.3 if affine else None,
                running_mean=torch.randn(C, generator=g, dtype=f64) * 0.2,
                running_var=torch.rand(C, generator=g, dtype=f64) + 0.5, dy=torch.randn(*shape, generator=g, dtype=f64))


def _run_dice(case, backend, dtype, training, device):
    cast = lambda t: None if t is None else t.to(dtype).to(device).clone().requires_grad_()  # noqa: E731
    x, alpha, weight, bias = (cast(case[k]) for k in ("x", "alpha", "weight", "bias"))
    rm, rv = (case[k].to(dtype).to(device).clone() for k in ("running_mean", "running_var"))
    mask = None if case["mask"] is None else case["mask"].to(device)
    y = dk.dice(x, alpha, rm, rv, weight, bias, mask, training, 0.1, 1e-5, backend)
    inputs = {k: v for k, v in (("x", x), ("alpha", alpha), ("weight", weight), ("bias", bias)) if v is not None}
    grads = torch.autograd.grad((y * case["dy"].to(dtype).to(device)).sum(), list(inputs.values()))
    return y, dict(zip(inputs, grads)), rm, rv


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 5), (3, 11, 6), (4097, 64), (50, 1000)], ids=["NC", "BTC", "tall", "wide"])
@pytest.mark.parametrize("mask", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_dice_matches_reference(dtype, shape, mask, affine, training):
    case = _dice_case(shape, mask, affine, scalar_alpha=shape == (37, 5))
    rounded = {k: v if not isinstance(v, torch.Tensor) or not v.is_floating_point() else v.to(dtype).double()
               for k, v in case.items()}
    y, grads, rm, rv = _run_dice(rounded, "cuda", dtype, training, "cuda")
    ry, rgrads, rrm, rrv = _run_dice(rounded, "reference", torch.float64, training, "cpu")
    assert y.dtype == dtype
    assert_close(y.cpu(), ry, dtype, "y", backend="cuda")
    for name, g in rgrads.items():
        assert grads[name].dtype == dtype
        assert_close(grads[name].cpu(), g, dtype, f"d {name}", backend="cuda")
    assert_close(rm.cpu(), rrm, dtype, "running_mean", backend="cuda")
    assert_close(rv.cpu(), rrv, dtype, "running_var", backend="cuda")


@pytest.mark.gpu
@needs_cuda_build
def test_gpu_dice_ref_and_determinism():
    x = torch.randn(100_000, 80, device="cuda")
    alpha = torch.rand(80, device="cuda")
    fwd, bwd, _ = dice_ops.ops("cuda")
    y1, s1 = fwd(x, None, alpha, None, None, None, None, True, 1e-8)
    y2, s2 = fwd(x, None, alpha, None, None, None, None, True, 1e-8)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    dy = torch.randn_like(x)
    assert all(torch.equal(a, b) for a, b in zip(bwd(dy, x, None, alpha, None, None, s1, True, 1e-8),
                                                  bwd(dy, x, None, alpha, None, None, s1, True, 1e-8)))
    ref = dice_ref(x.double().cpu(), alpha.double().cpu(), None, None, None, None, None, True, 1e-8)
    assert_close(y1.cpu(), ref[0], torch.float32, "y", backend="cuda")


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("sparse", [False, True])
def test_gpu_mba_l2_matches_reference(dtype, padding_idx, sparse):
    from test_mba import make_case

    weight, grad, ids, counts = make_case(1, dtype)
    want, want_penalty = mba_l2_ref(weight.double(), grad.double(), ids, counts, 0.3, padding_idx)
    dev = "cuda"
    got = grad.to(dev).to_sparse(1) if sparse else grad.to(dev).clone()
    out, penalty = dk.mba_l2_(weight.to(dev), got, ids.to(dev), counts.to(dev), 0.3, padding_idx, backend="cuda")
    if not sparse:
        assert out is got
    assert penalty.dim() == 0 and penalty.dtype == dtype
    assert_close((out.to_dense() if sparse else out).cpu(), want, dtype, "grad", backend="cuda")
    assert_close(penalty.cpu(), want_penalty, dtype, "penalty", backend="cuda")


@pytest.mark.gpu
@needs_cuda_build
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("lam", [0.4, 0.0])
def test_gpu_mba_embedding_matches_explicit_term(sparse, padding_idx, lam):
    """Two lookups of one table in a step, D wider than one 256-column pass: the term is applied once per id."""
    dev, K, D = "cuda", 40, 300
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(K, D, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 6, (K,), generator=g)
    ad_ids, hist = torch.tensor([5, 22, 8, 0]), torch.randint(0, K, (6, 9), generator=g)
    table = dk.MBAEmbedding(K, D, counts=counts.to(dev), lam=lam, padding_idx=padding_idx, sparse=sparse,
                            backend="cuda", _weight=weight.clone().float().to(dev))
    ad, h = table(ad_ids.to(dev), hist.to(dev))
    go = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (ad, h)]
    ((ad * go[0].float().to(dev)).sum() + (h * go[1].float().to(dev)).sum()).backward()
    w = weight.float().double().clone().requires_grad_()
    loss = sum((torch.nn.functional.embedding(i, w, padding_idx) * gi).sum() for i, gi in zip([ad_ids, hist], go))
    loss.backward()
    want, _ = mba_l2_ref(w.detach(), w.grad, torch.cat([ad_ids, hist.reshape(-1)]), counts, lam, padding_idx)
    got = table.weight.grad
    assert got.is_sparse == sparse
    assert_close(got.to_dense().cpu(), want, torch.float32, "weight grad", backend="cuda")


@pytest.mark.gpu
@needs_cuda_build
def test_gpu_mba_has_no_host_sync_and_is_deterministic():
    dev = "cuda"
    weight = torch.randn(1_000_000, 32, device=dev)
    ids, counts = torch.randint(0, 1_000_000, (8192, 50), device=dev), torch.ones(1_000_000, device=dev)
    go = torch.randn(8192 * 50, 32, device=dev)
    fam = mba_ops.ops("cuda")
    with dk.checks(False):
        torch.cuda.set_sync_debug_mode("error")
        try:
            grads = [fam["bwd_dense"](go, ids, weight, counts, 0.1, None) for _ in range(2)]
            sparse = [fam["bwd_sparse"](go, ids, weight, counts, 0.1, None) for _ in range(2)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(grads[0], grads[1]) and all(torch.equal(a, b) for a, b in zip(*sparse))
