"""Memory-safety fuzzing with the value checks off (SPEC section 5), run as a script in its own process.

``python tests/fuzz_memory.py FAMILY [MAX_EXAMPLES]`` draws random ``lengths``/``offsets``/``ids`` (valid and not:
negative, beyond ``T``/``N``/``K``, decreasing, offsets that are no partition, ``offsets[-1] != N``, int32 and int64
extremes) with a fixed hypothesis seed and runs every op of ``FAMILY`` on every backend available here, forward and
backward, inside ``din_kernels.checks(False)``. With the checks off an op must neither crash nor raise: invalid
indices are clamped and give unspecified, memory-safe results. The process exits 0 when every example ran; a crash
(a signal) or an exception is a failure that ``tests/test_memory_safety.py`` reports.

Out-of-bounds accesses that do not crash are caught too: every input tensor an op reads is a view into a buffer whose
rows before and after it hold NaN, and an in-place target (``mba_l2_``'s dense ``grad``) must leave that guard
untouched. An op that reads a guard row gives a non-finite result in one of the outputs that every backend writes
in full (``v_U``, ``d query``, the parameter gradients, Dice's ``y`` and gradients, the MBA rows), which must be
finite for finite inputs whatever the indices hold.

Families: ``attention`` (padded and jagged, none/softmax, sigmoid/relu/prelu, Dice in training and eval), ``dice``
(masks), ``mba`` (``mba_l2_`` dense and sparse, ``mba_counts``), ``embedding`` (``MBAEmbedding``, dense and sparse
gradients), ``models`` (``BaseModel`` and ``DIN`` on padded and jagged batches).
"""

from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import din_kernels as dk  # noqa: E402
from din_kernels import backend as _backend  # noqa: E402
from din_kernels.nn.din import FeatureSchema, Field  # noqa: E402
from din_kernels.ops import attention as _attention  # noqa: E402
from din_kernels.ops import dice as _dice  # noqa: E402
from din_kernels.ops import mba as _mba  # noqa: E402

SEED = 20261202
GUARD = 3  # NaN rows before and after every guarded tensor
CPU = torch.device("cpu")
EXTREMES = (-(2**62), -(2**31), -(10**6), 10**6, 2**31 - 1, 2**62)


