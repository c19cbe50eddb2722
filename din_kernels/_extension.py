"""The compiled extension ``din_kernels._C`` (built from ``csrc/`` by ``setup.py``): loaded once, at import.

Importing it registers the compiled ops ``din_kernels::<op>`` (``csrc/register.cpp``) with their CPU kernels and, in
a CUDA build, their CUDA kernels. Nothing fails when it is missing: the ``cpu``/``cuda`` backends then report why.
"""

from __future__ import annotations

import importlib

import torch

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


# what the compiled attention kernels cover (csrc/cpu/attention.cpp; the same limits for csrc/cuda)
MAX_HIDDEN_LAYERS = 3
MAX_WIDTH = 256
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def supports_dtype(name: str, dtype: torch.dtype) -> bool:
    return dtype in DTYPES


def check_attention(name: str, query: torch.Tensor, keys: torch.Tensor, mlp) -> None:
    """Raises ``TypeError``/``ValueError`` for what the compiled attention kernels of backend ``name`` do not cover."""
    for arg, t in (("query", query), ("keys", keys)):
        if t.dtype not in DTYPES:
            raise TypeError(f"backend {name!r} supports {[str(d) for d in DTYPES]} for {arg}, got {t.dtype}")
    widths = mlp.widths
    if not 1 <= len(widths) <= MAX_HIDDEN_LAYERS:
        raise ValueError(f"backend {name!r} supports 1 to {MAX_HIDDEN_LAYERS} hidden layers, got {len(widths)} "
                         f"(hidden widths {tuple(widths)}); use backend='torch' for deeper MLPs")
    if max(widths) > MAX_WIDTH:
        raise ValueError(f"backend {name!r} supports hidden widths up to {MAX_WIDTH}, got {tuple(widths)}; use "
                         "backend='torch' for wider layers")


def supports_attention(name: str, query: torch.Tensor, keys: torch.Tensor, mlp) -> bool:
    try:
        check_attention(name, query, keys, mlp)
    except (TypeError, ValueError):
        return False
    return True
