"""Shared memory and launch configuration of the Triton target-attention kernels (:mod:`.attention_kernels`): the
model of what a launch holds in shared memory, the autotune configs it prunes, the backward's modes, and the sizes
and dtypes that the backend supports.

Precision and shared memory. Every ``tl.dot`` multiplies 16-bit operands on the tensor cores with float32
accumulation: bfloat16 operands for bfloat16 inputs and float16 ones for float16 inputs (``PREC`` "bf16" / "fp16"),
and for float32 inputs the four bfloat16 products of the operands split as ``x = hi + lo`` (``PREC`` "bf16x4", ``hi*hi
+ (hi*lo + lo*hi + lo*lo)``; the split keeps about 17 significant bits of each operand, the products are exact and
summed in float32: results within 1.6x of the float32 tolerance of the tests, where three products (no ``lo*lo``)
reached 1.9x; TF32's three-pass scheme was float32-grade but did not fit in shared memory, below). The loop-invariant
operands (``M_b^T``, ``M_b``, ``Wp``, ``W2``, ``W2^T``) stay in shared memory for the whole key loop, each read from
global memory in the orientation its product needs (a transpose on chip would cost a staging buffer); 16-bit operands
halve what float32/TF32 ones took, which did not fit an H200's 227 KB per block in the backward at D = 128. The model
``_smem_estimate`` (fitted to ``benchmarks/compile_check.py`` on sm_90) prunes the autotune configs, splits ``dq`` off
the backward into its own launch when one launch would not fit (``SPLIT_DQ``: float32 at D = 128, bfloat16 at D =
256), and makes ``check_supported`` refuse, naming the sizes, what no launch fits (e.g. float32 at D = 256, or
256-wide hidden layers). Loads are not software-pipelined (``num_stages=1``: the key tiles are small next to the
operands). ``python benchmarks/compile_check.py`` reports, per compiled kernel, registers, spills and shared memory;
the backward at D = 128 spills about 1 KB a thread (its ``[H1, D]`` accumulators live in registers).

Hidden layers: one or two (the launcher raises ``ValueError`` for more: use the ``torch`` backend); ``D`` and every
width up to 256 (blocks are padded to powers of two >= 16 and masked) within the shared memory of the GPU (above).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backend import triton_interpret

MAX_WIDTH = 256
MAX_HIDDEN_LAYERS = 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# What one launch of the backward kernel computes: its ``MODE`` constexpr. ``tl.constexpr`` values, so that the
# kernel reads them as globals (Triton refuses a plain int, and an int annotated ``tl.constexpr``); the launcher
# passes their ``.value``. Dice in training launches the two Dice-sum modes before ``MODE_GRADS`` (see
# :mod:`din_kernels.triton.attention`).
MODE_GRADS = tl.constexpr(0)  # every gradient; dq too unless SPLIT_DQ
MODE_DICE_SUMS_TOP = tl.constexpr(1)  # the Dice batch sums (sum g, sum g u) of the top hidden layer
MODE_DICE_SUMS_LAYER1 = tl.constexpr(2)  # the Dice batch sums of layer 1, given layer 2's (two hidden layers)
MODE_DQ_ONLY = tl.constexpr(3)  # dq alone, in a launch of its own after MODE_GRADS (SPLIT_DQ)


def _autotune_configs(tiles: tuple[tuple[int, int], ...]) -> list[triton.Config]:
    """``(BLOCK_T, num_warps)`` pairs on a GPU, without software pipelining (chosen by ptxas' register and spill
    report for D = 128, H = (80, 40) on sm_90; each backward config takes seconds to compile, so the list is short);
    one config under the interpreter, which cannot benchmark several."""
    if triton_interpret():
        return [triton.Config({"BLOCK_T": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_T": bt}, num_warps=w, num_stages=1) for bt, w in tiles]


_FWD_TILES = ((16, 4), (16, 8), (32, 8))  # spill-free forward tiles
_BWD_TILES = ((16, 8), (16, 16), (32, 16))  # the backward keeps [H1, D] accumulators in registers: wide CTAs


# Shared memory. On a GPU the loop-invariant ``tl.dot`` operands (``M_b^T`` [BD, BH1], ``M_b``, ``Wp``, ``W2``,
# ``W2^T`` as needed by the kernel) live in shared memory for the whole key loop, as 16-bit values (twice, high and
# low parts, with ``PREC == "bf16x4"``), next to the per-tile operands. ``_smem_estimate`` is the model of what Triton
# allocates, fitted to the reports of ``benchmarks/compile_check.py`` for sm_90 (never below them, at most about a
# third above; tests/test_compile_sm90.py holds it to that). It decides the configs that are tried (``_prune``),
# whether the backward computes ``dq`` in a second launch (``SPLIT_DQ``: one operand fewer each), and which sizes
# the backend supports (``check_supported``).
SM90_SMEM_PER_BLOCK = 232448  # bytes of shared memory one block may use on H100/H200 (sm_90)


def _smem_estimate(kind: str, prec: str, layers: int, BD: int, BH1: int, BH2: int, BT: int,
                   mode: int = MODE_GRADS.value, split_dq: bool = False, layer: int = 1) -> int:
    """Bytes of shared memory of one program of ``kind`` ("fwd", "stats" or "bwd" with its ``mode``)."""
    dh = BD * BH1
    hh = BH1 * BH2 if layers == 2 else 0
    if kind == "fwd":
        inv = dh + hh
    elif kind == "stats":
        inv = dh + (hh if layer == 2 else 0)
    elif mode == MODE_GRADS.value:
        inv = 2 * dh + 2 * hh + (0 if split_dq else dh)
    elif mode == MODE_DQ_ONLY.value:
        inv = 2 * dh + 2 * hh
    elif mode == MODE_DICE_SUMS_TOP.value:
        inv = dh + hh
    else:  # MODE_DICE_SUMS_LAYER1
        inv = dh + 2 * hh
    tiles = BT * (BD + BH1 + (0 if kind == "stats" and layer == 1 else BH2)) * (1.25 if kind == "bwd" else 1.0)
    parts = 2 if prec == "bf16x4" else 1
    return int(parts * 2 * (inv + tiles)) + 4096


def _smem_limit(device: torch.device | None = None) -> int:
    """Shared memory per block of ``device`` (the current CUDA device when None); the sm_90 value without CUDA (the
    target of ``benchmarks/compile_check.py``)."""
    if device is not None and device.type != "cuda" or not torch.cuda.is_available():
        return SM90_SMEM_PER_BLOCK
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _cuda_smem_limit(index)


@functools.cache
def _cuda_smem_limit(index: int) -> int:  # checked on every call of the backend: looked up once per device
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", SM90_SMEM_PER_BLOCK))


def _config_smem(c, kwargs) -> int:
    """``_smem_estimate`` of autotune config ``c`` for a launch with constexprs ``kwargs``."""
    kind = "bwd" if "MODE" in kwargs else "stats" if "LAYER" in kwargs else "fwd"
    return _smem_estimate(kind, kwargs["PREC"], kwargs.get("NUM_LAYERS", 2), kwargs["BLOCK_D"], kwargs["BLOCK_H1"],
                          kwargs["BLOCK_H2"], c.kwargs["BLOCK_T"], kwargs.get("MODE", MODE_GRADS.value),
                          kwargs.get("SPLIT_DQ", False), kwargs.get("LAYER", 1))


def _prune(configs, named_args, **kwargs):
    """Drop tiles longer than the (bucketed) sequence length and configs whose shared memory (estimated) exceeds
    the device's. Keeps at least the first config (16-row tiles: ``check_supported`` ensures that it fits)."""
    bucket = named_args.get("T_BUCKET", kwargs.get("T_BUCKET", 16))
    limit = _smem_limit()
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= max(16, bucket) and _config_smem(c, kwargs) <= limit]
    return kept or configs[:1]


