"""What is measured: the shape sets, the inputs of every op and every provider that computes it.

A *case* is one op at one shape, dtype and device; a *provider* is one way of computing it:

- ``reference``: the package's literal formulas (``backend="reference"``), eager;
- ``reference_compile``: ``torch.compile`` of the reference functions (``dynamic=True``: one compile serves every
  shape of a run);
- ``torch``, ``cpu``, ``triton``, ``cuda``: the package's backends, each run where :mod:`din_kernels.backend` says it
  can (discovered at run time from the op family's ``SUPPORTED`` and ``unavailable_reason``);
- ``deepctr_torch``: the peer, DeepCTR-Torch 0.3.0, with the same function (weights copied from ours):
  ``AttentionSequencePoolingLayer``, ``Dice`` (its BatchNorm-based Dice is ours with ``affine=True``), the whole
  ``DIN`` model, and for MBA the L2 it regularises embeddings with (``l2_reg_embedding``: the whole table).

:func:`build` turns a case and a provider into a :class:`Workload`: one ``setup`` per mode that prepares the inputs
and returns the callable that is timed. Modes: ``forward`` (with autograd recording, as in training),
``backward`` (the gradients of a retained graph), ``full`` (both). MBA is a gradient update and has ``forward``
only; ``din_step`` has ``forward`` (an inference batch: eval, no grad) and ``full`` (a training step: forward,
BCE loss, backward, SGD step).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import floor

OPS = ("attention", "dice", "mba", "din_step")
PROVIDERS = ("reference", "reference_compile", "torch", "cpu", "triton", "cuda", "deepctr_torch")
KERNEL_BACKENDS = ("torch", "cpu", "triton", "cuda")
PEER = "deepctr_torch"
MODES = {"attention": ("forward", "backward", "full"), "dice": ("forward", "backward", "full"),
         "mba": ("forward",), "din_step": ("forward", "full")}
# the op family (din_kernels.ops.<family>) and the op name din_kernels.backend knows it by
FAMILY = {"attention": ("attention", "target_attention"), "dice": ("dice", "dice"), "mba": ("mba", "mba_l2"),
          "din_step": ("attention", "target_attention")}

# The row that every CPU run reports: forward + backward of TargetAttention(128, hidden=(80, 40), "sigmoid") at
# B = 1024, T = 100, the torch backend against DeepCTR-Torch.
HEADLINE = {"op": "attention", "shape": {"B": 1024, "T": 100, "D": 128, "hidden": [80, 40], "activation": "sigmoid"},
            "dtype": "float32", "mode": "full", "providers": ("torch", PEER)}

_ATT = {"hidden": [80, 40], "activation": "sigmoid"}
_DIN = {"D": 128, "vocab": 100_000}

# Shape sets. "default" is what `make bench` runs on the CPU (within 10 minutes on 2 cores); "full" adds the
# production sizes; "gpu" is the set of benchmarks/gpu_check.sh; "quick" is for development and tests.
SHAPE_SETS: dict[str, dict[str, list[dict]]] = {
    "quick": {
        "attention": [{"B": 64, "T": 20, "D": 16, **_ATT}, {"B": 64, "T": 40, "D": 16, **_ATT}],
        "dice": [{"N": 4096, "C": 16}],
        "mba": [{"K": 10_000, "B": 64, "L": 21, "D": 16}],
        "din_step": [{"B": 64, "T": 20, "D": 32, "vocab": 10_000}],
    },
    "default": {
        "attention": [{"B": 256, "T": 50, "D": 32, **_ATT}, {"B": 256, "T": 100, "D": 32, **_ATT},
                      {"B": 256, "T": 200, "D": 32, **_ATT}, {"B": 1024, "T": 100, "D": 128, **_ATT}],
        "dice": [{"N": 8192, "C": 80}, {"N": 32_768, "C": 80}, {"N": 131_072, "C": 40}],
        "mba": [{"K": 100_000, "B": 1024, "L": 101, "D": 16, "ids": 100_000},
                {"K": 10_000_000, "B": 1024, "L": 101, "D": 16, "ids": 100_000},
                {"K": 10_000_000, "B": 1024, "L": 101, "D": 16}],
        "din_step": [{"B": 128, "T": 50, **_DIN}, {"B": 256, "T": 100, **_DIN}, {"B": 512, "T": 100, **_DIN}],
    },
    "full": {
        "attention": [{"B": 256, "T": 50, "D": 32, **_ATT}, {"B": 256, "T": 200, "D": 32, **_ATT},
                      {"B": 256, "T": 500, "D": 32, **_ATT}, {"B": 1024, "T": 100, "D": 128, **_ATT},
                      {"B": 4096, "T": 100, "D": 64, **_ATT}, {"B": 4096, "T": 200, "D": 128, **_ATT},
                      {"B": 2048, "T": 500, "D": 256, **_ATT}],
        "dice": [{"N": 102_400, "C": 80}, {"N": 409_600, "C": 80}, {"N": 819_200, "C": 80},
                 {"N": 4_194_304, "C": 200}],
        "mba": [{"K": 100_000, "B": 1024, "L": 101, "D": 32, "ids": 100_000},
                {"K": 10_000_000, "B": 1024, "L": 101, "D": 32, "ids": 100_000},
                {"K": 1_000_000, "B": 1024, "L": 101, "D": 32}, {"K": 10_000_000, "B": 1024, "L": 101, "D": 32},
                {"K": 10_000_000, "B": 4096, "L": 201, "D": 64}],
        "din_step": [{"B": 256, "T": 50, **_DIN}, {"B": 1024, "T": 100, **_DIN}, {"B": 4096, "T": 200, **_DIN}],
    },
    "gpu": {
        "attention": [{"B": 4096, "T": 200, "D": 128, **_ATT}, {"B": 1024, "T": 100, "D": 128, **_ATT},
                      {"B": 4096, "T": 50, "D": 128, **_ATT}, {"B": 4096, "T": 500, "D": 128, **_ATT},
                      {"B": 4096, "T": 200, "D": 256, **_ATT}],
        "dice": [{"N": 4_194_304, "C": 200}, {"N": 1_048_576, "C": 80}],
        "mba": [{"K": 100_000, "B": 4096, "L": 201, "D": 64, "ids": 100_000},
                {"K": 10_000_000, "B": 4096, "L": 201, "D": 64, "ids": 100_000},
                {"K": 10_000_000, "B": 4096, "L": 201, "D": 64}],
        "din_step": [{"B": 1024, "T": 100, **_DIN}, {"B": 4096, "T": 200, **_DIN}],
    },
}


def shrink(shape: dict, factor: int) -> dict:
    """The shape with its batch-like sizes (B, N, K) divided by ``factor``: a dry run of a large set on a small
    machine (e.g. the GPU set on the CPU)."""
    out = dict(shape)
    for key in ("B", "N", "K"):
        if key in out:
            out[key] = max(int(out[key]) // factor, 8)
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def shape_label(op: str, shape: dict) -> str:
    """``B=1024 T=100 D=128``: the size fields of a shape (hidden widths and activation left out)."""
    keys = {"attention": ("B", "T", "D"), "dice": ("N", "C"), "mba": ("K", "B", "L", "D", "ids"),
            "din_step": ("B", "T", "D"), "serve": ("U", "C", "T", "D")}[op]
    return " ".join(f"{k}={shape[k]}" for k in keys if k in shape)


def default_dtypes(device: torch.device) -> tuple[list[torch.dtype], dict[str, str]]:
    """fp32 always; bf16 where the device has it natively (a CUDA GPU of compute capability 8+, a CPU with
    AVX512-BF16 or AMX). Returns the dtypes and ``{dtype: why skipped}``."""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return [torch.float32, torch.bfloat16], {}
        return [torch.float32], {"bfloat16": "this GPU has no native bf16"}
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    native = any(probe() for probe in probes if probe is not None)
    if native:
        return [torch.float32, torch.bfloat16], {}
    return [torch.float32], {"bfloat16": "this CPU has no native bf16 (no AVX512-BF16 or AMX): torch emulates it; "
                                         "ask for it with --dtypes float32,bfloat16"}


def provider_unavailable_reason(op: str, provider: str, device: torch.device, dtype: torch.dtype | None = None,
                                shape: dict | None = None, full: bool = False) -> str | None:
    """None when ``provider`` can run ``op`` here, otherwise a sentence saying why not.

    The package's backends are discovered through :mod:`din_kernels.backend` and each op family's ``SUPPORTED``, so
    a backend added to the package is benchmarked without a change here.
    """
    from din_kernels import backend as _backend

    device = torch.device(device)
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    family, op_name = FAMILY[op]
    if provider in KERNEL_BACKENDS:
        supported = importlib.import_module(f"din_kernels.ops.{family}").SUPPORTED
        if provider not in supported:
            return f"the package has no {provider!r} backend for {op_name} (it has {', '.join(supported)})"
        reason = _backend.unavailable_reason(provider, device, op_name)
        if reason is not None:
            return reason
        if provider == "triton" and device.type == "cpu":
            return ("TRITON_INTERPRET=1 runs the Triton interpreter on the CPU: a correctness tool, not a "
                    "benchmark target")
        if provider == "triton" and op == "attention" and shape is not None and dtype is not None:
            return _triton_attention_refusal(shape, dtype, device)
        if op == "din_step" and _din_class() is None:
            return _DIN_MISSING
        return None
    if provider == "reference":
        return _DIN_MISSING if op == "din_step" and _din_class() is None else None
    if provider == "reference_compile":
        if op == "din_step" and not full:
            return "compiling the whole DIN model is left to --full (minutes of compile time)"
        if op == "din_step" and _din_class() is None:
            return _DIN_MISSING
        if device.type == "cpu" and _cxx() is None:
            return "torch.compile on the CPU needs a C++ compiler (none found on PATH)"
        return None
    # the peer
    if importlib.util.find_spec("deepctr_torch") is None:
        return "deepctr-torch is not installed (pip install deepctr-torch==0.3.0)"
    if op == "attention" and shape is not None and shape.get("activation", "sigmoid") not in ("sigmoid", "relu"):
        return f"DeepCTR-Torch's {shape['activation']!r} is not SPEC's (its PReLU has one slope, its Dice is BN-based)"
    if op == "din_step":
        if _din_class() is None:
            return _DIN_MISSING
        if dtype is not None and dtype != torch.float32:
            return "the DIN training step is benchmarked in float32 only"
    return None


def _triton_attention_refusal(shape: dict, dtype: torch.dtype, device: torch.device) -> str | None:
    """The Triton attention backend's own refusal of ``shape`` in ``dtype`` on ``device`` (sizes whose blocks do not
    fit its shared memory, dtypes it does not cover), or None."""
    from din_kernels.triton import attention as tra

    D, hidden = shape["D"], list(shape.get("hidden", _ATT["hidden"]))
    q, k = torch.empty(1, D, dtype=dtype, device="meta"), torch.empty(1, 1, D, dtype=dtype, device="meta")
    weights = [torch.empty(h, d, device="meta") for d, h in zip([4 * D, *hidden], [*hidden, 1])]
    try:
        tra.check_supported(q, k, weights, smem_limit=tra._smem_limit(device))
    except (TypeError, ValueError) as e:
        return str(e)
    return None


_DIN_MISSING = "din_kernels.DIN is missing (the model class of din_kernels/nn/din.py is not importable)"


def _din_class():
    """``din_kernels.DIN`` (or ``din_kernels.nn.din.DIN`` while the package does not export it yet)."""
    import din_kernels

    cls = getattr(din_kernels, "DIN", None)
    if cls is None:
        try:
            cls = importlib.import_module("din_kernels.nn.din").DIN
        except (ImportError, AttributeError):
            return None
    return cls


def _cxx() -> str | None:
    import shutil

    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


def available_providers(op: str, device: torch.device, providers=PROVIDERS, dtype: torch.dtype | None = None,
                        shape: dict | None = None, full: bool = False) -> tuple[list[str], dict[str, str]]:
    """``(providers that run here, {provider: why not})`` for ``op`` on ``device``."""
    ok, skipped = [], {}
    for p in providers:
        reason = provider_unavailable_reason(op, p, device, dtype, shape, full)
        if reason is None:
            ok.append(p)
        else:
            skipped[p] = reason
    return ok, skipped


@dataclass
class Workload:
    """One provider on one case.

    ``setups[mode]()`` prepares the mode (e.g. runs the forward whose graph the ``backward`` mode differentiates)
    and returns the callable that is timed; ``zero()`` drops the gradients the callables leave behind;
    ``info`` holds the row's extra fields (e.g. the number of valid behaviours ``N``). For a differentiable op,
    ``split = (forward, backward)``: ``forward()`` returns the output and ``backward(out)`` differentiates it, so
    one forward and one backward give the memory of all three modes.
    """

    setups: dict[str, Callable[[], Callable[[], object]]]
    zero: Callable[[], None] = lambda: None
    info: dict = field(default_factory=dict)
    keep: list = field(default_factory=list)  # objects that must live as long as the workload
    split: tuple | None = None


def _autograd_setups(call: Callable[[], Tensor], leaves: list[Tensor], grad_out: Tensor) -> tuple:
    """``(setups, zero, split)`` of a differentiable op ``call()``: its three modes; the gradients of ``leaves``
    are dropped before each backward so every call allocates them afresh (as a training step after ``zero_grad()``
    does)."""

    def zero() -> None:
        for t in leaves:
            t.grad = None

    def setup_backward():
        out = call()

        def run():
            zero()
            out.backward(grad_out, retain_graph=True)

        return run

    def setup_full():
        def run():
            zero()
            call().backward(grad_out)

        return run

    def backward(out: Tensor) -> None:
        zero()
        out.backward(grad_out)

    return {"forward": lambda: call, "backward": setup_backward, "full": setup_full}, zero, (call, backward)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


_CACHE: dict = {}


def _cached(key, make):
    """The inputs of the last case, shared by its providers (the same tensors: large allocations are slow)."""
    key = repr(key)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


def clear_cache() -> None:
    """Frees the cached inputs of the last case."""
    _CACHE.clear()


_COMPILED: dict = {}


def _compiled(key, fn):
    """One ``torch.compile(fn, dynamic=True)`` per key and process, so every shape of a run shares it."""
    if key not in _COMPILED:
        import torch._functorch.config as functorch_config

        # the backward mode reruns a retained graph, which donated buffers forbid
        functorch_config.donated_buffer = False
        _COMPILED[key] = torch.compile(fn, dynamic=True)
    return _COMPILED[key]


# --------------------------------------------------------------------------------------------------- attention


def _attention(shape, dtype, device, provider, seed):
    import din_kernels
    from din_kernels.reference.attention import target_attention_ref

    B, T, D = shape["B"], shape["T"], shape["D"]
    hidden, activation = tuple(shape.get("hidden", (80, 40))), shape.get("activation", "sigmoid")

    def make():
        g = _generator(device, seed)
        lengths = torch.randint(1, T + 1, (B,), generator=g, device=device)
        query = torch.randn(B, D, generator=g, device=device).to(dtype).requires_grad_()
        keys = torch.randn(B, T, D, generator=g, device=device).to(dtype).requires_grad_()
        grad_out = torch.randn(B, D, generator=g, device=device).to(dtype)
        torch.manual_seed(seed)
        master = din_kernels.TargetAttention(D, hidden, activation, backend="reference")
        return lengths, query, keys, grad_out, master

    lengths, query, keys, grad_out, master = _cached(("attention", shape, dtype, device, seed), make)
    info = {"N": int(lengths.sum())}
    if provider == PEER:
        from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer

        peer = AttentionSequencePoolingLayer(att_hidden_units=hidden, att_activation=activation, embedding_dim=D)
        copy_attention_weights(master, peer)
        peer = peer.to(device, dtype)
        len2 = lengths.unsqueeze(1)
        leaves = [query, keys, *peer.parameters()]
        setups, zero, split = _autograd_setups(lambda: peer(query.unsqueeze(1), keys, len2).squeeze(1), leaves,
                                               grad_out)
        return Workload(setups, zero, info, [peer], split)
    module = din_kernels.TargetAttention(D, hidden, activation,
                                         backend="reference" if provider == "reference_compile" else provider)
    module.load_state_dict(master.state_dict())
    module = module.to(device, dtype)
    if provider == "reference_compile":
        def attention_ref(q, k, lengths, weights, biases, act_weights):
            return target_attention_ref(q, k, weights, biases, lengths, activation=activation,
                                        act_weights=act_weights)[0]

        fn = _compiled(("attention", activation), attention_ref)
        weights, biases = [m.weight for m in module.layers], [m.bias for m in module.layers]
        act_weights = [a.weight for a in module.activations] if activation == "prelu" else []

        def call():
            return fn(query, keys, lengths, weights, biases, act_weights)
    else:
        def call():
            return module(query, keys, lengths)
    setups, zero, split = _autograd_setups(call, [query, keys, *module.parameters()], grad_out)
    return Workload(setups, zero, info, [module], split)


def copy_attention_weights(ours: nn.Module, peer: nn.Module) -> None:
    """Copies a :class:`din_kernels.TargetAttention`'s MLP into DeepCTR-Torch's ``AttentionSequencePoolingLayer``
    (``local_att.dnn.linears`` then ``local_att.dense``), so both compute the same function."""
    targets = [*peer.local_att.dnn.linears, peer.local_att.dense]
    if len(targets) != len(ours.layers):
        raise ValueError(f"the peer has {len(targets)} linear layers, ours {len(ours.layers)}")
    with torch.no_grad():
        for src, dst in zip(ours.layers, targets):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)


# -------------------------------------------------------------------------------------------------------- dice


def _dice(shape, dtype, device, provider, seed):
    import din_kernels
    from din_kernels.reference.dice import dice_ref

    N, C = shape["N"], shape["C"]

    def make():
        g = _generator(device, seed)
        x = (torch.randn(N, C, generator=g, device=device) + 0.5).to(dtype).requires_grad_()
        grad_out = torch.randn(N, C, generator=g, device=device).to(dtype)
        alpha = torch.rand(C, generator=g, device=device) * 0.5
        return x, grad_out, alpha

    x, grad_out, alpha = _cached(("dice", shape, dtype, device, seed), make)
    if provider == PEER:
        from deepctr_torch.layers.activation import Dice as PeerDice

        peer = PeerDice(C, dim=2, epsilon=1e-8)
        with torch.no_grad():
            peer.alpha.copy_(alpha)
        peer = peer.to(device, dtype).train()
        setups, zero, split = _autograd_setups(lambda: peer(x), [x, *peer.parameters()], grad_out)
        return Workload(setups, zero, {}, [peer], split)
    module = din_kernels.Dice(C, affine=True, backend="reference" if provider == "reference_compile" else provider)
    with torch.no_grad():
        module.alpha.copy_(alpha)
    module = module.to(device, dtype).train()
    if provider == "reference_compile":
        def dice_train_ref(x, alpha, weight, bias):
            return dice_ref(x, alpha, None, None, weight, bias, None, True, 1e-8)[0]

        fn = _compiled(("dice",), dice_train_ref)

        def call():
            return fn(x, module.alpha, module.weight, module.bias)
    else:
        def call():
            return module(x)
    setups, zero, split = _autograd_setups(call, [x, *module.parameters()], grad_out)
    return Workload(setups, zero, {}, [module], split)


def copy_dice_weights(ours: nn.Module, peer: nn.Module) -> None:
    """Copies a :class:`din_kernels.Dice` (``affine=True``) into DeepCTR-Torch's ``Dice`` (alpha, the BatchNorm's
    weight and bias, running statistics)."""
    with torch.no_grad():
        peer.alpha.copy_(ours.alpha.reshape(peer.alpha.shape))
        peer.bn.weight.copy_(ours.weight)
        peer.bn.bias.copy_(ours.bias)
        peer.bn.running_mean.copy_(ours.running_mean)
        peer.bn.running_var.copy_(ours.running_var)


# --------------------------------------------------------------------------------------------------------- mba


def _mba(shape, dtype, device, provider, seed):
    import din_kernels
    from din_kernels.reference.mba import mba_l2_ref

    K, B, L, D = shape["K"], shape["B"], shape["L"], shape["D"]  # ids drawn from [1, shape["ids"]) (default K)
    lam = 1e-6

    def make():
        g = _generator(device, seed)
        weight = torch.randn(K, D, generator=g, device=device).to(dtype)
        grad = torch.zeros(K, D, device=device, dtype=dtype)
        # a generator of their own: the same ids (the same batch) whatever the table size
        ids = torch.randint(1, min(shape.get("ids", K), K), (B, L), generator=_generator(device, seed + 1),
                            device=device)
        counts = torch.randint(1, 1000, (K,), generator=g, device=device)
        return weight, grad, ids, counts, {"M": B * L, "U": int(torch.unique(ids).numel())}

    weight, grad, ids, counts, info = _cached(("mba", shape, dtype, device, seed), make)
    if provider == PEER:
        # DeepCTR-Torch regularises embeddings with l2_reg_embedding: lam * sum(W ** 2) over the whole table,
        # differentiated by autograd every step (BaseModel.get_regularization_loss).
        table = weight.clone().requires_grad_()

        def run_peer():
            (g_,) = torch.autograd.grad(torch.sum(lam * torch.square(table)), table)
            grad.add_(g_)

        return Workload({"forward": lambda: run_peer}, info=info, keep=[table])
    if provider == "reference_compile":
        import torch._dynamo.config as dynamo_config

        dynamo_config.capture_dynamic_output_shape_ops = True
        fn = _compiled(("mba",), lambda w, gr, i, c: mba_l2_ref(w, gr, i, c, lam)[0])

        def run():
            grad.copy_(fn(weight, grad, ids, counts))
    else:
        def run():
            din_kernels.mba_l2_(weight, grad, ids, counts, lam, backend=provider)

    return Workload({"forward": lambda: run}, info=info)


# ---------------------------------------------------------------------------------------------------- din_step

DIN_ATT_HIDDEN = (80, 40)
DIN_MLP_HIDDEN = (200, 80)


def din_fields(shape: dict) -> tuple[int, int, int]:
    """``(item embedding width Di, per-field width, user width)``: two item fields (goods, category) of D/2 each
    and one user field of D/2."""
    half = shape["D"] // 2
    return 2 * half, half, half


def _din_batch(shape, device, seed):
    B, T, K = shape["B"], shape["T"], shape["vocab"]
    g = _generator(device, seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g, device=device)
    valid = torch.arange(T, device=device)[None, :] < lengths[:, None]
    n_cate = max(K // 100, 2)
    hist = torch.stack([torch.randint(1, K, (B, T), generator=g, device=device),
                        torch.randint(1, n_cate, (B, T), generator=g, device=device)], -1) * valid[..., None]
    ad = torch.stack([torch.randint(1, K, (B,), generator=g, device=device),
                      torch.randint(1, n_cate, (B,), generator=g, device=device)], -1)
    user = torch.randint(1, K, (B, 1), generator=g, device=device)
    label = torch.randint(0, 2, (B,), generator=g, device=device).float()
    return {"ad": ad, "hist": hist, "hist_len": lengths, "user": user}, label, n_cate


def din_model(shape: dict, n_cate: int, backend: str, device: torch.device, lam: float = 0.0) -> nn.Module:
    """Our DIN of the benchmarks: two item fields (goods, category) of D/2 each, one user field of D/2, attention
    :data:`DIN_ATT_HIDDEN` sigmoid, MLP :data:`DIN_MLP_HIDDEN` PReLU, on ``backend``."""
    from din_kernels.nn.din import FeatureSchema, Field

    K = shape["vocab"]
    _, half, user_dim = din_fields(shape)
    schema = FeatureSchema(item_fields=(Field("goods", K, half), Field("cate", n_cate, half)),
                           user_fields=(Field("uid", K, user_dim),))
    return _din_class()(schema, mlp_hidden=DIN_MLP_HIDDEN, activation="prelu", att_hidden=DIN_ATT_HIDDEN,
                        att_activation="sigmoid", mba_lambda=lam, backend=backend).to(device)


def peer_din_model(shape: dict, n_cate: int, device: torch.device, lam: float = 0.0) -> nn.Module:
    """DeepCTR-Torch's DIN with the fields, widths and activations of :func:`din_model` (its own weights)."""
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN as PeerDIN

    T, K = shape["T"], shape["vocab"]
    _, half, user_dim = din_fields(shape)
    columns = [SparseFeat("user", K, embedding_dim=user_dim), SparseFeat("item_id", K, embedding_dim=half),
               SparseFeat("cate_id", n_cate, embedding_dim=half),
               VarLenSparseFeat(SparseFeat("hist_item_id", K, embedding_dim=half, embedding_name="item_id"),
                                maxlen=T, length_name="seq_length"),
               VarLenSparseFeat(SparseFeat("hist_cate_id", n_cate, embedding_dim=half, embedding_name="cate_id"),
                                maxlen=T, length_name="seq_length")]
    return PeerDIN(columns, ["item_id", "cate_id"], dnn_hidden_units=DIN_MLP_HIDDEN, dnn_activation="prelu",
                   att_hidden_size=DIN_ATT_HIDDEN, att_activation="sigmoid", l2_reg_embedding=lam,
                   device=str(device)).to(device)


