"""Several candidates per history (``query_offsets``): every backend against the reference, which runs the op on
each user's history repeated once per candidate, forward and backward, padded and jagged; the edge cases (users with
no history, users with no candidate, U = 0); bad ``query_offsets``."""

import importlib.util

import pytest
import torch
from conftest import assert_close

import din_kernels as dk
from din_kernels import _extension
from din_kernels._jagged import offsets_from_lengths

BACKENDS = ["torch", *(["triton"] if importlib.util.find_spec("triton") else []),
            *(["cpu"] if _extension.loaded() else [])]


def _case(user_lengths, candidates, T, D=5, hidden=(6, 4), activation="sigmoid", seed=0):
    g = torch.Generator().manual_seed(seed)
    U = len(user_lengths)
    Nq = sum(candidates)
    widths = (4 * D, *hidden, 1)
    params = {
        "weights": [torch.randn(o, i, generator=g, dtype=torch.float64) / i**0.5
                    for i, o in zip(widths[:-1], widths[1:])],
        "biases": [torch.randn(o, generator=g, dtype=torch.float64) * 0.1 for o in widths[1:]],
        "act_weights": [torch.rand(h, generator=g, dtype=torch.float64) * 0.5 for h in hidden]
        if activation in ("prelu", "dice") else [],
        "act_means": [torch.randn(h, generator=g, dtype=torch.float64) * 0.1 for h in hidden]
        if activation == "dice" else [],
        "act_vars": [torch.rand(h, generator=g, dtype=torch.float64) + 0.5 for h in hidden]
        if activation == "dice" else [],
    }
    return {
        "query": torch.randn(Nq, D, generator=g, dtype=torch.float64),
        "keys": torch.randn(U, T, D, generator=g, dtype=torch.float64),
        "lengths": torch.tensor(user_lengths, dtype=torch.long),
        "query_offsets": offsets_from_lengths(torch.tensor(candidates, dtype=torch.long)),
        **params,
    }


