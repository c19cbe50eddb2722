"""Kernel launch through ``torch.library.wrap_triton`` for the ``triton_op`` implementations of this package."""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ..backend import triton_interpret


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """``wrap_triton(kernel)[grid](*args, **kwargs)`` with ``num_warps`` 4 on a GPU and 1 in the interpreter.

    Under ``TRITON_INTERPRET=1`` ``wrap_triton`` hands back the interpreted kernel itself, which would then run on
    the fake tensors of a ``triton_op``'s fake (meta) implementation; there the launch is skipped, as the traced
    wrapper does on a GPU.
    """
    kwargs.setdefault("num_warps", 1 if triton_interpret() else 4)
    if triton_interpret() and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **kwargs)