def peer_din_input(model: nn.Module, batch: dict) -> Tensor:
    """The input matrix of :func:`peer_din_model` for a padded batch of :func:`_din_batch`'s keys: its columns in
    the order of the model's ``feature_index`` (DeepCTR-Torch puts ``seq_length`` after the first sequence)."""
    columns = {"user": batch["user"], "item_id": batch["ad"][:, :1], "cate_id": batch["ad"][:, 1:],
               "hist_item_id": batch["hist"][..., 0], "hist_cate_id": batch["hist"][..., 1],
               "seq_length": batch["hist_len"][:, None]}
    order = sorted(model.feature_index.items(), key=lambda item: item[1][0])
    return torch.cat([columns[name] for name, _ in order], 1).float()


def _din_step(shape, dtype, device, provider, seed):
    import torch.nn.functional as F

    batch, label, n_cate = _cached(("din_step", shape, device, seed), lambda: _din_batch(shape, device, seed))
    lam = 1e-6
    info = {"N": int(batch["hist_len"].sum())}
    torch.manual_seed(seed)
    if provider == PEER:
        model = peer_din_model(shape, n_cate, device, lam)
        X = peer_din_input(model, batch)

        def forward():
            return model(X).squeeze(-1)

        def loss():
            return F.binary_cross_entropy(forward(), label) + model.get_regularization_loss()
    else:
        backend = "reference" if provider == "reference_compile" else provider
        model = din_model(shape, n_cate, backend, device, lam)
        fwd = torch.compile(model, dynamic=True) if provider == "reference_compile" else model

        def forward():
            return fwd(batch)

        def loss():
            return F.binary_cross_entropy_with_logits(forward(), label)

    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def setup_forward():
        model.eval()

        def run():
            with torch.no_grad():
                return forward()

        return run

    def setup_full():
        model.train()

        def run():
            opt.zero_grad(set_to_none=True)
            loss().backward()
            opt.step()

        return run

    return Workload({"forward": setup_forward, "full": setup_full}, lambda: opt.zero_grad(set_to_none=True), info,
                    [model, opt])


