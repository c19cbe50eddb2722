"""``torch.compile(fullgraph=True)`` and ``torch.export`` of the modules: DIN, BaseModel, MBAEmbedding,
TargetAttention and Dice give the eager results (outputs, every gradient, the Dice running statistics, the MBA
penalty), in training and in eval.

Inductor compiles the pure-PyTorch backends; the Triton backend runs under ``TRITON_INTERPRET=1`` on the CPU, where
inductor cannot build Triton kernels for CPU tensors, so it is compiled with ``backend="aot_eager"`` (Dynamo and
AOTAutograd trace the same graph; the GPU tests of tests/test_triton_attention.py run inductor). Shapes are tiny:
the cost is the compilation.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.export import Dim

import din_kernels as dk
from din_kernels._jagged import offsets_from_lengths
from din_kernels.backend import unavailable_reason
from din_kernels.nn.din import FeatureSchema, Field

SCHEMA = FeatureSchema(item_fields=(Field("goods", 9, 3), Field("cate", 4, 2)), user_fields=(Field("gender", 3, 2),),
                       user_multi_fields=(Field("tags", 5, 2),), context_fields=(Field("slot", 4, 2),))
LENGTHS = [3, 0, 5, 1]
# the kernel backends on the CPU: the compiled extension's "cpu" when it is built
KERNEL_BACKENDS = ["reference", "torch", "triton"] + (["cpu"] if unavailable_reason("cpu", torch.device("cpu"), "")
                                                       is None else [])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compile_backend(backend: str) -> str:
    """Inductor, except for the interpreted Triton kernels (see the module docstring)."""
    return "aot_eager" if backend == "triton" else "inductor"


def model_batch(layout: str, seed: int = 0, lengths: list[int] = LENGTHS) -> dict[str, torch.Tensor]:
    """A batch of ``len(lengths)`` samples with these history lengths: padded ``hist`` [B, max(lengths), 2] or
    jagged [sum(lengths), 2] (by default 4 samples, one with no behaviour: [4, 5, 2] or [9, 2])."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths, default=0)
    ids = lambda vocab, *shape: torch.randint(1, vocab, shape, generator=g)  # noqa: E731
    batch = {"ad": torch.stack([ids(9, B), ids(4, B)], 1), "user": ids(3, B, 1), "tags": ids(5, B, 3),
             "context": ids(4, B, 1)}
    hist = torch.stack([ids(9, B, T), ids(4, B, T)], -1)
    lengths = torch.tensor(lengths, dtype=torch.long)
    if layout == "padded":
        batch["hist"], batch["hist_len"] = hist, lengths
    else:
        batch["hist"] = hist[torch.arange(T)[None, :] < lengths[:, None]]
        batch["hist_offsets"] = offsets_from_lengths(lengths)
    return batch


def assert_same_state(compiled: torch.nn.Module, eager: torch.nn.Module) -> None:
    """Gradients (dense or sparse) and buffers of two copies of a module agree."""
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert p.grad.is_sparse == q.grad.is_sparse, name
            a, b = (p.grad.to_dense(), q.grad.to_dense()) if p.grad.is_sparse else (p.grad, q.grad)
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d {name}: {m}")
    for (name, a), b in zip(compiled.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def check_model(model: torch.nn.Module, batch: dict, backend: str, training: bool) -> None:
    eager = copy.deepcopy(model).train(training)
    model.train(training)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend(backend))
    got, got_w = compiled(batch, return_scores=True)
    want, want_w = eager(batch, return_scores=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_w, want_w)
    (got.square().sum() + got.sum()).backward()
    (want.square().sum() + want.sum()).backward()
    assert_same_state(model, eager)
    torch.testing.assert_close(model.mba_penalty(), eager.mba_penalty())
    assert (float(eager.mba_penalty()) > 0) == training  # the penalty is logged for training steps only


@pytest.mark.parametrize(("cls", "layout", "training", "backend"), [
    (dk.DIN, "jagged", True, "torch"),
    (dk.DIN, "padded", False, "torch"),
    (dk.BaseModel, "padded", True, "torch"),
    (dk.BaseModel, "jagged", False, "torch"),
    (dk.DIN, "padded", True, "triton"),
    (dk.DIN, "jagged", False, "triton"),
    (dk.BaseModel, "jagged", True, "triton"),
    (dk.BaseModel, "padded", False, "triton"),
    (dk.DIN, "jagged", True, "auto"),
    (dk.BaseModel, "padded", False, "auto"),
])
def test_models_compile_fullgraph(cls, layout, training, backend):
    torch.manual_seed(0)
    kw = dict(att_hidden=(4,), att_activation="dice", att_normalization="softmax") if cls is dk.DIN else {}
    model = cls(SCHEMA, mlp_hidden=(6,), activation="dice", mba_lambda=0.1, backend=backend, **kw)
    check_model(model, model_batch(layout), backend, training)


