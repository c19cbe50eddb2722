"""The compiled extension ``din_kernels._C`` (built from ``csrc/`` by ``setup.py``): loaded once, at import.

Importing it registers the compiled ops ``din_kernels::<op>`` (``csrc/register.cpp``) with their CPU kernels and, in
a CUDA build, their CUDA kernels. Nothing fails when it is missing: the ``cpu``/``cuda`` backends then report why.
"""

from __future__ import annotations

import importlib

import torch

from . import _cuda_plan

_error: str | None = None
try:
    importlib.import_module("din_kernels._C")
except ImportError as exc:  # not built (pure-Python install) or built against another torch
    _error = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    """Whether ``din_kernels._C`` is loaded."""
    return _error is None


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled op ``din_kernels::<op>`` has a kernel for ``device_type`` (``"cpu"`` / ``"cuda"``)."""
    if not loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"din_kernels::{op}", key)


def unavailable_reason(device_type: str) -> str | None:
    """None when the compiled kernels for ``device_type`` are loaded, else a sentence saying why not."""
    if not loaded():
        return (f"the compiled extension din_kernels._C could not be imported ({_error}); build it with "
                "`pip install --no-build-isolation -e .` (a C++ compiler with OpenMP is enough for the CPU kernels)")
    if not has_kernel("target_attention_fwd", device_type):
        if device_type == "cuda":
            return ("din_kernels._C was built without CUDA kernels (it needs a CUDA build of torch and nvcc at "
                    "build time, and DIN_KERNELS_SKIP_CUDA_BUILD unset)")
        return "din_kernels._C has no CPU kernels"
    return None


# what the compiled attention kernels cover (csrc/cpu/attention.cpp; the same limits for csrc/cuda, which also
# bounds D and leaves out float64)
MAX_HIDDEN_LAYERS = 3
MAX_WIDTH = 256
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CUDA_ATTENTION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports_dtype(name: str, dtype: torch.dtype) -> bool:
    return dtype in DTYPES


def _check_cuda_attention(query: torch.Tensor, keys: torch.Tensor, mlp) -> None:
    for arg, tensors in (("weights", mlp.weights), ("biases", mlp.biases), ("act_weights", mlp.act_weights)):
        for i, t in enumerate(tensors):
            if t.dtype not in CUDA_ATTENTION_DTYPES:
                raise TypeError(f"backend 'cuda' supports {[str(d) for d in CUDA_ATTENTION_DTYPES]} for {arg}[{i}], "
                                f"got {t.dtype}; use backend='torch' for float64")
    D, widths = int(query.shape[-1]), tuple(mlp.widths)
    if D > MAX_WIDTH:
        raise ValueError(f"backend 'cuda' supports D up to {MAX_WIDTH}, got D = {D}; use backend='torch'")
    f32 = keys.dtype == torch.float32
    need = max(_cuda_plan.cuda_attention_smem(D, widths, f32, kind) for kind in _cuda_plan.CUDA_LAUNCHES)
    if need > _cuda_plan.CUDA_SMEM_PER_BLOCK:
        raise ValueError(f"backend 'cuda': D = {D} with hidden widths {widths} in {keys.dtype} needs {need} bytes of "
                         f"shared memory per block, more than an sm_90 GPU's {_cuda_plan.CUDA_SMEM_PER_BLOCK}; use "
                         "backend='torch' (or 'triton')")


def check_attention(name: str, query: torch.Tensor, keys: torch.Tensor, mlp) -> None:
    """Raises ``TypeError``/``ValueError`` for what the compiled attention kernels of backend ``name`` do not cover."""
    dtypes = CUDA_ATTENTION_DTYPES if name == "cuda" else DTYPES
    for arg, t in (("query", query), ("keys", keys)):
        if t.dtype not in dtypes:
            raise TypeError(f"backend {name!r} supports {[str(d) for d in dtypes]} for {arg}, got {t.dtype}")
    widths = mlp.widths
    if not 1 <= len(widths) <= MAX_HIDDEN_LAYERS:
        raise ValueError(f"backend {name!r} supports 1 to {MAX_HIDDEN_LAYERS} hidden layers, got {len(widths)} "
                         f"(hidden widths {tuple(widths)}); use backend='torch' for deeper MLPs")
    if max(widths) > MAX_WIDTH:
        raise ValueError(f"backend {name!r} supports hidden widths up to {MAX_WIDTH}, got {tuple(widths)}; use "
                         "backend='torch' for wider layers")
    if name == "cuda":
        _check_cuda_attention(query, keys, mlp)


def supports_attention(name: str, query: torch.Tensor, keys: torch.Tensor, mlp) -> bool:
    try:
        check_attention(name, query, keys, mlp)
    except (TypeError, ValueError):
        return False
    return True
