"""Dice (SPEC section 2): the torch and triton backends against the float64 reference, running statistics against
``nn.BatchNorm1d``, the ops' registration, bad input. Triton runs on the CPU under TRITON_INTERPRET=1 (conftest)."""

import pytest
import torch
from conftest import assert_close
from torch import nn

import din_kernels as dk
from din_kernels import BackendUnavailableError
from din_kernels.ops import dice as dice_ops
from din_kernels.reference.dice import dice_ref
from din_kernels.triton import dice as triton_dice

BACKENDS = ["torch", "triton", *(["cpu"] if dice_ops._OPS.get("compiled") else [])]  # cpu: the C++ kernels
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make_case(shape, mask="none", affine=False, scalar_alpha=False, seed=0, offset=0.5, spread=1.5):
    """float64 inputs of one Dice problem: x ``shape`` [..., C], a mask over ``shape[:-1]``, parameters, running
    statistics and an output gradient."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    C = shape[-1]
    x = torch.randn(*shape, generator=g, dtype=f64) * spread + offset
    if mask == "none":
        m = None
    elif mask == "sparse":  # drops most rows, keeps at least two
        m = torch.rand(shape[:-1], generator=g) < 0.2
        m.view(-1)[:2] = True
    elif mask == "empty":
        m = torch.zeros(shape[:-1], dtype=torch.bool)
    elif mask == "one":
        m = torch.zeros(shape[:-1], dtype=torch.bool)
        m.view(-1)[-1] = True
    else:
        raise ValueError(mask)
    alpha = torch.rand(1 if scalar_alpha else C, generator=g, dtype=f64) * 0.5
    weight = torch.rand(C, generator=g, dtype=f64) + 0.5 if affine else None
    bias = torch.randn(C, generator=g, dtype=f64) * 0.3 if affine else None
    rmean = torch.randn(C, generator=g, dtype=f64) * 0.2
    rvar = torch.rand(C, generator=g, dtype=f64) + 0.5
    dy = torch.randn(*shape, generator=g, dtype=f64)
    return dict(x=x, mask=m, alpha=alpha, weight=weight, bias=bias, running_mean=rmean, running_var=rvar, dy=dy)


def run(case, backend, dtype, training=True, momentum=0.1, eps=1e-5):
    """Forward + backward of ``din_kernels.dice``; returns ``(y, grads dict, running_mean, running_var)``."""
    cast = lambda t: None if t is None else t.to(dtype).clone().requires_grad_()  # noqa: E731
    x, alpha, weight, bias = (cast(case[k]) for k in ("x", "alpha", "weight", "bias"))
    rmean, rvar = case["running_mean"].to(dtype).clone(), case["running_var"].to(dtype).clone()
    y = dk.dice(x, alpha, rmean, rvar, weight, bias, case["mask"], training, momentum, eps, backend)
    inputs = {"x": x, "alpha": alpha, "weight": weight, "bias": bias}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad((y * case["dy"].to(dtype)).sum(), list(inputs.values()))
    return y, dict(zip(inputs, grads)), rmean, rvar


def expected_running(case, momentum=0.1):
    """``nn.BatchNorm1d``'s running statistics after one training step on the selected rows (float64)."""
    x, mask = case["x"], case["mask"]
    C = x.shape[-1]
    rows = x.reshape(-1, C) if mask is None else x.reshape(-1, C)[mask.reshape(-1)]
    rmean, rvar = case["running_mean"].clone(), case["running_var"].clone()
    if rows.shape[0] == 0:
        return rmean, rvar
    if rows.shape[0] == 1:  # BatchNorm1d refuses one row; the unbiased variance is then taken as 0
        return (1 - momentum) * rmean + momentum * rows[0], (1 - momentum) * rvar
    bn = nn.BatchNorm1d(C, momentum=momentum).double()
    bn.running_mean.copy_(rmean)
    bn.running_var.copy_(rvar)
    bn.train()
    bn(rows)
    return bn.running_mean, bn.running_var


