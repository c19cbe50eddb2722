"""Target attention (SPEC section 1): the Triton backend against the float64 reference.

On the CPU the kernels run under ``TRITON_INTERPRET=1`` (set in conftest.py) on tiny grids; the tests marked ``gpu``
run realistic sizes and skip without a CUDA device.
"""

import pytest
import torch
from helpers import assert_runs_close, attention_case, backend_factor, compare_to_reference, rounded_case, run_attention

import din_kernels as dk

pytest.importorskip("triton")

ACTIVATIONS = ["sigmoid", "relu", "prelu", "dice"]
LOW = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("hidden", [(8, 5), (7,)])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(activation, normalization, layout, training, hidden):
    case = attention_case(B=4, T=7, D=5, hidden=hidden, activation=activation, seed=1)
    compare_to_reference(case, "triton", torch.float32, layout=layout, activation=activation,
                         normalization=normalization, training=training, scale=0.7)


@pytest.mark.parametrize(
    ("B", "T", "D", "hidden"),
    [
        (1, 1, 1, (1,)),  # every block padded from 1
        (3, 9, 12, (8, 5)),
        (5, 3, 7, (17, 3)),  # H1 > 16: a 32-wide block
        (2, 37, 20, (6, 19)),  # several behaviour tiles per sample, D block 32
    ],
)
@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_shapes(B, T, D, hidden, activation):
    case = attention_case(B=B, T=T, D=D, hidden=hidden, activation=activation, seed=B * T + D)
    for layout, normalization in (("padded", "softmax"), ("jagged", "none")):
        compare_to_reference(case, "triton", torch.float32, layout=layout, activation=activation,
                             normalization=normalization, training=True, scale=1.3)


def test_widest_blocks():
    """D and widths up to 256: 256-wide blocks, and a 130-wide layer padded to 256 (under the interpreter; on an
    sm_90 GPU these float32 blocks exceed shared memory and ``check_supported`` refuses them, see below)."""
    case = attention_case(B=2, T=5, D=256, hidden=(256, 130), activation="dice", seed=19)
    compare_to_reference(case, "triton", torch.float32, activation="dice", normalization="softmax", training=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("layout", "normalization", "activation", "hidden"),
                         [("padded", "softmax", "dice", (8, 5)), ("jagged", "none", "prelu", (7,))])
def test_split_dq(monkeypatch, dtype, layout, normalization, activation, hidden):
    """The backward in two launches (``dq`` on its own, chosen when one launch would not fit in shared memory)."""
    from din_kernels.triton import attention as tra

    monkeypatch.setattr(tra, "_split_dq", lambda *args: True)
    case = attention_case(B=5, T=21, D=12, hidden=hidden, activation=activation, seed=23)
    compare_to_reference(case, "triton", dtype, layout=layout, activation=activation, normalization=normalization,
                         training=True, scale=0.9)


def test_shared_memory_envelope():
    """On sm_90 (232448 bytes a block): D = 128, hidden (80, 40) runs in every dtype, float32 with ``dq`` split
    off; float32 at D = 256 and 256-wide layers in any dtype are refused, naming the sizes."""
    from din_kernels.triton import attention as tra

    limit = tra.SM90_SMEM_PER_BLOCK

    def weights(D, hidden):
        dims = [4 * D, *hidden]
        return [torch.zeros(h, d) for d, h in zip(dims, [*hidden, 1])]

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k = torch.zeros(2, 128, dtype=dtype), torch.zeros(2, 3, 128, dtype=dtype)
        tra.check_supported(q, k, weights(128, (80, 40)), smem_limit=limit)
        assert tra._split_dq(tra._precision(q, k), 2, 128, 128, 64, limit) == (dtype == torch.float32)
    q, k = torch.zeros(2, 256), torch.zeros(2, 3, 256)
    with pytest.raises(ValueError, match=r"shared memory.*D = 256 and hidden widths \(80, 40\)"):
        tra.check_supported(q, k, weights(256, (80, 40)), smem_limit=limit)
    tra.check_supported(q.bfloat16(), k.bfloat16(), weights(256, (80, 40)), smem_limit=limit)
    with pytest.raises(ValueError, match="shared memory"):
        tra.check_supported(q.bfloat16(), k.bfloat16(), weights(256, (256, 256)), smem_limit=limit)
    tra.check_supported(q, k, weights(256, (256, 256)))  # CPU tensors under the interpreter: no shared memory


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_dtypes(dtype, activation):
    case = attention_case(B=5, T=9, D=12, hidden=(16, 8), activation=activation, seed=2)
    out, w, grads = compare_to_reference(case, "triton", dtype, layout="jagged", activation=activation,
                                         normalization="softmax", training=True)
    assert grads["keys"].dtype == dtype and out.dtype == dtype


