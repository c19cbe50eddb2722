"""Kernel launch and op definition for the ``torch.library`` ops backed by this package's Triton kernels.

Importing this module does not import ``triton``: the op definitions in ``din_kernels.ops`` use it at import time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..backend import triton_interpret


def kernel_op(name: str, fake: Callable, mutates_args: Iterable[str] = ()) -> Callable:
    """Decorator defining the ``torch.library`` op ``name`` from a function that launches Triton kernels.

    On a GPU it is a ``torch.library.triton_op``: ``torch.compile`` traces into the function and keeps the kernels.
    Under ``TRITON_INTERPRET=1`` (kernels on the CPU) ``wrap_triton`` hands back the interpreted kernels unwrapped, so
    a ``triton_op`` could not be traced (AOTDispatcher would record the allocations without the launches); the op is
    then an opaque ``custom_op`` with ``fake`` (same signature, outputs of the right metadata only) as its fake
    implementation. Without the ``triton`` package it is an opaque ``custom_op`` too (never dispatched to:
    :func:`din_kernels.backend.resolve` refuses the backend first).
    """
    mutates_args = tuple(mutates_args)
    if not triton_interpret() and importlib.util.find_spec("triton") is not None:
        return torch.library.triton_op(name, mutates_args=mutates_args)

    def define(fn: Callable) -> Any:
        op = torch.library.custom_op(name, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op

    return define


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)``; a kernel without autotuning gets ``num_warps`` 4 on a GPU and
    1 in the interpreter unless ``kwargs`` name it, an autotuned one the ``num_warps`` of its configs.

    Under the interpreter, fake tensors (a launcher traced by hand, e.g. under ``FakeTensorMode``) skip the launch,
    as the traced wrapper does on a GPU."""
    from triton.runtime import Autotuner

    if not isinstance(kernel, Autotuner):  # a config's num_warps and a keyword num_warps would clash
        kwargs.setdefault("num_warps", 1 if triton_interpret() else 4)
    if triton_interpret() and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)
