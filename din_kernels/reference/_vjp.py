"""Gradients of the literal formulas by autograd, for the ``reference`` backend's backward ops.

Inside an op's kernel the dispatcher has switched autograd off for the calling thread (thread-local state), and
``torch.func.vjp`` does not combine with the fake-tensor checks of ``torch.library.opcheck``. :func:`vjp` therefore
runs the forward and ``torch.autograd.grad`` in a worker thread, whose thread-local state is the default (autograd
on, no dispatch modes), on detached copies of the inputs: the exact gradients of the literal code.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

import torch

_worker: concurrent.futures.ThreadPoolExecutor | None = None


def _run(fn: Callable, inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None]) -> list:
    leaves = [t.detach().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    pairs = [(o, g) for o, g in zip(outputs, cotangents) if g is not None and o.requires_grad]
    grads = [None] * len(leaves)
    if pairs:
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [g.to(o.dtype) for o, g in pairs],
                                    allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def vjp(fn: Callable, inputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor | None]) -> list:
    """``d(sum_i <fn(*inputs)[i], cotangents[i]>) / d inputs`` (zeros for inputs that do not matter; a None
    cotangent counts as zero)."""
    global _worker
    if _worker is None:
        _worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="din_kernels_vjp")
    return _worker.submit(_run, fn, list(inputs), list(cotangents)).result()