_BUILDERS = {"attention": _attention, "dice": _dice, "mba": _mba, "din_step": _din_step}


def build(op: str, provider: str, shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Workload:
    """The :class:`Workload` of ``provider`` on ``op`` at ``shape``: the same inputs (same seed) and the same
    weights for every provider. ``op`` ``serve`` is :func:`benchmarks.serve.build`."""
    if op == "serve":
        from . import serve

        return serve.build(provider, shape, dtype, torch.device(device), seed)
    return _BUILDERS[op](shape, dtype, torch.device(device), provider, seed)


def cost(op: str, shape: dict, mode: str, dtype: torch.dtype, info: dict) -> floor.Cost:
    """The FLOP/byte model (:mod:`benchmarks.floor`) of one row."""
    size = dtype.itemsize
    if op == "attention":
        return floor.attention_cost(shape["B"], info["N"], shape["D"], shape.get("hidden", (80, 40)), mode, size,
                                    shape.get("activation", "sigmoid"))
    if op == "dice":
        return floor.dice_cost(shape["N"], shape["C"], mode, size, affine=True)
    if op == "mba":
        return floor.mba_cost(info["M"], info["U"], shape["D"], size)
    di, _, user_dim = din_fields(shape)
    return floor.din_step_cost(shape["B"], info["N"], shape["T"], di, user_dim, DIN_ATT_HIDDEN, DIN_MLP_HIDDEN,
                               mode, 4)
