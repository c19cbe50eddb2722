"""Serving: :meth:`DIN.rank <din_kernels.DIN.rank>` (and :meth:`BaseModel.rank <din_kernels.BaseModel.rank>`) as
an AOTInductor package, a compiled ``.pt2`` file that Python or C++ (``torch::inductor::AOTIModelPackageLoader``,
see ``examples/rank``) loads and runs without the model's Python code.

::

    din_kernels.export(model, example_batch, "din.pt2")          # rank in eval mode, U, N, T dynamic
    rank = din_kernels.load("din.pt2")
    logits = rank(batch, candidates, candidate_offsets)          # [Nq], as model.rank(...) in eval mode

What runs in the package:

- the compiled C++ ops of the ``cpu`` (and ``cuda``) backend, ``din_kernels::target_attention_fwd`` and
  ``din_kernels::dice_fwd``, called through the dispatcher: the process that runs the package must have loaded the
  extension ``din_kernels._C`` first (its ``TORCH_LIBRARY`` registrations define them). :func:`load` does (importing
  ``din_kernels`` loads it); a C++ program ``dlopen``s the library (``examples/rank/main.cpp``);
- everything else as Inductor's own code: the embedding lookups (``din_kernels::mba_embedding_<backend>``, whose
  forward is ``weight[ids]`` with the ids clamped into the table, become ``aten.embedding`` of the clamped ids), the
  MLP, the candidates' gathers;
- a model on backend ``torch`` (or ``reference``) runs its attention and Dice in Python custom ops, which a package
  cannot call: export replaces them (:func:`decompositions`) by the same function in aten ops (the attention in eval
  mode with the factorised first layer, Dice with its running statistics), which Inductor compiles. On a GPU the Triton
  backend's ops are ``triton_op``s, whose kernels Inductor takes into the package (not yet run on a GPU); a Python op
  left in the graph (e.g. Triton under ``TRITON_INTERPRET=1``) is an error that names it.

The input checks are not in the package: the value checks of the ids, ``hist_len``/``hist_offsets`` and
``candidate_offsets`` (``din_kernels::check_ids``, ``din_kernels::check_attention_index``) are Python ops, so the
model is exported under ``din_kernels.checks(False)``. The package is memory-safe without them (every kernel and every
lookup clamps its indices, SPEC section 5: invalid input gives an unspecified result, never an access out of bounds);
the callable of :func:`load` runs the same checks in Python before the package while ``din_kernels.checks_enabled()``
(as eager ``rank`` does); a C++ caller validates its own input.

Sizes: the number of users U, of candidates N (``Nq``), the history length T (padded) or its rows (jagged) and the
width of each multi-hot field are dynamic; the layout (padded or jagged), the dtypes (int64 ids), the device and the
model's settings are fixed at export. ``torch.export`` specialises sizes 0 and 1, so the example batch needs at least
2 of each dynamic size; the package then runs any size, 0 and 1 included (a user with no candidate, a batch of one
user). The package's CPU code is compiled for the exporting machine's instruction set, like the extension.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _extension
from ._config import MLP, AttentionConfig
from ._jagged import CandidateIndex, JaggedIndex, padded_mask, safe_lengths
from ._validate import check_index
from .backend import BackendUnavailableError, checks, checks_enabled
from .nn.din import BaseModel
from .ops.attention import check_attention_index
from .ops.mba import check_id_range
from .ops.schema import COMPILED
from .reference.attention import compute_dtype

FORMAT = "1"
META_FORMAT = "din_kernels.format"
META_INPUTS = "din_kernels.inputs"  # the package's positional inputs, comma-separated
META_LAYOUT = "din_kernels.layout"  # padded | jagged
META_VOCAB = "din_kernels.vocab"  # JSON {input: [K of each column] or K of a multi-hot field}: the tables' sizes
META_OPS = "din_kernels.compiled_ops"  # the compiled extension's ops the package calls, comma-separated
META_MODEL = "din_kernels.model"  # JSON: the model's class, backend and device

# Inductor settings of every package: the thread count is read when the package runs (torch.set_num_threads /
# at::set_num_threads / OMP_NUM_THREADS), not fixed to the exporting process's.
INDUCTOR_CONFIGS = {"cpp.dynamic_threads": True}


# ----------------------------------------------------------------------------------------- the aten replacements


def _embedding(weight: Tensor, ids: Tensor, counts: Tensor, lam: float, padding_idx: int | None,
               sparse: bool) -> Tensor:
    """``din_kernels::mba_embedding_*``'s forward: ``weight[ids]`` ``ids.shape + [D]``, ids clamped into the
    table."""
    return F.embedding(ids.clamp(0, max(weight.shape[0] - 1, 0)), weight)


def _dice_eval(x: Tensor, mask: Tensor | None, alpha: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, training: bool,
               eps: float) -> tuple[Tensor, Tensor]:
    """``din_kernels::dice_fwd_*`` in eval: ``(y like x [..., C], stats [3, C])`` from the running statistics."""
    if training:
        raise ValueError("a package runs Dice in eval mode only (export calls model.eval())")
    cd = compute_dtype(x, alpha)
    mean, var = running_mean.to(cd), running_var.to(cd)
    y = _dice(x.to(cd), alpha.to(cd), mean, var, eps, weight, bias)
    return y.to(x.dtype), torch.stack([mean, var, torch.zeros_like(mean)])


def _dice(h: Tensor, alpha: Tensor, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None = None,
          bias: Tensor | None = None) -> Tensor:
    """Dice with given statistics (SPEC section 2): ``h * (alpha + (1 - alpha) * p)``, ``p`` the sigmoid of the
    normalised ``h`` [..., C]."""
    z = (h - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        z = z * weight.to(h.dtype)
    if bias is not None:
        z = z + bias.to(h.dtype)
    return h * (alpha + (1 - alpha) * torch.sigmoid(z))


def _hidden(h: Tensor, i: int, mlp: MLP, cfg: AttentionConfig) -> Tensor:
    """The activation of hidden layer ``i`` of the attention MLP on its pre-activation ``h`` [..., H_i]."""
    if cfg.activation == "sigmoid":
        return torch.sigmoid(h)
    if cfg.activation == "relu":
        return torch.relu(h)
    a = mlp.act_weights[i].to(h.dtype)
    if cfg.activation == "prelu":
        return torch.where(h >= 0, h, a * h)
    return _dice(h, a, mlp.act_means[i].to(h.dtype), mlp.act_vars[i].to(h.dtype), cfg.eps)


def _scores(z1: Tensor, mlp: MLP, cfg: AttentionConfig, W: list[Tensor], b: list[Tensor]) -> Tensor:
    """The scores ``[...]`` from the first layer's pre-activation ``z1`` [..., H1]."""
    h = _hidden(z1, 0, mlp, cfg)
    for i in range(1, len(W) - 1):
        h = _hidden(F.linear(h, W[i], b[i]), i, mlp, cfg)
    return (h * W[-1][0]).sum(-1) + b[-1][0]  # a reduction Inductor fuses with the activation (no [.., Hn] copy)


