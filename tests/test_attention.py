"""Target attention (SPEC section 1): the torch backend against the float64 reference, and the reference itself."""

import pytest
import torch
from helpers import attention_case, compare_to_reference, run_attention
from hypothesis import given, settings
from hypothesis import strategies as st

import din_kernels as dk
from din_kernels import _extension
from din_kernels.reference import target_attention_ref

COMPILED = ["cpu"] if _extension.loaded() else []  # the C++ CPU kernels, when built

ACTIVATIONS = ["sigmoid", "relu", "prelu", "dice"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("training", [False, True])
def test_torch_backend_matches_reference(activation, normalization, layout, training):
    case = attention_case(B=5, T=7, D=6, hidden=(8, 5), activation=activation, seed=1)
    compare_to_reference(case, "torch", torch.float32, layout=layout, activation=activation,
                         normalization=normalization, training=training, scale=0.7)


def test_tolerance_catches_a_tenfold_precision_loss(monkeypatch):
    """The torch backend's float32 tolerance (tests/conftest.py) is about 2.5x its worst measured error: an output
    10x less precise (relative error 9e-5 against 9.3e-6) fails the comparison."""
    import din_kernels.torch_impl.attention as impl

    case = attention_case(B=5, T=7, D=6, hidden=(8, 5), seed=1)
    compare_to_reference(case, "torch", torch.float32, normalization="softmax")
    exact = impl.attention_fwd

    def imprecise(*args, **kwargs):
        out, *rest = exact(*args, **kwargs)
        return (out * (1 + 9e-5), *rest)

    monkeypatch.setattr(impl, "attention_fwd", imprecise)
    with pytest.raises(AssertionError, match=r"out: relative error 9\.0\d*e-05 > 2\.5e-05 \(torch"):
        compare_to_reference(case, "torch", torch.float32, normalization="softmax")


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_last_bias_gradient_is_exactly_zero_under_softmax(layout):
    """The softmax is shift invariant: the score's bias gets exactly 0, not the rounding noise of a sum."""
    case = attention_case(B=6, T=9, D=12, hidden=(16, 8), activation="dice", seed=2)
    grads = run_attention(case, "torch", torch.float32, layout, "dice", "softmax", training=True)[2]
    assert torch.equal(grads["biases[2]"], torch.zeros(1))
    assert grads["biases[1]"].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_torch_backend_dtypes(dtype, activation):
    case = attention_case(B=6, T=9, D=12, hidden=(16, 8), activation=activation, seed=2)
    compare_to_reference(case, "torch", dtype, activation=activation, normalization="softmax", training=True)


@pytest.mark.parametrize("hidden", [(7,), (8, 4), (9, 6, 3)])
def test_any_number_of_hidden_layers(hidden):
    case = attention_case(B=4, T=5, D=3, hidden=hidden, activation="prelu", seed=3)
    compare_to_reference(case, "torch", torch.float64, activation="prelu")


def test_chunked_cpu_path_matches_reference(monkeypatch):
    """A batch large enough to span several CPU chunks (the torch path's temporaries are chunked by sample)."""
    import din_kernels.torch_impl.attention as impl

    monkeypatch.setattr(impl, "_CHUNK_ELEMENTS", 64)
    case = attention_case(B=13, T=11, D=5, hidden=(6, 4), seed=4)
    for layout in ("padded", "jagged"):
        compare_to_reference(case, "torch", torch.float64, layout=layout, normalization="softmax")


@pytest.mark.parametrize("backend", ["reference", "torch", *COMPILED])
def test_jagged_equals_padded(backend):
    case = attention_case(B=6, T=8, D=4, activation="relu", seed=5)
    a = run_attention(case, backend, torch.float64, "padded", "relu", "softmax")
    b = run_attention(case, backend, torch.float64, "jagged", "relu", "softmax")
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], msg=name)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_sequences_give_zero_never_nan(normalization, dtype):
    case = attention_case(B=3, T=4, D=5, lengths=[0, 0, 0], seed=6)
    out, w, grads, _ = run_attention(case, "torch", dtype, normalization=normalization)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(w, torch.zeros_like(w))
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("backend", ["reference", "torch", *COMPILED])
def test_empty_batch(layout, backend):
    case = attention_case(B=0, T=3, D=4, lengths=[], seed=7)
    out, w, grads, _ = run_attention(case, backend, torch.float32, layout)
    assert out.shape == (0, 4) and w.shape == (0, 3)
    assert grads["weights[0]"].abs().sum() == 0