def test_single_prelu_weight_and_no_score_gradient():
    """``nn.PReLU()`` holds one weight for every channel; only ``v_U`` enters the loss (no ``grad_scores``)."""
    case = attention_case(B=4, T=6, D=5, hidden=(8, 5), activation="prelu", seed=3)
    case.act_weights = [a[:1].clone() for a in case.act_weights]
    compare_to_reference(case, "triton", torch.float32, activation="prelu", normalization="softmax",
                         with_scores=False)
    compare_to_reference(case, "triton", torch.float32, activation="prelu", with_scores=False)


def test_only_scores_in_the_loss():
    case = attention_case(B=3, T=5, D=4, hidden=(6,), seed=4)
    q, k = case.query.float().requires_grad_(), case.keys.float().requires_grad_()
    params = [[x.float().requires_grad_() for x in case.weights], [x.float().requires_grad_() for x in case.biases]]
    grads = {}
    for backend in ("triton", "reference"):
        _, w = dk.target_attention(q, k, *params, case.lengths, normalization="softmax", return_scores=True,
                                   backend=backend)
        grads[backend] = torch.autograd.grad((w * case.grad_scores.float()).sum(), [q, k, *params[0]])
    for a, b in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_jagged_equals_padded(layout):
    case = attention_case(B=6, T=8, D=4, hidden=(8, 5), activation="dice", seed=5)
    a = run_attention(case, "triton", torch.float32, "padded", "dice", "softmax", training=True)
    b = run_attention(case, "triton", torch.float32, layout, "dice", "softmax", training=True)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], msg=name)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_empty_sequences_give_zero_never_nan(normalization, dtype, activation, poison):
    case = attention_case(B=3, T=4, D=5, lengths=[0, 0, 0], activation=activation, seed=6)
    for layout in ("padded", "jagged"):
        out, w, grads, stats = run_attention(case, "triton", dtype, layout, activation, normalization,
                                             training=True)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(w, torch.zeros_like(w))
        for name, g in grads.items():
            assert torch.isfinite(g).all(), name
        for s in stats[0] + stats[1]:
            assert torch.isfinite(s).all()


def test_some_empty_sequences(poison):
    case = attention_case(B=5, T=6, D=5, lengths=[0, 6, 0, 2, 0], activation="dice", seed=7)
    for layout in ("padded", "jagged"):
        compare_to_reference(case, "triton", torch.float32, layout=layout, activation="dice",
                             normalization="softmax", training=True)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_empty_batch(layout):
    case = attention_case(B=0, T=3, D=4, lengths=[], seed=8)
    out, w, grads, _ = run_attention(case, "triton", torch.float32, layout, normalization="softmax")
    assert out.shape == (0, 4) and w.shape == (0, 3)
    assert grads["weights[0]"].abs().sum() == 0 and grads["keys"].shape == (0, 3, 4)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_poisoned_outputs_are_all_written(layout, poison):
    case = attention_case(B=7, T=5, D=6, hidden=(8, 5), activation="prelu", seed=10)
    compare_to_reference(case, "triton", torch.float32, layout=layout, activation="prelu", normalization="softmax")
    compare_to_reference(case, "triton", torch.float32, layout=layout, activation="prelu")


def test_padding_content_is_never_read():
    case = attention_case(B=4, T=6, D=3, lengths=[1, 6, 0, 3], seed=11)
    clean = run_attention(case, "triton", torch.float32, normalization="softmax")
    mask = torch.arange(6)[None, :] >= case.lengths[:, None]
    case.keys[mask] = float("nan")
    dirty = run_attention(case, "triton", torch.float32, normalization="softmax")
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])
    for name in clean[2]:
        assert torch.equal(clean[2][name], dirty[2][name]), name


def test_nan_in_valid_keys_propagates():
    case = attention_case(B=2, T=3, D=4, lengths=[3, 2], seed=12)
    case.keys[0, 1, 2] = float("nan")
    out = run_attention(case, "triton", torch.float32)[0]
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()


def test_out_of_range_lengths_are_clamped_without_checks():
    """With the value checks off, lengths outside [0, T] are clamped in the kernel (never out of bounds)."""
    case = attention_case(B=4, T=5, D=4, lengths=[2, 5, 0, 3], seed=13)
    ref = run_attention(case, "triton", torch.float32, normalization="softmax")
    case.lengths = torch.tensor([2, 1000, -7, 3])
    with dk.checks(False):
        got = run_attention(case, "triton", torch.float32, normalization="softmax")
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[2]["keys"], ref[2]["keys"])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\] = \[0, 5\], got values in \[-7, 1000\]"):
        run_attention(case, "triton", torch.float32)