def _attention_eval(query: Tensor, keys: Tensor, lengths: Tensor | None, offsets: Tensor | None,
                    query_offsets: Tensor | None, weights: list[Tensor], biases: list[Tensor],
                    act_weights: list[Tensor], act_means: list[Tensor], act_vars: list[Tensor], activation: str,
                    normalization: str, scale: float, training: bool, eps: float,
                    save_z1: bool) -> tuple[Tensor, ...]:
    """``din_kernels::target_attention_fwd_*`` in eval mode, in aten ops with the shapes of the op's fake kernel
    (SPEC section 1; the first layer factorised): ``(v_U [Nq, D], w [Nq, T] padded or [sum_i L_u(i)] jagged,
    dice_stats [3, 0], scores_acc, out_acc, z1 [0])``.

    ``query`` [Nq, D] holds the candidates of the U users of ``keys`` (padded [U, T, D] with ``lengths`` [U], or
    jagged [N, D] with ``offsets`` [U + 1]) by ``query_offsets`` [U + 1] (without it, one candidate per user). Every
    index is clamped as in :mod:`din_kernels._jagged`, so any values are memory-safe."""
    if training:
        raise ValueError("a package runs the attention in eval mode only (export calls model.eval())")
    mlp = MLP(list(weights), list(biases), list(act_weights), list(act_means), list(act_vars))
    cfg = AttentionConfig(activation, normalization, scale, training, eps)
    cd = compute_dtype(query, keys, *weights)
    Nq, D = query.shape
    if query_offsets is None:
        query_offsets = torch.arange(Nq + 1, device=query.device)
    cand = CandidateIndex(query_offsets, Nq)
    q = query.to(cd)
    W, b = [w.to(cd) for w in weights], [x.to(cd) for x in biases]
    Wq, Wk, Wd, Wp = W[0].split(D, dim=1)
    c = F.linear(q, Wq + Wd, b[0])  # [Nq, H1]: the first layer's per-candidate bias
    if offsets is None:  # padded: each candidate reads its user's [T, D]
        T = keys.shape[1]
        user_keys = keys.to(cd) if cand.U else keys.new_zeros(1, T, D, dtype=cd)
        mask = padded_mask(cand.lengths(safe_lengths(lengths, T)), T)  # [Nq, T]
        k = user_keys[cand.user]  # [Nq, T, D]
        # k_t @ M_c^T with M_c = (Wk - Wd) + Wp * q_c: the first part once per user, the second as one matmul
        z1 = F.linear(user_keys, Wk - Wd)[cand.user] + F.linear(k * q[:, None, :], Wp) + c[:, None, :]  # [Nq, T, H1]
        s = _scores(z1, mlp, cfg, W, b)  # [Nq, T]
        if cfg.softmax:
            logits = torch.where(mask, scale * s, float("-inf"))
            m = torch.cat([logits, logits.new_full((Nq, 1), float("-inf"))], 1).amax(1, keepdim=True)
            e = torch.where(mask, torch.exp(logits - torch.where(torch.isfinite(m), m, 0)), 0)
            denom = e.sum(1, keepdim=True)
            w = e / torch.where(denom > 0, denom, 1)
        else:
            w = torch.where(mask, s, 0)
        out = torch.where(mask[..., None], w[..., None] * k, 0).sum(1)  # [Nq, D]
    else:  # jagged: the pairs (candidate, behaviour of its user), in candidate order
        users = JaggedIndex(offsets, keys.shape[0], query_offsets.shape[0] - 1)
        rep_len = cand.lengths(users.lengths)  # [Nq]
        ends = torch.cumsum(rep_len, 0)
        R = rep_len.sum().item()  # data-dependent: an unbacked size under export
        torch._check(R >= 0)
        owner = torch.repeat_interleave(torch.arange(Nq, device=query.device), rep_len, output_size=R)
        starts = users.offsets[:-1][cand.user] if cand.U else torch.zeros_like(cand.user)
        rows = (starts - (ends - rep_len))[owner] + torch.arange(R, device=query.device)
        rows = rows.clamp(0, max(keys.shape[0] - 1, 0))
        k = keys.to(cd)[rows]  # [R, D]
        z1 = F.linear(keys.to(cd), Wk - Wd)[rows] + F.linear(k * q[owner], Wp) + c[owner]  # [R, H1]
        s = _scores(z1, mlp, cfg, W, b)  # [R]
        if cfg.softmax:
            logits = scale * s
            m = torch.full((Nq,), float("-inf"), dtype=cd, device=query.device)
            m = m.scatter_reduce(0, owner, logits, "amax")
            m = torch.where(torch.isfinite(m), m, 0)
            e = torch.exp(logits - m[owner])
            denom = torch.zeros(Nq, dtype=cd, device=query.device).index_add(0, owner, e)
            w = e / torch.where(denom > 0, denom, 1)[owner]
        else:
            w = s
        out = torch.zeros(Nq, D, dtype=cd, device=query.device).index_add(0, owner, w[:, None] * k)
    empty = q.new_empty(0)
    return (out.to(query.dtype), w.to(query.dtype), q.new_zeros(3, 0),
            w if cfg.softmax else empty, out if cfg.softmax else q.new_empty(0, D), empty)