def compare(case, backend, dtype, training=True, eps=1e-5, factor=1.0):
    rounded = {k: (v.to(dtype).double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in case.items()}
    y, grads, rmean, rvar = run(rounded, backend, dtype, training, eps=eps)
    ref_y, ref_grads, ref_rmean, ref_rvar = run(rounded, "reference", torch.float64, training, eps=eps)
    assert y.dtype == dtype and y.shape == case["x"].shape
    assert_close(y, ref_y, dtype, "y", factor)
    for name, g in ref_grads.items():
        assert grads[name].dtype == dtype and grads[name].shape == g.shape, name
        assert_close(grads[name], g, dtype, f"d {name}", factor)
    assert_close(rmean, ref_rmean, dtype, "running_mean", factor)
    assert_close(rvar, ref_rvar, dtype, "running_var", factor)
    if training:
        want_mean, want_var = expected_running(rounded)
        assert_close(rmean, want_mean, dtype, "running_mean vs BatchNorm1d", factor)
        assert_close(rvar, want_var, dtype, "running_var vs BatchNorm1d", factor)
    else:
        assert torch.equal(rmean, case["running_mean"].to(dtype)) and torch.equal(rvar, case["running_var"].to(dtype))
    return y, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(37, 5), (3, 11, 6)], ids=["NC", "BTC"])