def test_invalid_offsets_stay_in_bounds_without_checks(poison):
    """Forward and backward run (clamped, memory-safe) on offsets that are not a partition; the checks reject them.
    Rows that no sample covers get weight 0 and gradient 0 (never an unwritten buffer)."""
    q, keys = torch.randn(3, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    W = [torch.randn(5, 16, requires_grad=True), torch.randn(1, 5, requires_grad=True)]
    b = [torch.randn(5), torch.randn(1)]
    cases = (([0, 4, 2, 6], []), ([0, 3, 99, 6], []), ([-5, 2, 4, 100], []), ([1, 2, 2, 4], [0, 4, 5]))
    for offsets, uncovered in cases:
        offsets = torch.tensor(offsets)
        with dk.checks(False):
            out, w = dk.target_attention(q, keys, W, b, offsets=offsets, normalization="softmax",
                                         return_scores=True, backend="triton")
            dq, dW, dkeys = torch.autograd.grad(out.sum() + w.sum(), [q, W[0], keys])
        assert out.shape == (3, 4) and w.shape == (6,)
        assert torch.isfinite(dq).all() and torch.isfinite(dW).all() and torch.isfinite(dkeys).all()
        assert not w[uncovered].any() and not dkeys[uncovered].any()
        with pytest.raises(ValueError, match="offsets"):
            dk.target_attention(q, keys, W, b, offsets=offsets, backend="triton")


def test_unsupported_configurations_raise_and_auto_does_not_pick_triton():
    case = attention_case(B=2, T=3, D=4, hidden=(5, 4, 3), seed=14)
    with pytest.raises(ValueError, match=r"1 or 2 hidden layers, got 3 \(hidden widths \(5, 4, 3\)\)"):
        run_attention(case, "triton", torch.float32)
    case = attention_case(B=2, T=3, D=4, hidden=(300,), seed=14)
    with pytest.raises(ValueError, match="up to 256, got D = 4 and hidden widths \\(300,\\)"):
        run_attention(case, "triton", torch.float32)
    case = attention_case(B=2, T=3, D=4, seed=14)
    with pytest.raises(TypeError, match="torch.float64"):
        run_attention(case, "triton", torch.float64)
    # on the CPU "auto" never picks the interpreter
    compare_to_reference(case, "auto", torch.float32)


def test_backward_is_deterministic():
    case = attention_case(B=5, T=7, D=6, hidden=(8, 5), activation="dice", seed=15)
    runs = [run_attention(case, "triton", torch.float32, "jagged", "dice", "softmax", training=True)
            for _ in range(2)]
    for name in runs[0][2]:
        assert torch.equal(runs[0][2][name], runs[1][2][name]), name


def test_torch_compile_fullgraph():
    """``torch.compile(fullgraph=True)`` keeps the kernels: traced through ``triton_op`` (aot_eager on the CPU,
    where inductor cannot build Triton kernels for CPU tensors; the gpu test below runs inductor)."""
    torch.manual_seed(0)
    m = dk.TargetAttention(5, hidden=(8, 4), activation="prelu", normalization="softmax", backend="triton")
    q, k, lengths = torch.randn(3, 5), torch.randn(3, 4, 5), torch.tensor([4, 0, 2])
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(q, k, lengths)
    out.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    ref = m(q, k, lengths)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad)


# ------------------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("activation", "normalization", "layout"),
    [("sigmoid", "none", "padded"), ("dice", "softmax", "jagged"), ("prelu", "softmax", "padded")],
)
def test_gpu_realistic_sizes(dtype, activation, normalization, layout):
    """B = 1024, T = 200, D = 128, hidden (80, 40): every backend against the float64 reference (run on the GPU)."""
    case = rounded_case(attention_case(B=1024, T=200, D=128, hidden=(80, 40), activation=activation, seed=17), dtype)
    kw = dict(layout=layout, activation=activation, normalization=normalization, training=activation == "dice",
              device="cuda")
    ref = run_attention(case, "reference", torch.float64, **kw)
    for backend in ("torch", "triton"):
        assert_runs_close(run_attention(case, backend, dtype, **kw), ref, dtype, backend_factor(backend, dtype))


@pytest.mark.gpu
def test_gpu_auto_picks_triton_and_compiles_with_inductor():
    case = attention_case(B=64, T=50, D=32, hidden=(24, 12), activation="dice", seed=18)
    compare_to_reference(case, "auto", torch.float32, activation="dice", normalization="softmax", training=True,
                         device="cuda")
    torch.manual_seed(0)
    m = dk.TargetAttention(32, hidden=(24, 12), normalization="softmax", backend="triton").cuda()
    q, k = torch.randn(64, 32, device="cuda"), torch.randn(64, 50, 32, device="cuda")
    lengths = torch.randint(0, 51, (64,), device="cuda")
    out = torch.compile(m, fullgraph=True)(q, k, lengths)
    torch.testing.assert_close(out, m(q, k, lengths), rtol=1e-4, atol=1e-5)