def _compiled_attention(query: Tensor, keys: Tensor, lengths: Tensor | None, offsets: Tensor | None,
                        query_offsets: Tensor | None, weights: list[Tensor], biases: list[Tensor],
                        act_weights: list[Tensor], act_means: list[Tensor], act_vars: list[Tensor], activation: str,
                        normalization: str, scale: float, training: bool, eps: float, save_z1: bool):
    """The compiled ``din_kernels::target_attention_fwd`` in a package: kept (``NotImplemented``) when every tensor
    list is non-empty. AOTInductor's proxy executor (torch 2.13) passes an empty ``Tensor[]`` argument of a C++ op as
    None, which the op rejects; so the lists a model leaves empty get what the op reads as none: ``sigmoid``/``relu``
    one empty tensor per hidden layer as ``act_weights``, and every activation but ``dice`` a filler as its Dice
    statistics (read only under ``dice``)."""
    if all((weights, biases, act_weights, act_means, act_vars)):
        return NotImplemented
    none = [weights[0].new_empty(0) for _ in weights[:-1]]
    filler = [biases[0]]
    return torch.ops.din_kernels.target_attention_fwd.default(
        query, keys, lengths, offsets, query_offsets, weights, biases, act_weights or none, act_means or filler,
        act_vars or filler, activation, normalization, scale, training, eps, save_z1)


