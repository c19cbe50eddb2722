"""One contract per op family: every backend's ops have the schema of din_kernels.ops.schema, and pass
``torch.library.opcheck`` (schema, fake kernel, autograd registration, dispatch) forward and backward."""

import importlib.util

import pytest
import torch
from helpers import attention_case

from din_kernels import _extension
from din_kernels.ops import attention as att_ops
from din_kernels.ops import dice as dice_ops
from din_kernels.ops import mba as mba_ops
from din_kernels.ops.schema import SCHEMAS

PY_BACKENDS = ["reference", "torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
BACKENDS = PY_BACKENDS + (["compiled"] if _extension.loaded() else [])
MBA_BACKENDS = PY_BACKENDS


def _op(name, backend):
    return getattr(torch.ops.din_kernels, name if backend == "compiled" else f"{name}_{backend}").default


def _normalised(schema: str) -> str:
    """A schema without its op name, return names and alias-set letters (``triton_op`` infers them anew)."""
    parsed = torch._C.parse_schema("din_kernels::x" + schema if not schema.startswith("din_kernels") else schema)
    args = []
    for a in parsed.arguments:
        kind = str(a.type).replace("SymInt", "int")
        write = "!" if a.alias_info is not None and a.alias_info.is_write else ""
        args.append(f"{kind}{write} {a.name}")
    returns = [str(r.type) for r in parsed.returns]
    return f"({', '.join(args)}) -> ({', '.join(returns)})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_backend_has_the_one_schema(name, backend):
    if name.startswith("mba") and backend not in MBA_BACKENDS:
        pytest.skip(f"{backend} has no MBA kernels")
    assert _normalised(str(_op(name, backend)._schema)) == _normalised(SCHEMAS[name])


def _detach(a):
    if isinstance(a, torch.Tensor):
        return a.detach()
    if isinstance(a, list):
        return [x.detach() for x in a]
    return a


def _attention_args(case, layout, activation, normalization, training, dtype, save_z1, candidates=False):
    q, k = case.query.to(dtype), case.keys.to(dtype)
    if layout == "padded":
        lengths, offsets = case.lengths, None
    else:
        k, lengths, offsets = case.jagged_keys().to(dtype), None, case.offsets
    query_offsets = None
    if candidates:  # the B query rows as candidates of 2 users (the first two samples' histories)
        B = q.shape[0]
        query_offsets = torch.tensor([0, B // 2, B])
        if layout == "padded":
            k, lengths = k[:2], lengths[:2]
        else:
            k, offsets = k[: int(offsets[2])], offsets[:3]
    f = lambda xs: [x.to(dtype) for x in xs]  # noqa: E731
    args = [q, k, lengths, offsets, query_offsets, f(case.weights), f(case.biases), f(case.act_weights),
            f(case.act_means), f(case.act_vars), activation, normalization, 0.9, training, 1e-8, save_z1]
    for i in (0, 1, 5, 6, 7):  # query, keys, weights, biases, act_weights get gradients
        args[i] = [x.requires_grad_() for x in args[i]] if isinstance(args[i], list) else args[i].requires_grad_()
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize(("activation", "normalization", "training", "candidates"), [
    ("sigmoid", "none", False, False), ("prelu", "softmax", False, False), ("dice", "softmax", True, False),
    ("dice", "none", False, False), ("sigmoid", "softmax", False, True), ("dice", "none", True, True),
])
def test_attention_opcheck(backend, layout, activation, normalization, training, candidates):
    fwd, bwd = att_ops.ops("cpu" if backend == "compiled" else backend)
    case = attention_case(B=4, T=5, D=3, hidden=(6, 4), activation=activation, lengths=[3, 5, 0, 2], seed=20)
    dtype = torch.float64 if backend in ("reference", "torch", "compiled") else torch.float32
    args = _attention_args(case, layout, activation, normalization, training, dtype, backend == "torch",
                           candidates)
    torch.library.opcheck(fwd, tuple(args))
    outputs = fwd(*args)
    assert len(outputs) == 6
    inputs = [_detach(a) for a in args]
    saved = [_detach(o) for o in outputs[2:]]
    variants = [saved] if saved[3].numel() == 0 else [saved, saved[:3] + [saved[3].new_empty(0)]]
    for s in variants:  # with the forward's z1, and without it (recomputed)
        bwd_args = (torch.randn_like(outputs[0]), torch.randn_like(outputs[1]), *inputs[:10], *s, *inputs[10:15])
        torch.library.opcheck(bwd, bwd_args)


def _dice_args(dtype, training, affine=True, masked=True):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 3, generator=g).to(dtype).requires_grad_()
    mask = torch.rand(2, 5, generator=g) > 0.4 if masked else None
    alpha = torch.rand(3, generator=g).to(dtype).requires_grad_()
    weight = (torch.rand(3, generator=g) + 0.5).to(dtype).requires_grad_() if affine else None
    bias = (torch.randn(3, generator=g) * 0.1).to(dtype).requires_grad_() if affine else None
    rm, rv = torch.randn(3, generator=g).to(dtype), (torch.rand(3, generator=g) + 0.5).to(dtype)
    return [x, mask, alpha, weight, bias, rm, rv, training, 1e-5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("affine", "masked"), [(True, True), (False, False)])
def test_dice_opcheck(backend, training, affine, masked):
    fwd, bwd, update = dice_ops.ops("cpu" if backend == "compiled" else backend)
    for dtype in (torch.float32, torch.bfloat16):
        args = _dice_args(dtype, training, affine, masked)
        torch.library.opcheck(fwd, tuple(args))
        y, stats = fwd(*args)
        x, mask, alpha, weight, bias = (_detach(t) for t in args[:5])
        torch.library.opcheck(bwd, (torch.randn_like(y), x, mask, alpha, weight, bias, stats.detach(), training, 1e-5))
    stats = torch.tensor([[0.5, -1.0, 2.0], [1.0, 2.0, 0.5], [4.0, 4.0, 4.0]])
    torch.library.opcheck(update, (torch.zeros(3), torch.ones(3), stats, 0.1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dice_running_update_skips_empty_and_nonfinite_channels(backend):
    update = dice_ops.ops("cpu" if backend == "compiled" else backend)[2]
    stats = torch.tensor([[0.5, -1.0, 2.0, float("nan"), 1.0], [1.0, 2.0, 0.5, 1.0, float("inf")],
                          [4.0, 4.0, 0.0, 4.0, 4.0]])
    rmean, rvar = torch.zeros(5), torch.ones(5)
    update(rmean, rvar, stats, 0.1)
    torch.testing.assert_close(rmean, torch.tensor([0.05, -0.1, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rvar, torch.tensor([0.9 + 0.1 * 4 / 3, 0.9 + 0.2 * 4 / 3, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("backend", MBA_BACKENDS)
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_mba_opcheck(backend, padding_idx):
    fam = mba_ops.ops(backend)
    g = torch.Generator().manual_seed(14)
    weight, grad = torch.randn(23, 7, generator=g), torch.randn(23, 7, generator=g)
    ids = torch.tensor([[5, 3, 5, 0, 11], [5, 5, 5, 17, 3]])
    counts = torch.randint(0, 6, (23,), generator=g)
    torch.library.opcheck(fam["l2_dense"], (weight, grad, ids, counts, 0.3, padding_idx))
    torch.library.opcheck(fam["penalty"], (weight, ids, counts, 0.3, padding_idx))
    for sparse in (False, True):
        torch.library.opcheck(fam["embedding"], (weight.clone().requires_grad_(), ids, counts, 0.3, padding_idx,
                                                 sparse), test_utils=("test_schema", "test_faketensor"))
    go = torch.randn(ids.numel(), 7, generator=g)
    torch.library.opcheck(fam["bwd_dense"], (go, ids, weight, counts, 0.3, padding_idx))
    torch.library.opcheck(fam["bwd_sparse"], (go, ids, weight, counts, 0.3, padding_idx))