def _run(case, backend, dtype, layout, activation, normalization, training, repeated=False):
    """Forward + backward; ``repeated``: the plain op on the explicitly repeated batch (the definition)."""
    cast = lambda t: t.detach().to(dtype).clone().requires_grad_()  # noqa: E731
    q, keys_p = cast(case["query"]), case["keys"].to(dtype).clone()
    lengths, qo = case["lengths"], case["query_offsets"]
    mask = torch.arange(keys_p.shape[1])[None, :] < lengths[:, None]
    W, b = [cast(x) for x in case["weights"]], [cast(x) for x in case["biases"]]
    a = [cast(x) for x in case["act_weights"]]
    means = [x.to(dtype).clone() for x in case["act_means"]]
    variances = [x.to(dtype).clone() for x in case["act_vars"]]
    keys = (keys_p if layout == "padded" else keys_p[mask]).requires_grad_()
    user = torch.repeat_interleave(torch.arange(len(lengths)), qo[1:] - qo[:-1])
    kw = dict(activation=activation, act_weights=a, act_means=means, act_vars=variances, normalization=normalization,
              training=training, return_scores=True, softmax_scale=0.8, backend=backend)
    if repeated:
        if layout == "padded":
            out, w = dk.target_attention(q, keys[user], W, b, lengths[user], **kw)
        else:
            offsets = offsets_from_lengths(lengths)
            rows = torch.cat([torch.arange(offsets[u], offsets[u + 1]) for u in user.tolist()] or
                             [torch.zeros(0, dtype=torch.long)])
            out, w = dk.target_attention(q, keys[rows], W, b, offsets=offsets_from_lengths(lengths[user]), **kw)
    elif layout == "padded":
        out, w = dk.target_attention(q, keys, W, b, lengths, query_offsets=qo, **kw)
    else:
        out, w = dk.target_attention(q, keys, W, b, offsets=offsets_from_lengths(lengths), query_offsets=qo, **kw)
    g = torch.Generator().manual_seed(99)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    gw = torch.randn(w.shape, generator=g, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad((out * go).sum() + (w * gw).sum(), [q, keys, *W, *b, *a], allow_unused=True)
    return [out, w, *grads, *means, *variances]


NAMES = ["out", "scores", "d query", "d keys"]


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize(("activation", "normalization", "training"), [
    ("sigmoid", "none", False), ("prelu", "softmax", False), ("dice", "softmax", True), ("dice", "none", False),
])
def test_reference_is_the_repeated_batch(layout, activation, normalization, training):
    case = _case([4, 0, 6, 2], [3, 2, 1, 4], T=6, activation=activation, seed=1)
    got = _run(case, "reference", torch.float64, layout, activation, normalization, training)
    want = _run(case, "reference", torch.float64, layout, activation, normalization, training, repeated=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize(("activation", "normalization", "training"), [
    ("sigmoid", "none", False), ("relu", "softmax", False), ("prelu", "softmax", False), ("dice", "softmax", True),
    ("dice", "none", False),
])
def test_backends_match_reference(backend, layout, activation, normalization, training):
    # users with no history, with no candidate, and with many
    case = _case([4, 0, 6, 2, 5], [3, 2, 0, 1, 4], T=6, activation=activation, seed=2)
    dtype = torch.float32
    got = _run(case, backend, dtype, layout, activation, normalization, training)
    want = _run(case, "reference", torch.float64, layout, activation, normalization, training)
    for i, (x, y) in enumerate(zip(got, want)):
        assert x is not None and x.dtype == dtype, i
        assert_close(x, y, dtype, NAMES[i] if i < len(NAMES) else f"tensor {i}", backend=backend)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_no_users_and_no_candidates(backend, layout):
    for lengths, candidates in (([], []), ([3, 2], [0, 0]), ([0, 0], [2, 1])):
        case = _case(lengths, candidates, T=3, seed=3)
        out, w, dq, dkeys, *_ = _run(case, backend, torch.float32, layout, "sigmoid", "softmax", False)
        assert out.shape == (sum(candidates), 5) and torch.isfinite(out).all() and torch.isfinite(dkeys).all()
        if sum(lengths) == 0:
            assert not out.any() and not w.any()


def test_bad_query_offsets():
    case = _case([2, 3], [2, 2], T=3, seed=4)
    q, keys, lengths = case["query"].float(), case["keys"].float(), case["lengths"]
    W, b = [x.float() for x in case["weights"]], [x.float() for x in case["biases"]]
    with pytest.raises(ValueError, match=r"query_offsets\[-1\] must equal the number of query rows N = 4, got 3"):
        dk.target_attention(q, keys, W, b, lengths, query_offsets=torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match=r"query_offsets must be non-decreasing"):
        dk.target_attention(q, keys, W, b, lengths, query_offsets=torch.tensor([0, 5, 4]))
    with pytest.raises(ValueError, match=r"keys has batch size 2 but query_offsets gives U = 3"):
        dk.target_attention(q, keys, W, b, lengths, query_offsets=torch.tensor([0, 1, 2, 4]))
    with pytest.raises(TypeError, match=r"query_offsets must be int32 or int64"):
        dk.target_attention(q, keys, W, b, lengths, query_offsets=torch.tensor([0.0, 2.0, 4.0]))
    with dk.checks(False):  # clamped, memory-safe: no error
        for qo in ([0, 9, 2], [-3, 1, 100], [4, 0, 0]):
            for backend in BACKENDS:
                out = dk.target_attention(q, keys, W, b, lengths, query_offsets=torch.tensor(qo), backend=backend)
                assert out.shape == (4, 5) and torch.isfinite(out).all()


def _rank_batch(layout, seed=5):
    from din_kernels.nn.din import FeatureSchema, Field

    g = torch.Generator().manual_seed(seed)
    schema = FeatureSchema(item_fields=(Field("goods", 50, 8), Field("cate", 10, 4)),
                           user_fields=(Field("uid", 20, 4),), context_fields=(Field("hour", 5, 2),))
    U, T = 4, 5
    lengths = torch.tensor([3, 0, 5, 2])
    valid = torch.arange(T)[None] < lengths[:, None]
    hist = torch.stack([torch.randint(1, 50, (U, T), generator=g), torch.randint(1, 10, (U, T), generator=g)], -1)
    hist = hist * valid[..., None]
    batch = {"hist": hist, "hist_len": lengths, "user": torch.randint(1, 20, (U, 1), generator=g),
             "context": torch.randint(1, 5, (U, 1), generator=g)}
    per_user = torch.tensor([2, 3, 0, 4])
    candidates = torch.stack([torch.randint(1, 50, (9,), generator=g), torch.randint(1, 10, (9,), generator=g)], -1)
    user = torch.repeat_interleave(torch.arange(U), per_user)
    repeated = {"hist": hist[user], "hist_len": lengths[user], "user": batch["user"][user],
                "context": batch["context"][user], "ad": candidates}
    if layout == "jagged":
        offsets = offsets_from_lengths(lengths)
        rows = torch.cat([torch.arange(offsets[u], offsets[u + 1]) for u in user.tolist()])
        batch = {**{k: v for k, v in batch.items() if k not in ("hist", "hist_len")}, "hist": hist[valid],
                 "hist_offsets": offsets}
        repeated = {**{k: v for k, v in repeated.items() if k not in ("hist", "hist_len")},
                    "hist": hist[valid][rows], "hist_offsets": offsets_from_lengths(lengths[user])}
    return schema, batch, candidates, offsets_from_lengths(per_user), repeated


@pytest.mark.parametrize("model", ["DIN", "BaseModel"])
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_rank_equals_forward_on_the_repeated_batch(model, backend, layout):
    schema, batch, candidates, candidate_offsets, repeated = _rank_batch(layout)
    torch.manual_seed(0)
    cls = getattr(dk, model)
    m = cls(schema, att_hidden=(6, 3), activation="dice", backend=backend) if model == "DIN" else cls(schema)
    m.eval()
    with torch.no_grad():
        got = m.rank(batch, candidates, candidate_offsets)
        want = m(repeated)
    assert got.shape == (candidates.shape[0],)
    assert_close(got, want, torch.float32, "logits", backend=backend)
    with pytest.raises(ValueError, match=r"candidate_offsets\[-1\] must equal the number of candidates N = 9"):
        m.rank(batch, candidates, candidate_offsets - torch.tensor([0, 0, 0, 0, 1]))