def decompositions() -> dict:
    """``{op: aten implementation}``, for ``ExportedProgram.run_decompositions``: the Python custom ops of the
    models' eval forward (the ``reference``/``torch``/``triton`` embedding lookups, the ``reference``/``torch``
    attention and Dice), the compiled embedding lookup (its forward is a gather that Inductor fuses) and the compiled
    attention where a package cannot call it (:func:`_compiled_attention`)."""
    python = {f"mba_embedding_{b}": _embedding for b in ("reference", "torch", "triton")}
    python |= {f"target_attention_fwd_{b}": _attention_eval for b in ("reference", "torch")}
    python |= {f"dice_fwd_{b}": _dice_eval for b in ("reference", "torch")}
    compiled = {"mba_embedding": _embedding, "target_attention_fwd": _compiled_attention}
    ns = torch.ops.din_kernels
    return {getattr(ns, name).default: fn for name, fn in (python | compiled).items() if hasattr(ns, name)}


# --------------------------------------------------------------------------------------------------- the inputs


def input_names(model: BaseModel, layout: str) -> list[str]:
    """The package's positional inputs: the batch keys that :meth:`BaseModel.rank` reads for ``layout``
    (``padded``: ``hist`` [U, T, F], ``hist_len`` [U]; ``jagged``: ``hist`` [N, F], ``hist_offsets`` [U + 1]; then
    ``user`` [U, P], each multi-hot field [U, L], ``context`` [U, C] when the schema has them), then ``candidates``
    [Nq, F] and ``candidate_offsets`` [U + 1]."""
    s = model.schema
    names = ["hist", "hist_len" if layout == "padded" else "hist_offsets"]
    names += ["user"] if s.user_fields else []
    names += [f.name for f in s.user_multi_fields]
    names += ["context"] if s.context_fields else []
    return names + ["candidates", "candidate_offsets"]


def input_vocab(model: BaseModel, layout: str = "padded") -> dict[str, list[int] | int]:
    """``{input: [K of each column]}`` for the id inputs of :func:`input_names`; ``K`` alone for a multi-hot field
    (one table)."""
    names = input_names(model, layout)
    s = model.schema
    item = [f.vocab_size for f in s.item_fields]
    out = {"hist": item, "candidates": item, "user": [f.vocab_size for f in s.user_fields],
           "context": [f.vocab_size for f in s.context_fields]}
    out.update({f.name: f.vocab_size for f in s.user_multi_fields})
    return {n: out[n] for n in names if n in out}


