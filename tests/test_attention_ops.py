"""Target attention under torch.compile(fullgraph=True), and the dispatch (opcheck: tests/test_contract.py)."""

import pytest
import torch

import din_kernels as dk


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_torch_compile_fullgraph(activation, layout):
    torch.manual_seed(0)
    m = dk.TargetAttention(6, hidden=(8, 4), activation=activation, normalization="softmax", backend="torch")
    eager = dk.TargetAttention(6, hidden=(8, 4), activation=activation, normalization="softmax", backend="torch")
    eager.load_state_dict(m.state_dict())
    compiled = torch.compile(m, fullgraph=True)
    q = torch.randn(5, 6, requires_grad=True)
    lengths = torch.tensor([3, 0, 7, 1, 4])
    if layout == "padded":
        k = torch.randn(5, 7, 6, requires_grad=True)
        kw = {"lengths": lengths}
    else:
        k = torch.randn(int(lengths.sum()), 6, requires_grad=True)
        kw = {"offsets": dk._jagged.offsets_from_lengths(lengths)}
    out, w = compiled(q, k, **kw, return_scores=True)
    ref_out, ref_w = eager(q, k, **kw, return_scores=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    g = torch.autograd.grad(out.square().sum() + w.sum(), [q, k, *m.parameters()])
    g_ref = torch.autograd.grad(ref_out.square().sum() + ref_w.sum(), [q, k, *eager.parameters()])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(m.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


def test_auto_on_cpu_and_unavailable_backends_raise():
    assert dk.backend.resolve("auto", torch.device("cpu"), "target_attention", ("reference", "torch")) == "torch"
    built = dk._extension.loaded()
    assert dk.backend.resolve("auto", torch.device("cpu"), "target_attention",
                              ("reference", "torch", "cpu")) == ("cpu" if built else "torch")
    q, k, lengths = torch.randn(2, 3), torch.randn(2, 4, 3), torch.tensor([1, 4])
    m = dk.TargetAttention(3, hidden=(4,))
    for name in ("cuda",) if built else ("cuda", "cpu"):
        m.backend = name
        with pytest.raises(dk.BackendUnavailableError, match=repr(name)):
            m(q, k, lengths)
    m.backend = "tpu"
    with pytest.raises(ValueError, match="backend"):
        m(q, k, lengths)


def test_checks_can_be_switched_off():
    q, k = torch.randn(2, 3), torch.randn(2, 4, 3)
    m = dk.TargetAttention(3, hidden=(4,), backend="torch")
    with pytest.raises(ValueError, match="lengths"):
        m(q, k, torch.tensor([1, 5]))
    with dk.checks(False):
        assert not dk.checks_enabled()
        out = m(q, k, torch.tensor([1, 4]))
    assert dk.checks_enabled() and out.shape == (2, 3)
