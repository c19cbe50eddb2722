"""The compiled C++ CPU kernels (backend "cpu", csrc/cpu): every option against the float64 reference, gradcheck in
float64, 64-bit indexing, determinism across runs and thread counts, the ops' own checks of bad input."""

import subprocess
import sys

import pytest
import torch
from helpers import attention_case, compare_to_reference, run_attention

import din_kernels as dk
from din_kernels import _extension

pytestmark = pytest.mark.skipif(not _extension.loaded(), reason="the compiled extension is not built")

ACTIVATIONS = ["sigmoid", "relu", "prelu", "dice"]


@pytest.mark.parametrize("hidden", [(8, 5), (7,), (6, 5, 4)], ids=["2 layers", "1 layer", "3 layers"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(dtype, activation, normalization, layout, training, hidden):
    case = attention_case(B=6, T=9, D=5, hidden=hidden, activation=activation, seed=31)
    compare_to_reference(case, "cpu", dtype, layout=layout, activation=activation, normalization=normalization,
                         training=training, scale=0.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_wide_layers_and_long_sequences(dtype):
    """Widths up to 256, D not a power of two, sequences longer than one chunk of rows (the chunks' seams)."""
    case = attention_case(B=5, T=300, D=37, hidden=(256, 19), activation="dice", lengths=[300, 0, 1, 299, 150],
                          seed=32, scale=0.2)
    compare_to_reference(case, "cpu", dtype, activation="dice", normalization="softmax", training=True)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_empty_batch_and_empty_sequences(layout, poison):
    for B, T, lengths in ((0, 4, []), (3, 4, [0, 0, 0]), (1, 1, [1]), (2, 0, [0, 0])):
        case = attention_case(B=B, T=T, D=3, hidden=(4,), lengths=lengths, seed=33)
        for normalization in ("none", "softmax"):
            out, w, grads, _ = run_attention(case, "cpu", torch.float32, layout=layout, normalization=normalization)
            assert out.shape == (B, 3) and torch.isfinite(out).all() and torch.isfinite(w).all()
            for name, g in grads.items():
                assert g is not None and torch.isfinite(g).all(), name
            if sum(lengths) == 0:
                assert not out.any() and not w.any()


def test_gradcheck_float64():
    case = attention_case(B=3, T=4, D=3, hidden=(4, 3), activation="dice", seed=34)
    lengths, q, k = case.lengths, case.query.clone(), case.keys.clone()
    W, b, a = [w.clone() for w in case.weights], [x.clone() for x in case.biases], [x.clone() for x in case.act_weights]
    tensors = [q, k, *W, *b, *a]
    for t in tensors:
        t.requires_grad_()
    nW, nb = len(W), len(b)

    def f(q, k, *params):
        return dk.target_attention(q, k, params[:nW], params[nW:nW + nb], lengths, activation="dice",
                                   act_weights=params[nW + nb:], act_means=[torch.zeros(4, dtype=torch.float64),
                                                                            torch.zeros(3, dtype=torch.float64)],
                                   act_vars=[torch.ones(4, dtype=torch.float64), torch.ones(3, dtype=torch.float64)],
                                   normalization="softmax", training=True, return_scores=True, backend="cpu")

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7)


def _forward_and_grads(case, **kw):
    out, w, grads, stats = run_attention(case, "cpu", torch.float32, **kw)
    return [out, w, *grads.values(), *stats[0], *stats[1]]


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_bit_for_bit_the_same_for_any_thread_count(activation):
    case = attention_case(B=64, T=40, D=16, hidden=(12, 6), activation=activation, seed=35)
    kw = dict(activation=activation, normalization="softmax", training=True, layout="jagged")
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            first, second = _forward_and_grads(case, **kw), _forward_and_grads(case, **kw)
            for a, b in zip(first, second):
                assert torch.equal(a, b), f"{n} threads: two runs differ"
            results[n] = first
        for a, b in zip(results[1], results[2]):  # fixed groups, summed in a fixed order: the same bits
            assert torch.equal(a, b), "1 and 2 threads differ"
    finally:
        torch.set_num_threads(threads)


_INT64_SCRIPT = r"""
import torch, din_kernels as dk
torch.manual_seed(0)
B, T, D = 2, 1 << 24, 128                       # B * T * D = 2**32 elements: past every 32-bit index
keys = torch.empty(B, T, D, dtype=torch.bfloat16)  # virtual memory only: just the rows below are touched
lengths = torch.tensor([3, 5])
small = torch.randn(B, 5, D).to(torch.bfloat16)
keys[0, :3], keys[1, :5] = small[0, :3], small[1]
query = torch.randn(B, D).to(torch.bfloat16)
m = dk.TargetAttention(D, (8, 4), backend="cpu").to(torch.bfloat16)
with torch.no_grad():
    out, w = m(query, keys, lengths, return_scores=True)
    m.backend = "reference"
    ref, ref_w = m(query, small, lengths, return_scores=True)
err = float((out.double() - ref.double()).norm() / ref.double().norm())
assert err < 3e-2, err
assert torch.allclose(w[:, :5].double(), ref_w.double(), rtol=3e-2, atol=3e-2) and not w[:, 5:].any()
print("ok", err)
"""


def test_64_bit_indexing():
    """A padded batch of 2**32 elements: the second sample's rows start past 2**31 (in a subprocess: a wrong 32-bit
    offset would read out of bounds and crash)."""
    proc = subprocess.run([sys.executable, "-c", _INT64_SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")


def _op_args(B=2, T=3, D=4, hidden=(5,)):
    widths = (4 * D, *hidden, 1)
    W = [torch.randn(o, i) for i, o in zip(widths[:-1], widths[1:])]
    b = [torch.randn(o) for o in widths[1:]]
    return [torch.randn(B, D), torch.randn(B, T, D), torch.tensor([1, 3]), None, None, W, b, [], [], [], "sigmoid",
            "none", 1.0, False, 1e-8, False]


@pytest.mark.parametrize(("index", "value", "pattern"), [
    (0, torch.randn(2, 4, 1), r"query must be 2-D"),
    (1, torch.randn(2, 3), r"keys must be 3-D \[B, T, D\]"),
    (1, torch.randn(3, 3, 4), r"keys has batch size 3 but query has 2"),
    (1, torch.randn(2, 3, 5), r"keys has D = 5 but query has D = 4"),
    (2, torch.tensor([1, 2, 3]), r"lengths must have shape \[2\]"),
    (3, torch.tensor([0, 1, 2]), r"exactly one of lengths"),
    (4, torch.tensor([0, 1, 1, 2]), r"keys has batch size 2 but query_offsets gives U = 3"),
    (4, torch.tensor([0.0, 2.0]), r"query_offsets must be a 1-D integer tensor"),
    (5, [torch.randn(5, 15), torch.randn(1, 5)], r"weights\[0\] must have shape \[H, 16\]"),
    (6, [torch.randn(6), torch.randn(1)], r"biases\[0\] must have shape \[5\]"),
    (10, "gelu", r"activation must be sigmoid, relu, prelu or dice, got 'gelu'"),
    (11, "sparsemax", r"normalization must be none or softmax"),
    (7, [torch.rand(5)], r"act_weights"),
])
def test_direct_op_calls_check_their_arguments(index, value, pattern):
    args = _op_args()
    args[index] = value
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.din_kernels.target_attention_fwd(*args)


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_empty_act_weights_mean_none(activation):
    """sigmoid/relu take act_weights as [] or as one empty tensor per hidden layer (what an AOTInductor package
    passes): the same outputs and gradients, empty gradients for the placeholders; anything else is an error."""
    args = _op_args(hidden=(5, 3))
    args[10] = activation
    ref = torch.ops.din_kernels.target_attention_fwd(*args)
    placeholders = [torch.empty(0), torch.empty(0)]
    got = torch.ops.din_kernels.target_attention_fwd(*args[:7], placeholders, *args[8:])
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    q, keys, lengths, _, _, W, b = args[:7]
    grad_out, grad_scores = torch.randn_like(ref[0]), torch.randn_like(ref[1])

    def bwd(act_weights):
        return torch.ops.din_kernels.target_attention_bwd(
            grad_out, grad_scores, q, keys, lengths, None, None, W, b, act_weights, [], [], *ref[2:], activation,
            "none", 1.0, False, 1e-8)

    expected, actual = bwd([]), bwd(placeholders)
    for e, a in zip(expected[:2], actual[:2]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    for e, a in zip(expected[2] + expected[3], actual[2] + actual[3]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert expected[4] == [] and [t.shape for t in actual[4]] == [torch.Size([0])] * 2
    with pytest.raises(RuntimeError, match=r"sigmoid/relu take no act_weights .* hidden layer: 2\), got 1 tensors"):
        torch.ops.din_kernels.target_attention_fwd(*args[:7], [torch.empty(0)], *args[8:])


def test_dice_op_checks_its_arguments():
    x, alpha = torch.randn(4, 3), torch.rand(3)
    with pytest.raises(RuntimeError, match=r"alpha must have shape \[3\] or \[1\]"):
        torch.ops.din_kernels.dice_fwd(x, None, torch.rand(2), None, None, None, None, True, 1e-8)
    with pytest.raises(RuntimeError, match=r"mask must have shape \[4\]"):
        torch.ops.din_kernels.dice_fwd(x, torch.ones(3, dtype=torch.bool), alpha, None, None, None, None, True, 1e-8)
    with pytest.raises(RuntimeError, match=r"eval mode .* needs running_mean and running_var"):
        torch.ops.din_kernels.dice_fwd(x, None, alpha, None, None, None, None, False, 1e-8)
    with pytest.raises(RuntimeError, match=r"stats must have shape \[3, 3\]"):
        torch.ops.din_kernels.dice_bwd(x, x, None, alpha, None, None, torch.zeros(3, 2), True, 1e-8)


def test_auto_picks_cpu_and_names_the_engine():
    assert dk.backend.resolve("auto", torch.device("cpu"), "target_attention", ("reference", "torch", "cpu")) == "cpu"
    assert torch.ops.din_kernels.build_info().startswith("cpu=")


def test_dice_bit_for_bit_the_same_for_any_thread_count():
    g = torch.Generator().manual_seed(36)
    x, dy = torch.randn(5000, 37, generator=g), torch.randn(5000, 37, generator=g)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            d = dk.Dice(37, backend="cpu")
            xx = x.clone().requires_grad_()
            y = d(xx)
            runs.append([y, *torch.autograd.grad(y, [xx, d.alpha], dy), d.running_mean, d.running_var])
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)