def random_batch(vocab: Mapping[str, Sequence[int] | int], layout: str = "padded", users: int = 4,
                 candidates: int = 3, max_len: int = 8, multi_len: int = 3, seed: int = 0,
                 device: torch.device | str | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """``(batch, candidates [Nq, F], candidate_offsets [U + 1])``: random ids in ``[1, K)`` for the inputs of
    ``vocab`` (``{input: [K of each column]}``, ``K`` for a multi-hot field: a package's ``din_kernels.vocab``
    metadata, or :func:`input_vocab`), e.g. an example batch for :func:`export` or inputs for a package.

    ``users`` U users; histories of 0 to ``max_len`` behaviours (the first user ``max_len``, so T = ``max_len``
    padded); 0 to ``2 * candidates`` candidates per user (the first at least 2, the last none when U >= 2);
    ``multi_len`` ids per multi-hot field (some 0, the padding id)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda K, *shape: torch.randint(1, max(K, 2), shape, generator=g)  # noqa: E731
    cols = lambda sizes, n: torch.stack([ids(K, n) for K in sizes], -1)  # noqa: E731
    lengths = torch.randint(0, max_len + 1, (users,), generator=g)
    counts = torch.randint(0, 2 * candidates + 1, (users,), generator=g)
    if users:
        lengths[0], counts[0] = max_len, max(int(counts[0]), 2)
    if users >= 2:
        counts[-1] = 0
    item = list(vocab["hist"])
    batch: dict[str, Tensor] = {}
    if layout == "padded":
        hist = cols(item, users * max_len).reshape(users, max_len, len(item))
        batch["hist"] = hist.masked_fill(~padded_mask(lengths, max_len)[..., None], 0)
        batch["hist_len"] = lengths
    elif layout == "jagged":
        batch["hist"] = cols(item, int(lengths.sum()))
        batch["hist_offsets"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    else:
        raise ValueError(f"layout must be 'padded' or 'jagged', got {layout!r}")
    for name, sizes in vocab.items():
        if name in ("hist", "candidates"):
            continue
        if isinstance(sizes, int):  # multi-hot, 0-padded
            batch[name] = ids(sizes, users, multi_len) * (torch.rand(users, multi_len, generator=g) < 0.7)
        else:
            batch[name] = cols(sizes, users)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    cands = cols(item, int(counts.sum()))
    move = lambda t: t.to(device) if device is not None else t  # noqa: E731
    return {k: move(v) for k, v in batch.items()}, move(cands), move(offsets)


def _layout(batch: Mapping[str, Tensor]) -> str:
    if ("hist_len" in batch) == ("hist_offsets" in batch):
        raise ValueError("a batch needs exactly one of 'hist_len' (padded hist [U, T, F]) and 'hist_offsets' "
                         f"(jagged hist [N, F]); got keys {sorted(batch)}")
    return "padded" if "hist_len" in batch else "jagged"


def _flat_inputs(names: Sequence[str], batch: Mapping[str, Tensor], candidates: Tensor,
                 candidate_offsets: Tensor) -> list[Tensor]:
    """The tensors of ``names`` as contiguous int64."""
    given = dict(batch, candidates=candidates, candidate_offsets=candidate_offsets)
    out = []
    for name in names:
        if name not in given:
            raise ValueError(f"the batch has no {name!r}; the package takes {list(names)}")
        check_index(name, given[name])
        out.append(given[name].long().contiguous())
    return out


def _dynamic_shapes(names: Sequence[str], inputs: Sequence[Tensor], layout: str) -> list[dict]:
    """One ``{dim: Dim}`` per input: U, N and T (or the jagged rows) and each multi-hot width dynamic; raises for an
    example size below 2 (``torch.export`` would specialise it)."""
    from torch.export import Dim

    users, cands = Dim("U", min=0), Dim("N", min=0)
    sizes = {"U": inputs[names.index("candidate_offsets")].shape[0] - 1}
    dims: list[dict] = []
    for name, t in zip(names, inputs):
        if name in ("hist_offsets", "candidate_offsets"):
            dims.append({0: users + 1})
        elif name == "candidates":
            dims.append({0: cands})
            sizes["N (candidates)"] = t.shape[0]
        elif name == "hist" and layout == "jagged":
            dims.append({0: Dim("R", min=0)})
            sizes["the jagged hist rows"] = t.shape[0]
        elif name == "hist":
            dims.append({0: users, 1: Dim("T", min=0)})
            sizes["T (hist.shape[1])"] = t.shape[1]
        elif name in ("hist_len", "user", "context"):
            dims.append({0: users})
        else:  # a multi-hot field [U, L]
            dims.append({0: users, 1: Dim(f"L_{name}", min=0)})
            sizes[f"{name}.shape[1]"] = t.shape[1]
    small = {k: v for k, v in sizes.items() if v < 2}
    if small:
        raise ValueError(f"the example batch needs at least 2 of every dynamic size (torch.export specialises 0 and "
                         f"1, and the package would accept no other), got {small}")
    return dims


class _Rank(nn.Module):
    """``model.rank`` on positional tensors (the package's inputs, :func:`input_names`)."""

    def __init__(self, model: BaseModel, names: Sequence[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *inputs: Tensor) -> Tensor:
        batch = dict(zip(self.names[:-2], inputs[:-2]))
        return self.model.rank(batch, inputs[-2], inputs[-1])


def _python_ops(graph: torch.fx.Graph) -> list[str]:
    """The din_kernels ops of ``graph`` that are not the compiled extension's (Python ops a package cannot call)."""
    left = set()
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            ns, name = node.target.name().split("::", 1)
            if ns == "din_kernels" and name.split(".")[0] not in COMPILED:
                left.add(node.target.name())
    return sorted(left)


def _compiled_ops(graph: torch.fx.Graph) -> list[str]:
    return sorted({node.target.name() for node in graph.nodes if node.op == "call_function"
                   and isinstance(node.target, torch._ops.OpOverload)
                   and node.target.name().split("::", 1)[0] == "din_kernels"})


def export_program(model: BaseModel, example_batch: Mapping[str, Tensor], candidates: Tensor | None = None,
                   candidate_offsets: Tensor | None = None) -> tuple[torch.export.ExportedProgram, dict[str, str]]:
    """``(program, metadata)``: ``model.rank`` in eval mode exported by ``torch.export`` with dynamic sizes, its
    Python ops replaced by aten (:func:`decompositions`), and the package's metadata (see :func:`export`)."""
    if not isinstance(model, BaseModel):
        raise TypeError(f"model must be a din_kernels DIN or BaseModel, got {type(model).__name__}")
    layout = _layout(example_batch)
    if candidates is None:
        if "ad" not in example_batch:
            raise ValueError("give candidates and candidate_offsets, or an example batch with 'ad' (one candidate per "
                             "user)")
        candidates = example_batch["ad"]
    if candidate_offsets is None:
        candidate_offsets = torch.arange(candidates.shape[0] + 1, device=candidates.device)
    names = input_names(model, layout)
    device = next(model.parameters()).device
    inputs = [t.to(device) for t in _flat_inputs(names, example_batch, candidates, candidate_offsets)]
    dims = _dynamic_shapes(names, inputs, layout)
    was_training = model.training
    model.eval()
    try:
        with checks(False), torch.no_grad():
            program = torch.export.export(_Rank(model, names), tuple(inputs), dynamic_shapes=(tuple(dims),),
                                             strict=False)
            program = program.run_decompositions(decompositions())
    finally:
        model.train(was_training)
    left = _python_ops(program.graph)
    if left:
        raise BackendUnavailableError(
            f"the model's backend {model.backend!r} runs {left} in Python, which an AOTInductor package cannot call; "
            "export the model on backend 'cpu' (the compiled extension: 'auto' on a CPU where it is built) or "
            "'torch'")
    compiled = _compiled_ops(program.graph)
    metadata = {META_FORMAT: FORMAT, META_INPUTS: ",".join(names), META_LAYOUT: layout,
                META_VOCAB: json.dumps(input_vocab(model, layout)), META_OPS: ",".join(compiled),
                META_MODEL: json.dumps({"class": type(model).__name__, "backend": model.backend,
                                        "device": str(device)})}
    return program, metadata


def export(model: BaseModel, example_batch: Mapping[str, Tensor], path: str | os.PathLike,
           candidates: Tensor | None = None, candidate_offsets: Tensor | None = None,
           inductor_configs: Mapping[str, object] | None = None) -> str:
    """Writes ``model.rank`` in eval mode as an AOTInductor package (``torch._inductor.aoti_compile_and_package``).

    Args:
        model: a :class:`din_kernels.DIN` or :class:`din_kernels.BaseModel` (its training mode is restored after).
        example_batch: a batch of rank's form (the keys of :func:`input_names`: ``hist`` with ``hist_len`` padded or
            ``hist_offsets`` jagged, which fixes the package's layout, ``user``, the multi-hot fields, ``context``),
            at least 2 users, 2 candidates, T >= 2 (or 2 jagged rows) and multi-hot widths >= 2.
        path: the ``.pt2`` file to write.
        candidates, candidate_offsets: ``[Nq, F]`` and ``[U + 1]``, the example's candidates (default: the batch's
            ``ad`` rows, one per user).
        inductor_configs: Inductor settings added to :data:`INDUCTOR_CONFIGS`.
    Returns:
        ``path`` as a string. The package's metadata names its inputs in order (``din_kernels.inputs``), its layout,
        the tables' sizes and the compiled ops it calls.
    """
    program, metadata = export_program(model, example_batch, candidates, candidate_offsets)
    configs = dict(INDUCTOR_CONFIGS, **(inductor_configs or {}))
    configs["aot_inductor.metadata"] = dict(configs.get("aot_inductor.metadata", {}), **metadata)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


# ------------------------------------------------------------------------------------------------------ loading


class RankPackage:
    """A loaded package: ``package(batch, candidates, candidate_offsets) -> logits [Nq]``, the signature of
    :meth:`BaseModel.rank`.

    While ``din_kernels.checks_enabled()`` the call first runs eager ``rank``'s value checks (ids inside their tables,
    ``hist_len`` in [0, T], ``hist_offsets`` / ``candidate_offsets`` valid partitions: ``ValueError`` naming the
    argument); with ``din_kernels.checks(False)`` it goes straight to the package, which is memory-safe for any
    values. Inputs are cast to contiguous int64 on the package's device.

    Attributes:
        input_names: the package's positional inputs (:func:`input_names`); ``layout``: ``padded`` | ``jagged``;
        metadata: the package's metadata (strings).
    """

    def __init__(self, compiled: Callable, metadata: dict[str, str]) -> None:
        self._compiled = compiled
        self.metadata = metadata
        self.input_names = metadata[META_INPUTS].split(",")
        self.layout = metadata[META_LAYOUT]
        self.vocab = json.loads(metadata[META_VOCAB])
        self.device = torch.device(json.loads(metadata[META_MODEL])["device"])

    def inputs(self, batch: Mapping[str, Tensor], candidates: Tensor, candidate_offsets: Tensor) -> list[Tensor]:
        """The package's positional inputs for one call (checked while checks are enabled)."""
        given = _layout(batch)
        if given != self.layout:
            raise ValueError(f"the package takes {self.layout} batches ({self.input_names[:2]}), got a {given} one")
        inputs = [t.to(self.device) for t in _flat_inputs(self.input_names, batch, candidates, candidate_offsets)]
        self._check_shapes(dict(zip(self.input_names, inputs)))
        if checks_enabled():
            self._check_values(dict(zip(self.input_names, inputs)))
        return inputs

    def _check_shapes(self, x: dict[str, Tensor]) -> None:
        """Ranks and row counts (the package trusts them: a mismatch would read the wrong rows)."""
        co = x["candidate_offsets"]
        if co.dim() != 1 or co.shape[0] < 1:
            raise ValueError(f"candidate_offsets must be 1-D [U + 1], got shape {tuple(co.shape)}")
        U, F_item = co.shape[0] - 1, len(self.vocab["hist"])
        hist_shape = "[U, T, F]" if self.layout == "padded" else "[N, F]"
        want = {"hist": (hist_shape, F_item), "candidates": ("[Nq, F]", F_item)}
        for name, t in x.items():
            sizes = self.vocab.get(name)
            if name in want:
                layout, width = want[name]
                if t.dim() != layout.count(",") + 1 or t.shape[-1] != width:
                    raise ValueError(f"{name} must be {layout} with F = {width} item fields, got shape "
                                     f"{tuple(t.shape)}")
            elif isinstance(sizes, (int, list)) and (t.dim() != 2 or isinstance(sizes, list) and
                                                      t.shape[1] != len(sizes)):
                width = len(sizes) if isinstance(sizes, list) else "L"
                raise ValueError(f"{name} must be [U, {width}], got shape {tuple(t.shape)}")
            if name in ("candidates", "candidate_offsets") or (name == "hist" and self.layout == "jagged"):
                continue
            rows = U + 1 if name == "hist_offsets" else U
            if t.dim() < 1 or t.shape[0] != rows:
                raise ValueError(f"{name} has {t.shape[0] if t.dim() else 0} rows but candidate_offsets gives U = "
                                 f"{U} users (need {rows})")

    def _check_values(self, x: dict[str, Tensor]) -> None:
        hist = x["hist"]
        if self.layout == "padded":
            check_attention_index(x["hist_len"], hist.shape[1], False)
        else:
            check_attention_index(x["hist_offsets"], hist.shape[0], True)
        check_attention_index(x["candidate_offsets"], x["candidates"].shape[0], True, "candidate_offsets")
        for name, sizes in self.vocab.items():
            if isinstance(sizes, int):  # a multi-hot field: one table
                check_id_range(x[name], sizes)
            else:
                for j, K in enumerate(sizes):
                    check_id_range(x[name][..., j], K)

    def __call__(self, batch: Mapping[str, Tensor], candidates: Tensor, candidate_offsets: Tensor) -> Tensor:
        """``logits [Nq]``: the package run on the batch (see :meth:`BaseModel.rank`)."""
        return self._compiled(*self.inputs(batch, candidates, candidate_offsets))

    def __repr__(self) -> str:
        return f"RankPackage(layout={self.layout!r}, inputs={self.input_names})"


def load(path: str | os.PathLike, device_index: int = -1) -> RankPackage:
    """The package that :func:`export` wrote, as a callable with :meth:`BaseModel.rank`'s signature
    (:class:`RankPackage`). The compiled extension (loaded when ``din_kernels`` is imported) provides the ops the
    package calls; ``device_index`` picks the GPU of a CUDA package (-1: the current one)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no package at {path!r}")
    metadata = dict(torch._C._aoti.AOTIModelPackageLoader.load_metadata_from_package(path, "model"))
    if metadata.get(META_FORMAT) != FORMAT:
        raise ValueError(f"{path!r} is not a din_kernels rank package (metadata {META_FORMAT!r} = "
                         f"{metadata.get(META_FORMAT)!r}, expected {FORMAT!r}); write one with din_kernels.export")
    ops = [op for op in metadata.get(META_OPS, "").split(",") if op]
    if ops and not _extension.loaded():
        raise BackendUnavailableError(f"the package calls the compiled ops {ops}, but din_kernels._C could not be "
                                      f"imported ({_extension._error})")
    compiled = torch._inductor.aoti_load_package(path, device_index=device_index)
    return RankPackage(compiled, metadata)