def test_padding_content_is_ignored():
    case = attention_case(B=4, T=6, D=3, lengths=[1, 6, 0, 3], seed=8)
    clean = run_attention(case, "torch", torch.float64, normalization="softmax")
    mask = torch.arange(6)[None, :] >= case.lengths[:, None]
    case.keys[mask] = float("nan")
    dirty = run_attention(case, "torch", torch.float64, normalization="softmax")
    torch.testing.assert_close(clean[0], dirty[0])
    for name in clean[2]:
        g = dirty[2][name]
        if name == "keys":
            g = torch.where(mask[..., None], 0.0, g)
        torch.testing.assert_close(clean[2][name], g, msg=name)


def test_nan_in_valid_keys_propagates():
    case = attention_case(B=2, T=3, D=4, lengths=[3, 2], seed=9)
    case.keys[0, 1, 2] = float("nan")
    out = run_attention(case, "torch", torch.float32)[0]
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()


def test_poisoned_outputs_are_all_written(poison):
    case = attention_case(B=7, T=5, D=6, seed=10)
    compare_to_reference(case, "torch", torch.float32, layout="jagged", normalization="softmax")
    compare_to_reference(case, "torch", torch.float32, layout="padded")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_reference_gradcheck(activation, normalization):
    case = attention_case(B=3, T=4, D=2, hidden=(3, 2), activation=activation, lengths=[2, 0, 4], seed=11)
    W = [w.clone().requires_grad_() for w in case.weights]
    b = [x.clone().requires_grad_() for x in case.biases]
    a = [x.clone().requires_grad_() for x in case.act_weights]
    q, k = case.query.clone().requires_grad_(), case.keys.clone().requires_grad_()
    n_w, n_a = len(W), len(a)

    def f(q, k, *params):
        Ws, bs, acts = params[:n_w], params[n_w : 2 * n_w], params[2 * n_w : 2 * n_w + n_a]
        out, w, _ = target_attention_ref(q, k, Ws, bs, case.lengths, None, activation, acts, case.act_means,
                                         case.act_vars, normalization, 0.8, activation == "dice", 1e-5)
        return out, w

    assert torch.autograd.gradcheck(f, (q, k, *W, *b, *a))


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 5),
    T=st.integers(1, 9),
    D=st.integers(1, 13),
    H1=st.integers(1, 9),
    activation=st.sampled_from(ACTIVATIONS),
    normalization=st.sampled_from(["none", "softmax"]),
    layout=st.sampled_from(["padded", "jagged"]),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(B, T, D, H1, activation, normalization, layout, seed):
    case = attention_case(B=B, T=T, D=D, hidden=(H1, 3), activation=activation, seed=seed)
    compare_to_reference(case, "torch", torch.float64, layout=layout, activation=activation,
                         normalization=normalization, training=True)