@pytest.mark.parametrize("checks", [True, False])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mba_embedding_compile_fullgraph(sparse, backend, checks):
    """Dense and sparse gradients with the MBA term (lam > 0) and the penalty of the step, with the id check in the
    graph or switched off, on steps with different numbers of ids (dynamic shapes after the first)."""
    torch.manual_seed(0)
    table = dk.MBAEmbedding(9, 3, torch.randint(0, 4, (9,)), 0.2, padding_idx=0, sparse=sparse, backend=backend)
    eager = copy.deepcopy(table)
    compiled = torch.compile(table, fullgraph=True, backend=compile_backend(backend))
    for ids in ((torch.tensor([1, 2, 2]), torch.tensor([[1, 5], [0, 3]])),
                (torch.tensor([4, 2, 8, 8, 0]), torch.tensor([[7, 5, 1], [2, 2, 3], [1, 6, 6]]))):
        table.zero_grad()
        eager.zero_grad()
        with dk.checks(checks):
            got, want = compiled(*ids), eager(*ids)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        for outs in (got, want):
            (outs[0].square().sum() + outs[1].sum()).backward()
        assert_same_state(table, eager)
        torch.testing.assert_close(table.last_penalty, eager.last_penalty)
        assert float(eager.last_penalty) > 0


ATTENTION_CASES = [  # (activation, normalization, layout)
    ("dice", "softmax", "jagged"), ("prelu", "none", "padded"), ("sigmoid", "softmax", "padded"),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "auto"])
def test_target_attention_compile_fullgraph(backend, training):
    for i, (activation, normalization, layout) in enumerate(ATTENTION_CASES):
        torch.manual_seed(i)
        m = dk.TargetAttention(5, hidden=(6, 3), activation=activation, normalization=normalization,
                               backend=backend).train(training)
        eager = copy.deepcopy(m)
        lengths = torch.tensor(LENGTHS)
        q = torch.randn(4, 5)
        if layout == "padded":
            k, kw = torch.randn(4, 5, 5), {"lengths": lengths}
        else:
            k, kw = torch.randn(int(lengths.sum()), 5), {"offsets": offsets_from_lengths(lengths)}
        inputs = [[t.clone().requires_grad_() for t in (q, k)] for _ in range(2)]
        compiled = torch.compile(m, fullgraph=True, backend=compile_backend(backend))
        got, want = compiled(*inputs[0], **kw, return_scores=True), eager(*inputs[1], **kw, return_scores=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        for out in (got, want):
            (out[0].square().sum() + out[1].sum()).backward()
        for a, b in zip(*inputs):
            torch.testing.assert_close(a.grad, b.grad)
        assert_same_state(m, eager)


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "auto"])
def test_dice_compile_fullgraph(backend):
    torch.manual_seed(0)
    module = dk.Dice(6, affine=True, backend=backend)
    with torch.no_grad():
        module.alpha.fill_(0.2)
        module.bias.fill_(0.1)
    eager = copy.deepcopy(module)
    compiled = torch.compile(module, fullgraph=True, backend=compile_backend(backend))
    x = torch.randn(4, 5, 6)
    mask = torch.rand(4, 5) < 0.5
    for training, m in ((True, mask), (True, None), (False, mask)):
        module.train(training)
        eager.train(training)
        got, want = compiled(x, m), eager(x, m)
        torch.testing.assert_close(got, want)
        got.square().sum().backward()
        want.square().sum().backward()
        assert_same_state(module, eager)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
@pytest.mark.parametrize("cls", [dk.DIN, dk.BaseModel])
def test_export_eval(cls, layout):
    """``torch.export.export`` of a model in eval, with the batch size, the padded length and the number of jagged
    rows dynamic: the exported program gives the eager logits on batches of other sizes too, and holds no training
    side effect (the MBA penalty is logged in training only: export would drop its attribute assignment)."""
    torch.manual_seed(0)
    kw = dict(att_hidden=(4,), att_activation="dice", att_normalization="softmax") if cls is dk.DIN else {}
    model = cls(SCHEMA, mlp_hidden=(6,), activation="dice", mba_lambda=0.1, backend="torch", **kw).eval()
    batch = model_batch(layout)
    B, T, N = Dim("B", min=0), Dim("T", min=0), Dim("N", min=0)
    dims = {key: {0: B} for key in batch}
    dims.update({"hist": {0: B, 1: T}} if layout == "padded" else {"hist": {0: N}, "hist_offsets": {0: B + 1}})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*assigned during export")
        exported = torch.export.export(model, (batch,), dynamic_shapes=(dims,))
    assert "mba_penalty" not in str(exported.graph)
    for lengths, seed in ((LENGTHS, 0), ([2, 7, 0, 1, 4, 4], 1), ([0], 2), ([3], 3), ([], 4)):
        other = model_batch(layout, seed, lengths)
        torch.testing.assert_close(exported.module()(other), model(other))