def available(supported: tuple[str, ...], op: str) -> list[str]:
    """The concrete backends of ``supported`` that run ``op`` on the CPU here (``triton`` under the interpreter,
    ``cpu`` once the compiled extension is loaded)."""
    return [b for b in supported if b != "cuda" and _backend.unavailable_reason(b, CPU, op) is None]


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` [R, ...] inside a buffer with ``GUARD`` NaN rows (or elements, for 0-d/1-d) on each side."""
    flat = t.reshape(-1) if t.dim() < 2 else t.reshape(t.shape[0], math.prod(t.shape[1:]))
    pad = (GUARD,) + tuple(flat.shape[1:])
    buf = torch.cat([t.new_full(pad, float("nan")), flat, t.new_full(pad, float("nan"))])
    return buf[GUARD : GUARD + flat.shape[0]].view(t.shape)


def guard_intact(t: torch.Tensor) -> bool:
    """Whether the NaN rows around a :func:`guarded` tensor ``t`` are still NaN."""
    whole = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
    start, end = t.storage_offset(), t.storage_offset() + t.numel()
    return bool(torch.isnan(whole[:start]).all() and torch.isnan(whole[end:]).all())


def finite(name: str, *tensors: torch.Tensor | None) -> None:
    for i, t in enumerate(tensors):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise AssertionError(f"{name}[{i}]: non-finite values (an out-of-bounds read of a guard row?)")


def index_tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    info = torch.iinfo(dtype)
    return torch.tensor([min(max(v, info.min), info.max) for v in values], dtype=dtype)


INDEX_DTYPES = st.sampled_from([torch.int64, torch.int32])


def index_values(bound: int) -> st.SearchStrategy[int]:
    """Mostly near ``[0, bound]``, sometimes far outside it."""
    return st.one_of(st.integers(-3, bound + 3), st.sampled_from(EXTREMES))


@st.composite
def lengths_strategy(draw, B: int, T: int) -> list[int]:
    if draw(st.booleans()):
        return draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    return draw(st.lists(index_values(T), min_size=B, max_size=B))


@st.composite
def offsets_strategy(draw, B: int, N: int) -> list[int]:
    """Offsets ``[B + 1]``: a valid partition of N, one with a wrong end or start, a shuffled (decreasing) one, a
    partition with one entry far off (e.g. [0, 3, 99, 6]) or any values at all."""
    kind = draw(st.sampled_from(["valid", "end", "start", "shuffled", "spike", "any"]))
    if B == 0:
        return [draw(index_values(N))]
    valid = [0, *sorted(draw(st.lists(st.integers(0, N), min_size=B - 1, max_size=B - 1))), N]
    if kind == "valid":
        return valid
    if kind == "end":
        return valid[:-1] + [draw(index_values(N).filter(lambda v: v != N))]
    if kind == "start":
        return [draw(index_values(N).filter(lambda v: v != 0))] + valid[1:]
    if kind == "shuffled":
        return draw(st.permutations(valid))
    if kind == "spike":
        at = draw(st.integers(0, B))
        return valid[:at] + [draw(index_values(N))] + valid[at + 1 :]
    return draw(st.lists(index_values(N), min_size=B + 1, max_size=B + 1))


def fuzz_settings(examples: int):
    def wrap(fn):
        fn = settings(max_examples=examples, deadline=None, database=None, derandomize=False, print_blob=True,
                      suppress_health_check=list(HealthCheck))(fn)
        return seed(SEED)(fn)

    return wrap


# ---------------------------------------------------------------------------------------------------- attention

ATTENTION_CONFIGS = [  # (activation, normalization, training)
    ("sigmoid", "none", False), ("sigmoid", "softmax", False), ("relu", "softmax", True), ("prelu", "none", True),
    ("dice", "none", True), ("dice", "softmax", True), ("dice", "softmax", False),
]


def attention_family(examples: int) -> None:
    backends = available(_attention.SUPPORTED, "target_attention")

    @fuzz_settings(examples)
    @given(data=st.data(), backend=st.sampled_from(backends), jagged=st.booleans(),
           config=st.sampled_from(ATTENTION_CONFIGS), B=st.integers(0, 4), T=st.integers(0, 5), N=st.integers(0, 9),
           D=st.integers(1, 5), hidden=st.sampled_from([(3,), (4, 2)]), index_dtype=INDEX_DTYPES)
    def run(data, backend, jagged, config, B, T, N, D, hidden, index_dtype):
        activation, normalization, training = config
        g = torch.Generator().manual_seed(B * 100 + T * 10 + N)
        q = guarded(torch.randn(B, D, generator=g)).requires_grad_()
        if jagged:
            keys = guarded(torch.randn(N, D, generator=g)).requires_grad_()
            layout = {"offsets": index_tensor(data.draw(offsets_strategy(B, N)), index_dtype)}
        else:
            keys = guarded(torch.randn(B, T, D, generator=g)).requires_grad_()
            layout = {"lengths": index_tensor(data.draw(lengths_strategy(B, T)), index_dtype)}
        widths = (4 * D, *hidden, 1)
        W = [guarded(torch.randn(o, i, generator=g) / i**0.5).requires_grad_() for i, o in zip(widths, widths[1:])]
        b = [guarded(torch.randn(o, generator=g) * 0.1).requires_grad_() for o in widths[1:]]
        acts = [guarded(torch.rand(h, generator=g) * 0.5).requires_grad_() for h in hidden] \
            if activation in ("prelu", "dice") else []
        means = [torch.zeros(h) for h in hidden] if activation == "dice" else []
        variances = [torch.ones(h) for h in hidden] if activation == "dice" else []
        with dk.checks(False):
            out, w = dk.target_attention(q, keys, W, b, **layout, activation=activation, act_weights=acts,
                                         act_means=means, act_vars=variances, normalization=normalization,
                                         training=training, return_scores=True, backend=backend)
            assert out.shape == (B, D) and w.shape == keys.shape[:-1], (out.shape, w.shape)
            inputs = [q, keys, *W, *b, *acts]
            grads = torch.autograd.grad([out, w], inputs, [torch.randn_like(out), torch.randn_like(w)],
                                        allow_unused=True)
        assert all(gr is None or gr.shape == x.shape for gr, x in zip(grads, inputs))
        finite("attention out, d query, d params", out, grads[0], *grads[2:], *means, *variances)

    run()


# --------------------------------------------------------------------------------------------------------- dice


def dice_family(examples: int) -> None:
    backends = available(_dice.SUPPORTED, "dice")

    @fuzz_settings(examples)
    @given(data=st.data(), backend=st.sampled_from(backends), shape=st.sampled_from([(0, 3), (5, 4), (2, 3, 5),
           (1, 1)]), mask_kind=st.sampled_from(["none", "random", "empty", "full"]), training=st.booleans(),
           affine=st.booleans())
    def run(data, backend, shape, mask_kind, training, affine):
        C = shape[-1]
        x = guarded(torch.randn(*shape)).requires_grad_()
        mask = None
        if mask_kind != "none":
            bits = data.draw(st.lists(st.booleans(), min_size=x[..., 0].numel(), max_size=x[..., 0].numel()))
            mask = torch.tensor(bits, dtype=torch.bool).reshape(shape[:-1])
            mask = mask.fill_(mask_kind == "full") if mask_kind in ("empty", "full") else mask
        alpha = guarded(torch.rand(C)).requires_grad_()
        weight = guarded(torch.rand(C) + 0.5).requires_grad_() if affine else None
        bias = guarded(torch.randn(C) * 0.1).requires_grad_() if affine else None
        rm, rv = torch.zeros(C), torch.ones(C)
        with dk.checks(False):
            y = dk.dice(x, alpha, rm, rv, weight, bias, mask, training, backend=backend)
            inputs = [t for t in (x, alpha, weight, bias) if t is not None]
            grads = torch.autograd.grad(y, inputs, torch.randn_like(y))
        finite("dice y, grads, running stats", y, *grads, rm, rv)

    run()


# ---------------------------------------------------------------------------------------------------------- MBA


@st.composite
def ids_strategy(draw, K: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ids of some shape with values inside and outside ``[0, K)``, and a padding id (or None)."""
    dtype = draw(INDEX_DTYPES)
    shape = draw(st.sampled_from([(0,), (5,), (2, 3), (3, 1, 2)]))
    n = 1
    for s in shape:
        n *= s
    ids = index_tensor(draw(st.lists(index_values(K - 1), min_size=n, max_size=n)), dtype).reshape(shape)
    return ids, draw(st.one_of(st.none(), st.integers(0, K - 1)))


def mba_family(examples: int) -> None:
    backends = available(_mba.SUPPORTED, "mba_l2")

    @fuzz_settings(examples)
    @given(data=st.data(), backend=st.sampled_from(backends), K=st.integers(1, 6), D=st.integers(1, 4),
           sparse=st.booleans(), lam=st.sampled_from([0.0, 0.3]))
    def run(data, backend, K, D, sparse, lam):
        ids, padding_idx = data.draw(ids_strategy(K))
        weight = guarded(torch.randn(K, D))
        counts = torch.randint(-2, 4, (K,))
        grad = guarded(torch.randn(K, D))
        with dk.checks(False):
            if sparse:
                out, penalty = dk.mba_l2_(weight, grad.to_sparse(1), ids, counts, lam, padding_idx, backend=backend)
                assert out.is_sparse and out.shape == (K, D)
                finite("mba sparse grad, penalty", out.to_dense(), penalty)
            else:
                out, penalty = dk.mba_l2_(weight, grad, ids, counts, lam, padding_idx, backend=backend)
                assert out is grad and guard_intact(grad), "mba_l2_ wrote outside its dense grad"
                finite("mba dense grad, penalty", out, penalty)
            n = dk.mba_counts(ids, K, padding_idx)
            assert n.shape == (K,) and bool((n >= 0).all())

    run()


def embedding_family(examples: int) -> None:
    backends = available(_mba.SUPPORTED, "MBAEmbedding")

    @fuzz_settings(examples)
    @given(data=st.data(), backend=st.sampled_from(backends), K=st.integers(1, 6), D=st.integers(1, 4),
           sparse=st.booleans(), lam=st.sampled_from([0.0, 0.3]), calls=st.integers(1, 2))
    def run(data, backend, K, D, sparse, lam, calls):
        ids, padding_idx = zip(*(data.draw(ids_strategy(K)) for _ in range(calls)))
        table = dk.MBAEmbedding(K, D, torch.randint(-2, 4, (K,)), lam, padding_idx[0], sparse,
                                _weight=guarded(torch.randn(K, D)), backend=backend)
        with dk.checks(False):
            outs = table(*ids)
            outs = outs if isinstance(outs, tuple) else (outs,)
            grads = [torch.randn_like(o) for o in outs]
            torch.autograd.backward(list(outs), grads)
        for o, i in zip(outs, ids):
            assert o.shape == (*i.shape, D)
        grad = table.weight.grad
        assert grad is not None and grad.is_sparse == sparse and grad.shape == (K, D)
        finite("embedding rows, weight grad, penalty", *outs, grad.to_dense(), table.last_penalty)

    run()


# ------------------------------------------------------------------------------------------------------- models

SCHEMA = FeatureSchema(item_fields=(Field("goods", 9, 3), Field("cate", 4, 2)), user_fields=(Field("gender", 3, 2),),
                       user_multi_fields=(Field("tags", 5, 2),), context_fields=(Field("slot", 4, 2),))
MODEL_CONFIGS = [  # (class, activation, attention activation, attention normalization)
    ("base", "prelu", None, "none"), ("base", "dice", None, "none"), ("din", "prelu", "sigmoid", "none"),
    ("din", "dice", "dice", "softmax"),
]
_models: dict = {}


def _model(config, backend: str):
    key = (config, backend)
    if key not in _models:
        kind, activation, att_activation, att_normalization = config
        torch.manual_seed(0)
        kw = dict(mlp_hidden=(6,), activation=activation, mba_lambda=0.1, backend=backend)
        _models[key] = (dk.BaseModel(SCHEMA, **kw) if kind == "base" else
                        dk.DIN(SCHEMA, att_hidden=(4,), att_activation=att_activation,
                               att_normalization=att_normalization, **kw))
    return _models[key]


def models_family(examples: int) -> None:
    backends = available(_attention.SUPPORTED, "target_attention")

    @fuzz_settings(examples)
    @given(data=st.data(), backend=st.sampled_from(backends), config=st.sampled_from(MODEL_CONFIGS),
           jagged=st.booleans(), training=st.booleans(), B=st.integers(0, 4), T=st.integers(0, 4),
           N=st.integers(0, 8), index_dtype=INDEX_DTYPES, bad_ids=st.booleans())
    def run(data, backend, config, jagged, training, B, T, N, index_dtype, bad_ids):
        model = _model(config, backend).train(training)
        g = torch.Generator().manual_seed(B * 100 + T * 10 + N)
        high = 12 if bad_ids else 3  # ids beyond the smallest table (vocab 3) with bad_ids
        ids = lambda *s: torch.randint(-3 if bad_ids else 0, high, s, generator=g)  # noqa: E731
        batch = {"ad": ids(B, 2), "user": ids(B, 1), "tags": ids(B, 3), "context": ids(B, 1)}
        if jagged:
            batch["hist"] = ids(N, 2)
            batch["hist_offsets"] = index_tensor(data.draw(offsets_strategy(B, N)), index_dtype)
        else:
            batch["hist"] = ids(B, T, 2)
            batch["hist_len"] = index_tensor(data.draw(lengths_strategy(B, T)), index_dtype)
        model.zero_grad()
        with dk.checks(False):
            logits, scores = model(batch, return_scores=True)
            assert logits.shape == (B,) and scores.shape == batch["hist"].shape[:-1]
            logits.sum().backward()
        finite("model logits", logits)

    run()


FAMILIES = {"attention": attention_family, "dice": dice_family, "mba": mba_family, "embedding": embedding_family,
            "models": models_family}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    family, examples = argv[0], int(argv[1]) if len(argv) > 1 else 60
    FAMILIES[family](examples)
    print(f"{family}: {examples} examples on {available(_attention.SUPPORTED, 'target_attention')} ok")


if __name__ == "__main__":
    main(sys.argv[1:])