@pytest.mark.parametrize("mask", ["none", "sparse"])
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_backend_matches_reference(backend, shape, mask, affine, training, poison):
    case = make_case(shape, mask=mask, affine=affine, seed=10 * len(shape) + 2 * (mask == "sparse") + affine)
    compare(case, backend, torch.float32, training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(backend, dtype, poison):
    case = make_case((4, 9, 7), mask="sparse", affine=True, seed=3)
    compare(case, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["empty", "one"])
def test_no_or_one_selected_position(backend, mask):
    """No selected position: statistics 0, running statistics unchanged; one: biased variance 0, unbiased 0."""
    case = make_case((6, 5), mask=mask, affine=True, seed=4)
    compare(case, backend, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_alpha_and_empty_batch(backend):
    compare(make_case((13, 3), scalar_alpha=True, seed=5), backend, torch.float32)
    x = torch.empty(0, 4, requires_grad=True)
    alpha = torch.zeros(4, requires_grad=True)
    rmean, rvar = torch.zeros(4), torch.ones(4)
    y = dk.dice(x, alpha, rmean, rvar, backend=backend)
    y.sum().backward()
    assert y.shape == (0, 4)
    assert torch.equal(rmean, torch.zeros(4)) and torch.equal(rvar, torch.ones(4))
    assert torch.equal(alpha.grad, torch.zeros(4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_weight_or_bias_alone(backend, which):
    case = make_case((11, 4), mask="sparse", affine=True, seed=12)
    case["bias" if which == "weight" else "weight"] = None
    compare(case, backend, torch.float32)


def test_triton_multi_program_reduction_is_accurate(monkeypatch, poison):
    """Small tiles and a program cap force several tiles per program and several programs (the Chan merge of the
    partials); an offset of 1e3 with unit spread would lose the variance to cancellation in naive fp32 sums."""
    monkeypatch.setattr(triton_dice, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(triton_dice, "MAX_REDUCE_PROGRAMS", 3)
    N, C = 300, 5
    block_n, block_c = triton_dice._blocks(C)
    P, tiles_per_prog, _ = triton_dice._reduce_grid(N, C, block_n, block_c)
    assert P > 1 and tiles_per_prog > 1
    for mask in ("none", "sparse"):
        case = make_case((N, C), mask=mask, affine=True, seed=6, offset=1e3, spread=1.0)
        compare(case, "triton", torch.float32)
        stats = triton_dice.batch_stats(case["x"].float(), case["mask"], torch.float32)
        ref_mean, ref_var, ref_n = dice_ref(case["x"].float().double(), case["alpha"], mask=case["mask"])[1:]
        assert_close(stats[1], ref_var, torch.float32, "var")
        assert torch.equal(stats[2], torch.full((C,), float(ref_n)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_channels(backend, poison):
    """C above one channel block (128) and not a power of two."""
    compare(make_case((9, 131), mask="sparse", affine=True, seed=7), backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    case = make_case((10, 6), seed=8)
    x = case["x"].float().t().contiguous().t().requires_grad_()  # column-major [N, C]
    assert not x.is_contiguous()
    alpha = case["alpha"].float().requires_grad_()
    y = dk.dice(x, alpha, backend=backend)
    y.backward(case["dy"].float())
    xr, ar = case["x"].float().double().requires_grad_(), case["alpha"].float().double().requires_grad_()
    yr = dice_ref(xr, ar, eps=1e-8)[0]
    yr.backward(case["dy"].float().double())
    assert_close(y, yr, torch.float32, "y")
    assert_close(x.grad, xr.grad, torch.float32, "d x")
    assert_close(alpha.grad, ar.grad, torch.float32, "d alpha")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_unselected_row_stays_out_of_the_statistics(backend):
    case = make_case((8, 3), mask="sparse", seed=9)
    x = case["x"].clone()
    unselected = (~case["mask"]).nonzero()[0, 0]
    x[unselected] = float("nan")
    y = dk.dice(x, case["alpha"], mask=case["mask"], backend=backend)
    assert torch.isnan(y[unselected]).all()
    others = torch.arange(8) != unselected
    assert torch.isfinite(y[others]).all()
    ref = dice_ref(x, case["alpha"], mask=case["mask"], eps=1e-8)[0]
    assert_close(y[others], ref[others], torch.float64, "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_module(backend):
    """``din_kernels.Dice`` in training (running stats updated) and eval (running stats used, unchanged)."""
    torch.manual_seed(0)
    module = dk.Dice(6, affine=True, backend=backend)
    ref = dk.Dice(6, affine=True, backend="reference")
    with torch.no_grad():
        for m in (module, ref):
            m.alpha.fill_(0.25)
            m.weight.fill_(1.5)
            m.bias.fill_(-0.2)
    x = torch.randn(2, 7, 6)
    mask = torch.rand(2, 7) < 0.5
    mask[0, 0] = True
    assert_close(module(x, mask), ref(x, mask), torch.float32, "train y")
    assert_close(module.running_mean, ref.running_mean, torch.float32, "running_mean")
    assert_close(module.running_var, ref.running_var, torch.float32, "running_var")
    module.eval()
    ref.eval()
    before = module.running_mean.clone()
    assert_close(module(x), ref(x), torch.float32, "eval y")
    assert torch.equal(module.running_mean, before)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("use_mask", [False, True])
def test_reference_gradcheck(training, use_mask):
    case = make_case((7, 3), mask="sparse" if use_mask else "none", affine=True, seed=10)
    leaves = [case[k].clone().requires_grad_() for k in ("x", "alpha", "weight", "bias")]

    def f(x, alpha, weight, bias):
        return dice_ref(x, alpha, case["running_mean"], case["running_var"], weight, bias, case["mask"], training,
                        1e-5)[0]

    assert torch.autograd.gradcheck(f, leaves)


def _op_args(case, dtype, training):
    c = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}
    return c["x"], c["mask"], c["alpha"], c["weight"], c["bias"], c["running_mean"], c["running_var"], training, 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    """The module under ``torch.compile(fullgraph=True)``: output, gradients and running statistics as in eager
    (aot_eager on the CPU, where inductor cannot build Triton kernels for CPU tensors; the GPU test runs inductor)."""
    torch.manual_seed(0)
    module = dk.Dice(6, affine=True, backend=backend)
    eager = dk.Dice(6, affine=True, backend=backend)
    with torch.no_grad():
        for m in (module, eager):
            m.alpha.fill_(0.2)
            m.bias.fill_(0.1)
    x = torch.randn(4, 5, 6, requires_grad=True)
    mask = torch.rand(4, 5) < 0.5
    y = torch.compile(module, fullgraph=True, backend="aot_eager")(x, mask)
    ref = eager(x, mask)
    torch.testing.assert_close(y, ref)
    grads = torch.autograd.grad(y.square().sum(), [x, *module.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *eager.parameters()])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    for a, b in zip(module.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_bad_input(backend):
    x, alpha = torch.randn(4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match=r"alpha.*C = 3.*\(2,\)"):
        dk.dice(x, torch.zeros(2), backend=backend)
    with pytest.raises(ValueError, match=r"running_mean.*\[3\].*\(4,\)"):
        dk.dice(x, alpha, torch.zeros(4), torch.ones(3), backend=backend)
    with pytest.raises(ValueError, match=r"weight.*\[3\].*\(5,\)"):
        dk.dice(x, alpha, weight=torch.ones(5), backend=backend)
    with pytest.raises(TypeError, match=r"mask.*torch.int64"):
        dk.dice(x, alpha, mask=torch.ones(4, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match=r"mask.*\(4,\).*\(5,\)"):
        dk.dice(x, alpha, mask=torch.ones(5, dtype=torch.bool), backend=backend)
    with pytest.raises(TypeError, match=r"x.*torch.int32"):
        dk.dice(torch.ones(4, 3, dtype=torch.int32), alpha, backend=backend)
    with pytest.raises(ValueError, match=r"running_mean and running_var"):
        dk.dice(x, alpha, training=False, backend=backend)
    for bad in (torch.tensor(1.0), torch.randn(3)):
        with pytest.raises(ValueError, match=rf"x must have at least 2 dimensions.*{tuple(bad.shape)}"):
            dk.dice(bad, alpha, backend=backend)


def test_unavailable_backend_is_named():
    with pytest.raises(BackendUnavailableError, match="'cuda'"):
        dk.dice(torch.randn(4, 3), torch.zeros(3), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        dk.dice(torch.randn(4, 3), torch.zeros(3), backend="fast")


def test_auto_on_cpu_is_not_triton():
    want = "cpu" if dice_ops._OPS.get("compiled") is not None else "torch"
    assert dice_ops._backend.resolve("auto", torch.device("cpu"), "dice", dice_ops.SUPPORTED) == want


# --------------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_auto_on_cuda_picks_triton():
    assert dice_ops._backend.resolve("auto", torch.device("cuda"), "dice", dice_ops.SUPPORTED) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_mask", [False, True])
def test_gpu_realistic_sizes(dtype, use_mask):
    """A DIN attention-MLP batch: 2048 samples x 100 behaviours, 80 channels, against the float64 reference."""
    torch.manual_seed(0)
    N, C = 2048 * 100, 80
    dev = "cuda"
    x = (torch.randn(N, C, device=dev, dtype=torch.float64) * 2 + 0.5).to(dtype)
    mask = torch.rand(N, device=dev) < 0.6 if use_mask else None
    alpha = torch.rand(C, device=dev)
    weight, bias = torch.rand(C, device=dev) + 0.5, torch.randn(C, device=dev) * 0.1
    dy = torch.randn(N, C, device=dev, dtype=dtype)
    got, want = [], []
    for backend, dt, out in (("triton", dtype, got), ("reference", torch.float64, want)):
        leaves = [t.to(dt).clone().requires_grad_() for t in (x, alpha, weight, bias)]
        rm, rv = torch.zeros(C, device=dev, dtype=dt), torch.ones(C, device=dev, dtype=dt)
        y = dk.dice(leaves[0], leaves[1], rm, rv, leaves[2], leaves[3], mask, backend=backend)
        grads = torch.autograd.grad((y * dy.to(dt)).sum(), leaves)
        out.extend([y, *grads, rm, rv])
    for name, a, b in zip(["y", "dx", "dalpha", "dweight", "dbias", "running_mean", "running_var"], got, want):
        assert_close(a, b, dtype, name)


@pytest.mark.gpu
def test_gpu_int64_indexing():
    """N * C beyond 2**31 elements: the row offsets need int64 (bf16, about 4.3 GB in, 4.3 GB out)."""
    N, C = 2**31 // 64 + 4096, 64
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    x[-3:] = 3.0
    alpha = torch.full((C,), 0.25, device="cuda")
    y = dk.dice(x, alpha, backend="triton")
    stats = triton_dice.batch_stats(x, None, torch.float32)
    tail = dice_ref(x[-5:].double(), alpha.double(), running_mean=stats[0].double(), running_var=stats[1].double(),
                    training=False, eps=1e-8)[0]
    assert_close(y[-5:], tail, torch.bfloat16, "tail rows")
    assert abs(float(stats[2, 0]) - N) < 1


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    module = dk.Dice(40, affine=True, backend="triton").cuda()
    x = torch.randn(64, 30, 40, device="cuda", requires_grad=True)
    mask = torch.rand(64, 30, device="cuda") < 0.5
    compiled = torch.compile(module, fullgraph=True)
    y = compiled(x, mask)
    y.sum().backward()
    ref = dk.Dice(40, affine=True, backend="reference").cuda()
    assert_close(y, ref(x, mask), torch.float32, "compiled y")