# autotune keys (besides the dtypes of the tensor arguments): the shapes and every constexpr that changes what a
# kernel holds on chip
_AUTOTUNE_KEY = ["T_BUCKET", "BLOCK_D", "BLOCK_H1", "BLOCK_H2", "NUM_LAYERS", "LAYER", "MODE", "SPLIT_DQ", "ACT",
                 "SOFTMAX"]


def _block(n: int) -> int:
    """Power-of-two block >= 16 (``tl.dot``'s minimum) covering ``n``."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def _precision(query: Tensor, keys: Tensor) -> str:
    """The ``tl.dot`` scheme: one bfloat16 / float16 product for bfloat16 / float16 inputs, else ``bf16x4``."""
    dts = {query.dtype, keys.dtype}
    return "bf16" if dts == {torch.bfloat16} else "fp16" if dts == {torch.float16} else "bf16x4"


def _split_dq(prec: str, layers: int, BD: int, BH1: int, BH2: int, limit: int) -> bool:
    """Whether the backward computes ``dq`` in a launch of its own (``MODE_DQ_ONLY``): one would not fit ``limit``."""
    return _smem_estimate("bwd", prec, layers, BD, BH1, BH2, 16, mode=MODE_GRADS.value) > limit


def check_supported(query: Tensor, keys: Tensor, weights, smem_limit: int | None = None) -> None:
    """Raises ``TypeError``/``ValueError`` for what the Triton kernels do not cover (dtypes, depth, widths, and the
    shared memory that the blocks of these widths need: checked against ``smem_limit`` bytes, by default the limit
    of ``query``'s GPU; not checked for CPU tensors under the interpreter unless ``smem_limit`` is given).

    ``query`` [B, D]; ``keys`` [B, T, D] or [N, D]; ``weights`` the MLP's ``[H_i, H_{i-1}]`` matrices, the last
    ``[1, H_n]``."""
    for name, t in (("query", query), ("keys", keys)):
        if t.dtype not in DTYPES:
            raise TypeError(f"backend 'triton' supports {[str(x) for x in DTYPES]} for {name}, got {t.dtype}; "
                            f"use backend='torch' for it")
    widths = [int(w.shape[0]) for w in weights[:-1]]
    if not 1 <= len(widths) <= MAX_HIDDEN_LAYERS:
        raise ValueError(f"backend 'triton' supports 1 or {MAX_HIDDEN_LAYERS} hidden layers, got {len(widths)} "
                         f"(hidden widths {tuple(widths)}); use backend='torch' for deeper MLPs")
    D = int(query.shape[-1])
    if D > MAX_WIDTH or max(widths) > MAX_WIDTH:
        raise ValueError(f"backend 'triton' supports D and hidden widths up to {MAX_WIDTH}, got D = {D} and hidden "
                         f"widths {tuple(widths)}; use backend='torch' for wider layers")
    if smem_limit is None and query.device.type != "cuda":
        return
    prec, layers = _precision(query, keys), len(widths)
    BD, BH1, BH2 = _block(D), _block(widths[0]), _block(widths[1] if layers == 2 else 1)
    limit = smem_limit if smem_limit is not None else _smem_limit(query.device)
    split = _split_dq(prec, layers, BD, BH1, BH2, limit)
    other = MODE_DQ_ONLY if split else MODE_DICE_SUMS_LAYER1
    need = max(_smem_estimate("fwd", prec, layers, BD, BH1, BH2, 16),
               _smem_estimate("bwd", prec, layers, BD, BH1, BH2, 16, mode=MODE_GRADS.value, split_dq=split),
               _smem_estimate("bwd", prec, layers, BD, BH1, BH2, 16, mode=other.value))
    if need > limit:
        raise ValueError(f"backend 'triton' needs about {need} bytes of shared memory per block for D = {D} and hidden "
                         f"widths {tuple(widths)} in {query.dtype} (blocks {BD} x {BH1} x {BH2}); the GPU has "
                         f"{limit}: use backend='torch' for these sizes, or bfloat16/float16 inputs")


def supports(query: Tensor, keys: Tensor, weights) -> bool:
    """Whether :func:`check_supported` accepts these inputs (shapes as there)."""
    try:
        check_supported(query, keys, weights)
    except (TypeError, ValueError):
        return False
    return True