@pytest.mark.parametrize("backend", ["torch", "triton", *COMPILED])
def test_module_matches_reference_and_updates_dice_running_stats(backend):
    torch.manual_seed(0)
    m = dk.TargetAttention(6, hidden=(8, 4), activation="dice", normalization="softmax", backend=backend)
    ref = dk.TargetAttention(6, hidden=(8, 4), activation="dice", normalization="softmax", backend="reference")
    ref.load_state_dict(m.state_dict())
    q, k, lengths = torch.randn(4, 6), torch.randn(4, 5, 6), torch.tensor([5, 0, 2, 3])
    out, w = m(q, k, lengths, return_scores=True)
    ref_out, ref_w = ref(q, k, lengths, return_scores=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    for a, b in zip(m.activations, ref.activations):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert not torch.equal(a.running_mean, torch.zeros_like(a.running_mean))
    m.eval()
    ref.eval()
    before = [a.running_mean.clone() for a in m.activations]
    torch.testing.assert_close(m(q, k, lengths), ref(q, k, lengths))
    assert all(torch.equal(x, a.running_mean) for x, a in zip(before, m.activations))


def test_module_layout_and_names():
    m = dk.TargetAttention(5, hidden=(7, 3), activation="prelu")
    assert [tuple(x.weight.shape) for x in m.layers] == [(7, 20), (3, 7), (1, 3)]
    assert all(isinstance(a, torch.nn.PReLU) for a in m.activations) and len(m.activations) == 2
    out = m(torch.randn(2, 5), torch.randn(2, 4, 5), torch.tensor([4, 1]))
    assert out.shape == (2, 5)
    with pytest.raises(ValueError, match="hidden"):
        dk.TargetAttention(5, hidden=())


@pytest.mark.parametrize("backend", ["reference", "torch", *COMPILED])
def test_dice_running_stats_follow_batchnorm1d_over_valid_behaviours(backend):
    """The first hidden layer's Dice statistics: nn.BatchNorm1d fed only the valid behaviours' pre-activations."""
    torch.manual_seed(3)
    m = dk.TargetAttention(4, hidden=(6,), activation="dice", backend=backend).double()
    bn = torch.nn.BatchNorm1d(6, momentum=0.1).double()
    q, k, lengths = torch.randn(5, 4).double(), torch.randn(5, 7, 4).double(), torch.tensor([7, 0, 3, 1, 5])
    for _ in range(3):
        m(q, k, lengths)
        valid = torch.arange(7)[None, :] < lengths[:, None]
        x = torch.cat([q[:, None].expand_as(k), k, q[:, None] - k, q[:, None] * k], -1)[valid]
        bn(m.layers[0](x).detach())
    torch.testing.assert_close(m.activations[0].running_mean, bn.running_mean)
    torch.testing.assert_close(m.activations[0].running_var, bn.running_var)


def test_dice_layers_keep_their_own_momentum_and_reset():
    """Each of TargetAttention's Dice layers updates its running statistics with its own momentum."""
    torch.manual_seed(7)
    m = dk.TargetAttention(4, hidden=(5, 3), activation="dice", backend="torch")
    m.activations[0].momentum, m.activations[1].momentum = 0.5, 0.0
    q, k, lengths = torch.randn(3, 4), torch.randn(3, 6, 4), torch.tensor([6, 2, 4])
    m(q, k, lengths)
    assert not torch.equal(m.activations[0].running_mean, torch.zeros(5))
    assert torch.equal(m.activations[1].running_mean, torch.zeros(3))  # momentum 0: unchanged
    assert torch.equal(m.activations[1].running_var, torch.ones(3))
    m.activations[0].reset_running_stats()
    assert torch.equal(m.activations[0].running_mean, torch.zeros(5))
    assert torch.equal(m.activations[0].running_var, torch.ones(5))


def test_dice_layers_that_the_fused_kernels_do_not_cover_are_refused():
    m = dk.TargetAttention(4, hidden=(5, 3), activation="dice", backend="torch")
    q, k, lengths = torch.randn(3, 4), torch.randn(3, 6, 4), torch.tensor([6, 2, 4])
    m.activations[1].eps = 1e-5
    with pytest.raises(ValueError, match=r"share one eps, got \[1e-08, 1e-05\]"):
        m(q, k, lengths)
    m.activations[1] = dk.Dice(3, affine=True)
    with pytest.raises(ValueError, match="no affine variant"):
        m(q, k, lengths)


def test_torch_backward_off_the_cpu_reads_no_value_back():
    """Off the CPU the torch backend's backward must not sync (no bool() of a device tensor): meta tensors, which
    have no values, run it through."""
    from din_kernels._config import MLP, AttentionConfig, AttentionSaved
    from din_kernels.torch_impl import attention as impl

    case = attention_case(B=3, T=4, D=5, hidden=(6, 4), seed=9)
    meta = lambda t: t.float().to("meta")  # noqa: E731
    mlp = MLP([meta(w) for w in case.weights], [meta(b) for b in case.biases], [], [], [])
    cfg = AttentionConfig("sigmoid", "softmax", 1.0, False, 1e-8)
    q, k, lengths = meta(case.query), meta(case.keys), case.lengths.to("meta")
    empty = torch.empty(0, device="meta")
    saved = AttentionSaved(torch.empty(3, 0, device="meta"), empty, torch.empty(0, 5, device="meta"), empty)
    dq, dkeys, dw, db, da = impl.attention_bwd(meta(case.grad_out), meta(case.grad_scores), q, k, lengths, None, None,
                                               mlp, saved, cfg)
    assert dq.shape == (3, 5) and dkeys.shape == (3, 4, 5) and dq.device.type == "meta"
