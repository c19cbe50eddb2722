"""din_kernels.compat.deepctr against the installed deepctr-torch 0.3.0: same state_dict keys, same outputs and
gradients."""

import pytest
import torch

deepctr_seq = pytest.importorskip("deepctr_torch.layers.sequence")
deepctr_act = pytest.importorskip("deepctr_torch.layers.activation")

from din_kernels.compat import deepctr as ours  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-2))


def _inputs(B, T, E, dtype, seed, with_empty=True):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, 1, E, generator=g, dtype=dtype)
    keys = torch.randn(B, T, E, generator=g, dtype=dtype)
    lengths = torch.randint(1, T + 1, (B, 1), generator=g)
    lengths[0, 0] = T
    if with_empty:
        lengths[1, 0] = 0
    return query, keys, lengths


def _perturb(module, seed):
    """Moves every parameter off its initial value (the DNN weights start at std 1e-4, PReLU/Dice slopes at 0.25/0)
    so every term of the function matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _run(layer, query, keys, lengths, mask=None):
    q, k = query.clone().requires_grad_(), keys.clone().requires_grad_()
    out = layer(q, k, lengths, mask) if mask is not None else layer(q, k, lengths)
    g = torch.Generator().manual_seed(7)
    (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum().backward()
    grads = {"query": q.grad, "keys": k.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "prelu", "dice", "linear"])
@pytest.mark.parametrize("weight_normalization", [False, True])
@pytest.mark.parametrize("return_score", [False, True])
def test_attention_pooling_matches_deepctr(dtype, activation, weight_normalization, return_score):
    B, T, E, hidden = 7, 5, 6, (9, 4)
    kw = dict(att_hidden_units=hidden, att_activation=activation, weight_normalization=weight_normalization,
              return_score=return_score, embedding_dim=E)
    torch.manual_seed(0)
    peer = deepctr_seq.AttentionSequencePoolingLayer(**kw).to(dtype)
    mine = ours.AttentionSequencePoolingLayer(**kw, backend="torch").to(dtype)
    assert list(mine.state_dict()) == list(peer.state_dict())
    _perturb(peer, 1)
    mine.load_state_dict(peer.state_dict())
    query, keys, lengths = _inputs(B, T, E, dtype, 2)
    for mode in ("train", "eval"):
        peer.train(mode == "train")
        mine.train(mode == "train")
        out_p, grads_p = _run(peer, query, keys, lengths)
        out_m, grads_m = _run(mine, query, keys, lengths)
        assert out_m.shape == out_p.shape == ((B, 1, T) if return_score else (B, 1, E))
        assert _rel(out_m, out_p) <= TOL[dtype], f"{mode} output: {_rel(out_m, out_p):.2e}"
        for name, gp in grads_p.items():
            gm = grads_m[name]
            if gp is None:
                assert gm is None or gm.abs().max() == 0, name
                continue
            assert _rel(gm, gp) <= TOL[dtype] * 10, f"{mode} grad {name}: {_rel(gm, gp):.2e}"
    for name, buf in peer.state_dict().items():  # Dice running statistics moved identically
        assert _rel(mine.state_dict()[name].double(), buf.double()) <= TOL[dtype], name


@pytest.mark.parametrize("activation", ["sigmoid", "dice"])
def test_attention_pooling_supports_masking_matches(activation):
    B, T, E = 5, 6, 4
    kw = dict(att_hidden_units=(8, 3), att_activation=activation, weight_normalization=True,
              supports_masking=True, embedding_dim=E)
    torch.manual_seed(0)
    peer = deepctr_seq.AttentionSequencePoolingLayer(**kw).double()
    mine = ours.AttentionSequencePoolingLayer(**kw).double()
    _perturb(peer, 3)
    mine.load_state_dict(peer.state_dict())
    query, keys, lengths = _inputs(B, T, E, torch.float64, 4)
    mask = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) < 0.6
    mask[0] = True
    out_p, grads_p = _run(peer, query, keys, lengths, mask)
    out_m, grads_m = _run(mine, query, keys, lengths, mask)
    assert _rel(out_m, out_p) <= 1e-10
    for name, gp in grads_p.items():
        assert _rel(grads_m[name], gp) <= 1e-9, name
    with pytest.raises(ValueError, match="supports_masking"):
        mine(query, keys, lengths)


def test_compat_false_uses_spec_semantics():
    """compat=False: a sample without behaviours gives 0 under softmax (DeepCTR-Torch: the mean of its keys), and
    the others are unchanged."""
    B, T, E = 4, 5, 3
    kw = dict(att_hidden_units=(6,), att_activation="sigmoid", weight_normalization=True, embedding_dim=E)
    torch.manual_seed(0)
    peer = deepctr_seq.AttentionSequencePoolingLayer(**kw).double()
    strict = ours.AttentionSequencePoolingLayer(**kw, compat=False).double()
    strict.load_state_dict(peer.state_dict())
    query, keys, lengths = _inputs(B, T, E, torch.float64, 6)
    out_p, out_s = peer(query, keys, lengths), strict(query, keys, lengths)
    assert torch.equal(out_s[1], torch.zeros_like(out_s[1]))
    assert torch.allclose(out_p[1, 0], keys[1].mean(0))
    keep = lengths.view(-1) > 0
    assert torch.allclose(out_s[keep], out_p[keep], atol=1e-12)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dice_matches_deepctr(dim, dtype):
    C = 6
    torch.manual_seed(0)
    peer = deepctr_act.Dice(C, dim=dim).to(dtype)
    mine = ours.Dice(C, dim=dim, backend="torch").to(dtype)
    assert list(mine.state_dict()) == list(peer.state_dict())
    _perturb(peer, 8)
    mine.load_state_dict(peer.state_dict())
    g = torch.Generator().manual_seed(9)
    x = torch.randn((16, C) if dim == 2 else (5, 7, C), generator=g, dtype=dtype) * 2 + 0.5
    dy = torch.randn(x.shape, generator=g, dtype=dtype)
    for mode in (True, False, True):
        peer.train(mode)
        mine.train(mode)
        xp, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        yp, ym = peer(xp), mine(xm)
        (yp * dy).sum().backward()
        (ym * dy).sum().backward()
        assert _rel(ym, yp) <= TOL[dtype]
        assert _rel(xm.grad, xp.grad) <= TOL[dtype] * 10
        for (n, pp), pm in zip(peer.named_parameters(), mine.parameters()):
            assert _rel(pm.grad, pp.grad) <= TOL[dtype] * 10, n
        for n, b in peer.state_dict().items():
            assert _rel(mine.state_dict()[n].double(), b.double()) <= TOL[dtype], n
    with pytest.raises(ValueError, match="dim"):
        ours.Dice(C, dim=4)
